"""Representation drift: how far a network's internal representations move between checks,
measured by debiased linear CKA on a fixed probe set, plus activation health."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, default_collate
from typing_extensions import override

from lightning_stability.estimators.cka import Representation, representation_cka
from lightning_stability.estimators.isolation import (
    compute_precision,
    frozen_rng,
    preserved_state,
    resolve_compute_dtype,
)
from lightning_stability.probes.base import StabilityProbe

__all__ = ["InputFn", "RepresentationDriftMonitor"]

InputFn = Callable[[Any], Any]
"""``input_fn(batch) -> inputs``: what ``pl_module(inputs)`` takes, from a collated batch."""

_RELU_LIKE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)
# Identity in eval mode: their output repeats the previous layer's.
_SKIPPED_BY_DEFAULT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_INPUT_KEYS = ("x", "input", "inputs")


def default_input_fn(batch: Any) -> Any:
    """The model input of a batch: the batch itself if a tensor, the first element of a
    tuple/list, or the ``"x"``/``"input"``/``"inputs"`` entry of a mapping."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
    raise ValueError(
        f"input_fn: cannot find the model input in a batch of type {type(batch).__name__}; "
        "pass input_fn=lambda batch: <what pl_module(...) takes>"
    )


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _expand(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of ``module``; containers that are never called themselves (ModuleList,
    ModuleDict) are replaced by their items."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out.extend(_expand(full + ".", child))
        else:
            out.append((full, child))
    return out


def default_layers(module: nn.Module, max_layers: int) -> list[str]:
    """The outputs of the top-level blocks: descend through single-child wrappers, skip
    dropout/identity, and keep at most ``max_layers`` evenly spaced (the last always)."""
    prefix, root = "", module
    children = _expand(prefix, root)
    while len(children) == 1 and next(children[0][1].children(), None) is not None:
        prefix, root = children[0][0] + ".", children[0][1]
        children = _expand(prefix, root)
    names = [n for n, m in children if not isinstance(m, _SKIPPED_BY_DEFAULT)]
    if len(names) > max_layers:
        picks = torch.linspace(0, len(names) - 1, max_layers).round().long().tolist()
        names = [names[i] for i in sorted(set(picks))]
    return names


def _is_relu_like(module: nn.Module) -> bool:
    if isinstance(module, _RELU_LIKE):
        return True
    leaves = [m for m in module.modules() if not list(m.children())]
    return bool(leaves) and leaves[-1] is not module and isinstance(leaves[-1], _RELU_LIKE)


def _loader_of(loaders: Any) -> DataLoader | None:
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for item in loaders:
            found = _loader_of(item)
            if found is not None:
                return found
    return None


class RepresentationDriftMonitor(StabilityProbe):
    """Measures how much the network's internal representations move during training.

    A fixed probe set (drawn once, with a private generator, from the validation or
    training dataset; or given as ``probe_inputs``) is passed through ``pl_module`` in eval
    mode under ``torch.no_grad`` at the start of training, at the end of every
    ``every_n_epochs``-th epoch and, optionally, every ``every_n_steps`` optimizer steps.
    Forward hooks capture the chosen layers' outputs and are removed right after. The
    pass leaves no trace: modes, buffers, ``.grad`` and RNG state are restored, and the
    probe set is read from the dataset directly, never by iterating a shuffled loader.
    Where the probe set cannot be drawn or passed through the model (no model input found
    in a batch, an iterable dataset, a forward that fails), it warns once, saying why and
    what to pass, and measures nothing more in this fit; training goes on.

    Readings (debiased linear CKA, Kornblith et al. 2019 with the unbiased HSIC of Song
    et al. 2012; drift = 1 - CKA):

    - ``stability/cka/<layer>``: CKA to the previous check; ``stability/cka/min`` over layers.
    - ``stability/cka_initial/<layer>``: CKA to the first check (start of training).
    - ``stability/act/<layer>/rms``: root mean square of the activations.
    - ``stability/act/<layer>/dead_fraction``: fraction of units (flattened features)
      never positive on the probe set; only for ReLU-like layers (or blocks ending in one).

    With a TensorBoard logger, a layer x check heat map of both CKAs is added as the image
    ``stability/cka_heatmap`` at the end of each epoch. Per layer only what CKA needs is
    kept (centred Gram matrix when the probe set is smaller than the feature count, centred
    activations otherwise), for the previous and the first check, on the CPU in float64.

    Under DDP every rank forwards its own shard of the probe set (its size is rounded down
    to a multiple of the world size) and the activations are all-gathered, so every rank
    computes the CKA of the union, identical to one process holding the whole probe set.

    Args:
        layers: module names (as in ``named_modules``) or glob patterns (``"blocks.*"``).
        layer_types: module class names to select (``["ReLU", "Conv2d"]``), added to
            ``layers``. With neither, the top-level blocks (see :func:`default_layers`).
        max_layers: cap on the default selection (default 8).
        probe_size: samples in the probe set (default 256).
        source: ``"val"`` (default; falls back to the training set when there is no
            validation loader) or ``"train"``.
        seed: seed of the private generator that draws the probe set.
        every_n_epochs: check at the end of every n-th epoch (default 1; 0 disables).
        every_n_steps: also check every n optimizer steps (default ``None``: off).
        probe_inputs: a user probe set: the model input itself (first dimension samples).
        input_fn: maps a collated batch to the model input (default: first element of a
            tuple/list, or the ``"x"``/``"input"`` key).
        chunk_size: samples per probe forward (bounds memory; default 128).
        heatmap: log the CKA heat map to TensorBoard (default ``True``).
        max_history: checks kept for the heat map (default 100).
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        layer_types: list[str] | None = None,
        max_layers: int = 8,
        probe_size: int = 256,
        source: Literal["val", "train"] = "val",
        seed: int = 0,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        probe_inputs: Tensor | None = None,
        input_fn: InputFn | None = None,
        chunk_size: int = 128,
        heatmap: bool = True,
        max_history: int = 100,
    ) -> None:
        super().__init__()
        if source not in ("val", "train"):
            raise ValueError(f"source must be 'val' or 'train', got {source!r}")
        for name, value, minimum in (
            ("max_layers", max_layers, 1),
            ("probe_size", probe_size, 4),
            ("chunk_size", chunk_size, 1),
            ("max_history", max_history, 1),
            ("every_n_epochs", every_n_epochs, 0),
        ):
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(
                f"every_n_steps must be None or an integer >= 1, got {every_n_steps!r}"
            )
        if probe_inputs is not None and (
            not isinstance(probe_inputs, Tensor) or probe_inputs.dim() < 1
        ):
            raise ValueError("probe_inputs must be None or a tensor whose first dim is samples")
        if probe_inputs is not None and probe_inputs.shape[0] < 4:
            raise ValueError(
                f"probe_inputs must hold at least 4 samples (debiased CKA), got "
                f"{probe_inputs.shape[0]}"
            )
        self.layers = list(layers) if layers is not None else None
        self.layer_types = list(layer_types) if layer_types is not None else None
        self.max_layers = max_layers
        self.probe_size = probe_size
        self.source = source
        self.seed = seed
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.probe_inputs = probe_inputs
        self.input_fn = input_fn
        self.chunk_size = chunk_size
        self.heatmap = heatmap
        self.max_history = max_history

        self.layer_names: list[str] = []
        self.probe_indices: list[int] | None = None
        self.num_checks = 0
        self.last_check_step = -1
        self.history: list[dict[str, Any]] = []
        self._inputs: Any = None
        self._initial: dict[str, Representation] = {}
        self._previous: dict[str, Representation] = {}
        self._relu_like: set[str] = set()

    # ----------------------------------------------------------------------- selection
    def _resolve_layers(self, module: nn.Module) -> list[str]:
        named = dict(module.named_modules())
        available = [n for n in named if n]
        chosen: list[str] = []
        for pattern in self.layers or []:
            matches = [n for n in available if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                listing = ", ".join(available[:60]) + (" ..." if len(available) > 60 else "")
                raise ValueError(f"layers: no module named {pattern!r}; available: {listing}")
            chosen.extend(matches)
        if self.layer_types:
            types = {type(m).__name__ for m in named.values()}
            unknown = sorted(set(self.layer_types) - types)
            if unknown:
                raise ValueError(
                    f"layer_types: no module of type {unknown}; available: {sorted(types)}"
                )
            chosen.extend(n for n in available if type(named[n]).__name__ in set(self.layer_types))
        if not chosen:
            chosen = default_layers(module, self.max_layers)
        if not chosen:
            raise ValueError("layers: the module has no submodules; name the layers to watch")
        unique = list(dict.fromkeys(chosen))
        self._relu_like = {n for n in unique if _is_relu_like(named[n])}
        return unique

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.layer_names = self._resolve_layers(pl_module)

    # ----------------------------------------------------------------------- probe set
    def _source_loader(self, trainer: pl.Trainer) -> DataLoader:
        loader = _loader_of(trainer.val_dataloaders) if self.source == "val" else None
        loader = loader or _loader_of(trainer.train_dataloader)
        if loader is None:
            raise ValueError(
                "probe_inputs: no DataLoader to draw the probe set from; pass probe_inputs"
            )
        if isinstance(loader.dataset, IterableDataset):
            raise ValueError(
                "probe_inputs: the dataset is iterable, so a fixed probe set cannot be drawn "
                "by index; pass probe_inputs"
            )
        return loader

    def _prepare_probe(self, trainer: pl.Trainer) -> None:
        world, rank = trainer.world_size, trainer.global_rank
        if self.probe_inputs is not None:
            total = self.probe_inputs.shape[0] // world * world
            self._inputs = self.probe_inputs[:total][rank::world]
            return
        loader = self._source_loader(trainer)
        dataset = loader.dataset
        if self.probe_indices is None:
            generator = torch.Generator().manual_seed(self.seed)
            count = min(self.probe_size, len(dataset)) // world * world  # type: ignore[arg-type]
            perm = torch.randperm(len(dataset), generator=generator)  # type: ignore[arg-type]
            self.probe_indices = perm[:count].tolist()
        if len(self.probe_indices) < 4 * world:
            raise ValueError(
                f"probe_size: the probe set needs at least 4 samples per rank, got "
                f"{len(self.probe_indices)} on {world} rank(s)"
            )
        collate = loader.collate_fn or default_collate
        # Datasets with random transforms draw from the global RNG.
        with frozen_rng():
            samples = [dataset[i] for i in self.probe_indices[rank::world]]
            batch = collate(samples)
        self._inputs = (self.input_fn or default_input_fn)(batch)

    # ----------------------------------------------------------------------- measuring
    def _capture(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        named = dict(pl_module.named_modules())
        outputs: dict[str, list[Tensor]] = {n: [] for n in self.layer_names}

        def hook_for(name: str):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                tensor = _first_tensor(output)
                if tensor is not None:
                    outputs[name].append(tensor.detach().reshape(tensor.shape[0], -1).double())

            return hook

        dtype = resolve_compute_dtype(list(pl_module.parameters()), None)
        handles = [named[n].register_forward_hook(hook_for(n)) for n in self.layer_names]
        try:
            with (
                preserved_state(pl_module, train=False),
                compute_precision(pl_module, dtype),
                torch.no_grad(),
            ):
                inputs = move_data_to_device(self._inputs, pl_module.device)
                inputs = apply_to_collection(
                    inputs, Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t
                )
                total = _num_samples(inputs)
                for start in range(0, total, self.chunk_size):
                    pl_module(_slice(inputs, start, start + self.chunk_size))
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n, chunks in outputs.items() if not chunks]
        if missing:
            raise ValueError(f"layers: {missing} produced no tensor output in the probe forward")
        return {n: torch.cat(chunks) for n, chunks in outputs.items()}

    def _gather(self, trainer: pl.Trainer, acts: dict[str, Tensor]) -> dict[str, Tensor]:
        if trainer.world_size <= 1:
            return acts
        gathered = {}
        for name, local in acts.items():
            full = trainer.strategy.all_gather(local)  # (world, n_local, d), rank order
            gathered[name] = full.reshape(-1, local.shape[1])
        return gathered

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Run one check: forward the probe set, update the references, and return the
        readings (keys relative to ``stability/``). Called on every rank together."""
        if self._inputs is None:
            self._prepare_probe(trainer)
        acts = self._gather(trainer, self._capture(pl_module))
        values: dict[str, float] = {}
        consecutive: list[float] = []
        row: dict[str, Any] = {"step": int(trainer.global_step), "cka": [], "cka_initial": []}
        for name in self.layer_names:
            x = acts[name]
            rep = Representation.of(x)
            values[f"act/{name}/rms"] = float(x.square().mean().sqrt())
            if name in self._relu_like:
                values[f"act/{name}/dead_fraction"] = float((x.amax(dim=0) <= 0).double().mean())
            previous = self._previous.get(name)
            if previous is not None:
                cka = float(representation_cka(previous.to(x.device), rep))
                initial = float(representation_cka(self._initial[name].to(x.device), rep))
                values[f"cka/{name}"] = cka
                values[f"cka_initial/{name}"] = initial
                consecutive.append(cka)
                row["cka"].append(cka)
                row["cka_initial"].append(initial)
            stored = rep.to("cpu")
            self._previous[name] = stored
            self._initial.setdefault(name, stored)
        if consecutive:
            values["cka/min"] = min(consecutive)
            self.history = [*self.history, row][-self.max_history :]
        self.num_checks += 1
        self.last_check_step = int(trainer.global_step)
        return values

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool) -> None:
        if self.is_set_aside("drift"):
            return
        try:
            values = self.measure(trainer, pl_module)
        except Exception as error:
            self._cannot_measure(error)
            return
        self.publish(trainer, pl_module, values, log=log)

    def _cannot_measure(self, error: Exception) -> None:
        # The probe set or the model's forward does not fit this monitor (a batch whose
        # input it cannot find, an iterable dataset, a forward that takes something else):
        # the run does not depend on it.
        self.step_aside(
            "drift",
            f"cannot measure representation drift ({type(error).__name__}: {error}); the "
            "stability/cka/* and stability/act/* readings are off for this run. Pass "
            "probe_inputs=<what pl_module(...) takes> or input_fn=lambda batch: <that>.",
        )

    # ----------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._prepare_probe(trainer)
        except Exception as error:
            self._cannot_measure(error)
            return
        if not self._previous:  # a resumed run keeps its references
            self._check(trainer, pl_module, log=False)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps is not None
            and step % self.every_n_steps == 0
            and step != self.last_check_step
        ):
            self._check(trainer, pl_module, log=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if due and trainer.global_step != self.last_check_step:
            self._check(trainer, pl_module, log=True)
        if self.heatmap and trainer.is_global_zero and self.history:
            self._log_heatmap(trainer)

    def _log_heatmap(self, trainer: pl.Trainer) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        figure = cka_heatmap(self.layer_names, self.history)
        for logger in loggers:
            logger.experiment.add_figure(
                "stability/cka_heatmap", figure, global_step=trainer.global_step, close=False
            )

    # ----------------------------------------------------------------------- resume
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=self.layers,
            layer_types=self.layer_types,
            source=self.source,
            every_n_epochs=self.every_n_epochs,
            every_n_steps=self.every_n_steps,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "layer_names": list(self.layer_names),
            "probe_indices": None if self.probe_indices is None else list(self.probe_indices),
            "num_checks": self.num_checks,
            "last_check_step": self.last_check_step,
            "history": [dict(row) for row in self.history],
            "initial": {n: r.to_state() for n, r in self._initial.items()},
            "previous": {n: r.to_state() for n, r in self._previous.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_indices = state_dict.get("probe_indices")
        self.num_checks = int(state_dict.get("num_checks", 0))
        self.last_check_step = int(state_dict.get("last_check_step", -1))
        self.history = list(state_dict.get("history", []))
        saved_layers = list(state_dict.get("layer_names", []))
        if self.layer_names and saved_layers != self.layer_names:
            # Heat-map rows are per layer; layers new to this run start their own baseline.
            rank_zero_warn(
                f"RepresentationDriftMonitor: the checkpoint watched {saved_layers}, this run "
                f"watches {self.layer_names}; the CKA history is dropped"
            )
            self.history = []
        self._initial = {
            n: Representation.from_state(s) for n, s in state_dict.get("initial", {}).items()
        }
        self._previous = {
            n: Representation.from_state(s) for n, s in state_dict.get("previous", {}).items()
        }
        self._inputs = None  # redrawn from probe_indices for this run's rank layout


def _num_samples(inputs: Any) -> int:
    tensors: list[Tensor] = []
    apply_to_collection(inputs, Tensor, tensors.append)
    if not tensors:
        raise ValueError("input_fn: the probe inputs contain no tensor")
    return int(tensors[0].shape[0])


def _slice(inputs: Any, start: int, stop: int) -> Any:
    return apply_to_collection(inputs, Tensor, lambda t: t[start:stop])


def cka_heatmap(layer_names: Sequence[str], history: Sequence[Mapping[str, Any]]) -> Any:
    """A matplotlib ``Figure``: layers x checks, CKA to the previous check and to the first.
    Built without pyplot, so no global backend is touched."""
    from matplotlib.figure import Figure

    steps = [row["step"] for row in history]
    fig = Figure(figsize=(4 + 0.25 * len(steps), 1.5 + 0.35 * len(layer_names)))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    image = None
    for ax, key, title in zip(
        axes, ("cka", "cka_initial"), ("CKA to previous check", "CKA to first check")
    ):
        grid = torch.tensor([row[key] for row in history], dtype=torch.float64).T
        image = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(layer_names)), labels=list(layer_names), fontsize=7)
        ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
        ax.set_xticks(ticks, labels=[str(steps[i]) for i in ticks], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    return fig
