"""Representation drift: how far a network's internal representations move between checks,
measured by debiased linear CKA on a fixed probe set, plus activation health."""

from __future__ import annotations

import fnmatch
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, default_collate
from typing_extensions import override

from lightning_stability.configuration import regroup
from lightning_stability.estimators.cka import Representation, representation_cka
from lightning_stability.estimators.isolation import (
    compute_precision,
    frozen_rng,
    preserved_state,
    resolve_compute_dtype,
)
from lightning_stability.probes.base import (
    MANUAL_OPTIMIZATION,
    NoProbeLoss,
    StabilityProbe,
    module_loss,
)
from lightning_stability.probes.config import (
    DRIFT_FLAT_ALIASES,
    DriftCadence,
    DriftLimits,
    DriftProbe,
)
from lightning_stability.vocabulary import check_positive_int

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
# batch_idx values tried for a probe step that skips its batch by index
_BATCH_IDX_TRIES = 3


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


def _watchable(module: nn.Module) -> bool:
    """Whether a block's output is a representation: not dropout/identity (their eval
    output repeats the previous layer's), a loss module or a metric (the step calls them
    on its outputs; they return numbers, not features)."""
    if isinstance(module, (*_SKIPPED_BY_DEFAULT, nn.modules.loss._Loss)):
        return False
    return not type(module).__module__.startswith("torchmetrics")


def _is_stack(module: nn.Module) -> bool:
    """A block whose output is that of its own sub-blocks: a Sequential, or a module
    holding a ModuleList (a stack of layers, as in ``nn.TransformerEncoder``)."""
    if isinstance(module, nn.Sequential):
        return True
    return any(isinstance(c, nn.ModuleList) for c in module.children())


def default_layers(module: nn.Module, max_layers: int) -> list[str]:
    """The outputs of the top-level blocks, whose last is the network's output or its last
    hidden layer: descend through single-child wrappers, skip dropout/identity, loss
    modules and metrics, open stacks of blocks (Sequentials, modules holding a
    ModuleList) while the total stays within ``max_layers``, and keep at most
    ``max_layers`` evenly spaced (the last always)."""
    prefix, root = "", module
    children = [(n, m) for n, m in _expand(prefix, root) if _watchable(m)]
    while len(children) == 1 and next(children[0][1].children(), None) is not None:
        prefix, root = children[0][0] + ".", children[0][1]
        children = [(n, m) for n, m in _expand(prefix, root) if _watchable(m)]
    opened = True
    while opened:
        opened = False
        for i, (name, child) in enumerate(children):
            if not _is_stack(child):
                continue
            inner = [(f"{name}.{n}", m) for n, m in _expand("", child) if _watchable(m)]
            if inner and len(children) - 1 + len(inner) <= max_layers:
                children = children[:i] + inner + children[i + 1 :]
                opened = True
                break
    names = [n for n, _ in children]
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

    A fixed probe batch (``probe_size`` samples drawn once, with a private generator, from
    the training or validation dataset) is run through the module's own ``training_step``
    with forward hooks on the watched layers: no ``forward`` and no knowledge of the batch
    layout are needed, so a module that calls ``self.net(x)`` inside ``training_step`` on a
    dict batch is measured as it is. The batch goes through the module's batch-transfer
    hooks, and the step runs in eval mode under ``torch.no_grad`` with logging muted, the
    RNG seeded with ``seed`` (a step that draws noise or masks sees the same draws at every
    check) and everything it could touch put back: modes, buffers, ``.grad`` and RNG state,
    so training is bit-identical with and without the monitor. With ``input_fn`` or
    ``probe_inputs`` the probe runs ``pl_module(inputs)`` instead; a module with manual
    optimization (whose ``training_step`` steps the optimizers) needs one of them.

    Checks are made at the start of training, at the end of every ``every_n_epochs``-th
    epoch that ends at least ``min_steps`` optimizer steps after the previous check, and at
    the end of the last epoch (so that every run has CKA to its start). Where epochs are
    longer than ``every_n_steps`` steps (or have no known length), checks are made every
    ``every_n_steps`` steps instead of at epoch ends. Both keep checks about evenly spaced,
    so that CKA to the previous check always spans a similar stretch of training. A check
    costs about one forward pass of the probe batch plus the CKA of each layer, on the
    order of a training step, so checks hundreds of steps apart keep its share of training
    time small; ``python -m benchmarks.drift`` reports that share at the default cadence
    (``benchmarks/RESULTS.md``).

    Where the probe batch cannot be drawn or run (an iterable dataset, a ``training_step``
    that fails on it, no watched layer producing a per-sample output) it warns once, saying
    why and what to pass, and measures nothing more in this fit; training goes on. A
    watched layer that the step never calls, or whose output has no per-sample leading
    dimension, is dropped with a warning while the others are measured.

    Readings (debiased linear CKA, Kornblith et al. 2019 with the unbiased HSIC of Song
    et al. 2012; drift = 1 - CKA):

    - ``stability/cka/<layer>``: CKA to the previous check; ``stability/cka/min`` over layers.
    - ``stability/cka_initial/<layer>``: CKA to the first check (start of training).
    - ``stability/act/<layer>/rms``: root mean square of the activations.
    - ``stability/act/<layer>/dead_fraction``: fraction of units (flattened features)
      never positive on the probe set; only for ReLU-like layers (or blocks ending in one).

    A layer's output is flattened per sample (``(n, ...)`` -> ``(n, d)``). A layer wider than
    ``max_features`` is reduced to ``max_features`` features by a fixed signed feature
    hashing (each feature added, with a random sign, to one of ``max_features`` buckets: a
    sparse random projection that keeps inner products in expectation and costs one pass
    over the activations), drawn from ``seed`` and the layer name, so every check and every
    rank uses the same projection. It bounds the probe's memory at an approximation: where
    a layer's features are dominated by unstructured noise, which the debiased estimator
    discounts in the full width, the hashed CKA reads lower. ``rms`` and ``dead_fraction``
    are read from the full activations.

    With a TensorBoard logger, a layer x check heat map of both CKAs is added as the image
    ``stability/cka_heatmap`` at the end of each epoch that had a check. Per layer only
    what CKA needs is kept (centred Gram matrix when the probe set is smaller than the
    feature count, centred activations otherwise), for the previous and the first check,
    on the CPU in float64.

    Under DDP every rank runs its own shard of the probe batch (its size is rounded down to
    a multiple of the world size) and the activations are all-gathered, so every rank
    computes the CKA of the union, identical to one process holding the whole probe set.

    Args:
        layers: module names (as in ``named_modules``) or glob patterns (``"blocks.*"``).
        layer_types: module class names to select (``["ReLU", "Conv2d"]``), added to
            ``layers``. With neither, the top-level blocks, whose last is the output or the
            last hidden layer (see :func:`default_layers`; loss modules and metrics skipped).
        max_layers: cap on the default selection (default 8).
        cadence: when it checks: every n epochs, every n steps, and the fewest steps
            between epoch-end checks (:class:`~lightning_stability.probes.config.DriftCadence`).
        probe: the fixed probe batch: its size, source and seed
            (:class:`~lightning_stability.probes.config.DriftProbe`).
        limits: features kept per layer, samples per probe step, checks kept for the heat
            map (:class:`~lightning_stability.probes.config.DriftLimits`).
        probe_inputs: a user probe set for the ``forward`` path: the model input itself
            (first dimension samples).
        input_fn: maps a collated batch to what ``pl_module(...)`` takes; when given, the
            probe runs ``pl_module(input_fn(batch))`` instead of ``training_step``.
        heatmap: log the CKA heat map to TensorBoard (default ``True``).
        **deprecated: the flat keywords of the previous release (``probe_size=64``,
            ``every_n_steps=1000``, ...), folded into their group with a
            ``DeprecationWarning`` that names it.

    Example::

        from lightning.pytorch import Trainer
        from lightning_stability import RepresentationDriftMonitor

        from lightning_stability.probes.config import DriftCadence

        drift = RepresentationDriftMonitor(
            layers=["encoder.*"], cadence=DriftCadence(every_n_steps=500)
        )
        trainer = Trainer(callbacks=[drift])
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        layer_types: list[str] | None = None,
        max_layers: int = 8,
        cadence: DriftCadence | None = None,
        probe: DriftProbe | None = None,
        limits: DriftLimits | None = None,
        probe_inputs: Tensor | None = None,
        input_fn: InputFn | None = None,
        heatmap: bool = True,
        **deprecated: Any,
    ) -> None:
        super().__init__()
        groups = regroup(
            "RepresentationDriftMonitor",
            deprecated,
            DRIFT_FLAT_ALIASES,
            {
                "cadence": (DriftCadence, cadence),
                "probe": (DriftProbe, probe),
                "limits": (DriftLimits, limits),
            },
        )
        cadence, probe, limits = groups["cadence"], groups["probe"], groups["limits"]
        check_positive_int(max_layers, "max_layers")
        if probe_inputs is not None and (
            not isinstance(probe_inputs, Tensor) or probe_inputs.dim() < 1
        ):
            raise ValueError("probe_inputs must be None or a tensor whose first dim is samples")
        if probe_inputs is not None and probe_inputs.shape[0] < 4:
            raise ValueError(
                f"probe_inputs must hold at least 4 samples (debiased CKA), got "
                f"{probe_inputs.shape[0]}"
            )
        if input_fn is not None and not callable(input_fn):
            raise ValueError(f"input_fn must be None or a callable, got {input_fn!r}")
        self.cadence, self.probe, self.limits = cadence, probe, limits
        self.layers = list(layers) if layers is not None else None
        self.layer_types = list(layer_types) if layer_types is not None else None
        self.max_layers = max_layers
        self.probe_size = probe.probe_size
        self.source = probe.source
        self.seed = probe.seed
        self.every_n_epochs = cadence.every_n_epochs
        self.every_n_steps = cadence.every_n_steps
        self.min_steps = cadence.min_steps
        self.probe_inputs = probe_inputs
        self.input_fn = input_fn
        self.max_features = limits.max_features
        self.chunk_size = limits.chunk_size
        self.heatmap = heatmap
        self.max_history = limits.max_history

        self.layer_names: list[str] = []
        self.dropped_layers: list[str] = []
        self.probe_indices: list[int] | None = None
        self.num_checks = 0
        self.last_check_step = -1
        self.history: list[dict[str, Any]] = []
        self.by_epoch = True
        """Whether checks follow epoch ends (``True``) or ``every_n_steps`` (set at fit start)."""
        self._probe: Any = None
        self._probe_n = 0
        self._through_step = True
        self._initial: dict[str, Representation] = {}
        self._previous: dict[str, Representation] = {}
        self._relu_like: set[str] = set()
        self._hashing: dict[tuple[str, int, str], tuple[Tensor, Tensor]] = {}
        self._batch_idx = 0
        self._heatmap_checks = 0

    @property
    def _inputs(self) -> Any:
        """The local probe batch (or model input on the ``forward`` path)."""
        return self._probe

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
        self.dropped_layers = []

    def _uses_training_step(self, pl_module: pl.LightningModule | None) -> bool:
        if self.input_fn is not None or self.probe_inputs is not None:
            return False
        if pl_module is not None and not pl_module.automatic_optimization:
            raise NoProbeLoss(MANUAL_OPTIMIZATION)
        return True

    # ----------------------------------------------------------------------- probe set
    def _source_loader(self, trainer: pl.Trainer) -> DataLoader:
        source = self.source
        if source == "auto":
            source = "train" if self._through_step else "val"
        loader = _loader_of(trainer.val_dataloaders) if source == "val" else None
        loader = loader or _loader_of(trainer.train_dataloader)
        if loader is None:
            raise ValueError("no DataLoader to draw the probe set from; pass probe_inputs")
        if isinstance(loader.dataset, IterableDataset):
            raise ValueError(
                "the dataset is iterable, so a fixed probe set cannot be drawn by index; pass "
                "probe_inputs (with input_fn's forward path)"
            )
        return loader

    def _prepare_probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule | None = None
    ) -> None:
        self._through_step = self._uses_training_step(pl_module)
        world, rank = trainer.world_size, trainer.global_rank
        if self.probe_inputs is not None:
            total = self.probe_inputs.shape[0] // world * world
            self._probe = self.probe_inputs[:total][rank::world]
            self._probe_n = int(self._probe.shape[0])
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
        local = self.probe_indices[rank::world]
        # Datasets with random transforms draw from the global RNG.
        with frozen_rng():
            batch = collate([dataset[i] for i in local])
        self._probe_n = len(local)
        self._probe = batch if self._through_step else (self.input_fn or default_input_fn)(batch)

    # ----------------------------------------------------------------------- measuring
    def _narrow(self, name: str, x: Tensor) -> Tensor:
        """``x`` (``(n, d)`` float64) with at most ``max_features`` columns: wider layers
        are summed into ``max_features`` buckets with fixed random signs."""
        d = int(x.shape[1])
        if d <= self.max_features:
            return x
        key = (name, d, str(x.device))
        if key not in self._hashing:
            # Seeded by the layer name as well, so that two layers of one width do not
            # share collisions; the same on every rank and every check.
            generator = torch.Generator().manual_seed(
                self.seed * 1_000_003 + zlib.crc32(name.encode())
            )
            buckets = torch.randint(0, self.max_features, (d,), generator=generator)
            signs = torch.randint(0, 2, (d,), generator=generator).double() * 2 - 1
            self._hashing[key] = (buckets.to(x.device), signs.to(x.device))
        buckets, signs = self._hashing[key]
        return x.new_zeros(x.shape[0], self.max_features).index_add_(1, buckets, x * signs)

    def _run_probe(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dtype: torch.dtype,
        chunk: Any,
        batch_idx: int,
    ) -> bool:
        """Run one piece of the probe set; whether the step returned a loss (always
        ``True`` on the ``forward`` path)."""

        def cast(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        if not self._through_step:
            pl_module(
                apply_to_collection(move_data_to_device(chunk, pl_module.device), Tensor, cast)
            )
            return True
        # The batch-transfer hooks the step's batches went through (device moves,
        # normalisation in on_after_batch_transfer).
        batch = (
            trainer.strategy.batch_to_device(chunk)
            if trainer.lightning_module is pl_module
            else chunk
        )
        try:
            module_loss(pl_module, apply_to_collection(batch, Tensor, cast), batch_idx)
        except NoProbeLoss:
            return False
        return True

    def _capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, _Layer]:
        """This rank's share of every watched layer: its features (at most
        ``max_features`` wide) and the raw statistics the health readings need."""
        named = dict(pl_module.named_modules())
        layers: dict[str, _Layer] = {}
        unusable: dict[str, str] = {}
        piece: dict[str, Tensor] = {}
        samples = [0]

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                # A layer called more than once per step (weight sharing, two views)
                # contributes its first call, the same one at every check.
                if name in piece or name in unusable:
                    return
                tensor = _first_tensor(output)
                n = samples[0]
                if tensor is None or tensor.dim() == 0 or tensor.shape[0] % n:
                    shape = None if tensor is None else tuple(tensor.shape)
                    unusable[name] = f"its output {shape} has no leading dimension of {n} samples"
                    return
                piece[name] = tensor.detach().reshape(n, -1).double()

            return hook

        dtype = resolve_compute_dtype(list(pl_module.parameters()), None)
        handles = [named[n].register_forward_hook(hook_for(n)) for n in self.layer_names]
        try:
            with (
                preserved_state(pl_module, train=False),
                compute_precision(pl_module, dtype),
                torch.no_grad(),
            ):
                for chunk, n in _chunks(self._probe, self._probe_n, self.chunk_size):
                    samples[0] = n
                    self._run_chunk(trainer, pl_module, dtype, chunk, piece)
                    for name in self.layer_names:
                        if name in piece:
                            layers.setdefault(name, _Layer()).add(
                                piece[name],
                                self._narrow(name, piece[name]),
                                name in self._relu_like,
                            )
                        elif name in layers:
                            unusable[name] = "it ran for some probe chunks but not others"
        finally:
            for handle in handles:
                handle.remove()
        for name in self.layer_names:
            if name not in layers and name not in unusable:
                unusable[name] = (
                    "the probe's training_step never called it"
                    if self._through_step
                    else "the probe forward never called it"
                )
        self._drop(trainer, unusable)
        return {n: layers[n] for n in self.layer_names}

    def _run_chunk(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dtype: torch.dtype,
        chunk: Any,
        piece: dict[str, Tensor],
    ) -> None:
        """Run ``chunk`` until the hooks filled ``piece``: a step that skips a batch by its
        ``batch_idx`` (returning no loss and calling no watched layer) is tried with the
        next index, and the index that worked is kept for every later check."""
        first = self._batch_idx
        for batch_idx in range(first, first + _BATCH_IDX_TRIES):
            piece.clear()
            # A step that draws noise or masks (augmentation, masked modelling) sees the
            # same draws at every check, so CKA compares like with like.
            _seed_generators(pl_module, self.seed)
            returned = self._run_probe(trainer, pl_module, dtype, chunk, batch_idx)
            if returned or piece:
                self._batch_idx = batch_idx
                return

    def _drop(self, trainer: pl.Trainer, unusable: Mapping[str, str]) -> None:
        """Stop watching ``unusable`` layers (name -> why), warning once; raise when none
        is left. Decided on every rank alike (same shapes, same code)."""
        if not unusable:
            return
        keep = [n for n in self.layer_names if n not in unusable]
        if not keep:
            reasons = "; ".join(f"{n}: {why}" for n, why in unusable.items())
            raise ValueError(f"no watched layer gave per-sample activations ({reasons})")
        self.warn_once(
            "dropped:" + ",".join(sorted(unusable)),
            "stopped watching "
            + "; ".join(f"{n!r} ({why})" for n, why in unusable.items())
            + f"; still watching {keep}. Pass layers=[...] to choose others.",
        )
        columns = [i for i, n in enumerate(self.layer_names) if n not in unusable]
        for row in self.history:
            for key in ("cka", "cka_initial"):
                if len(row[key]) == len(self.layer_names):
                    row[key] = [row[key][i] for i in columns]
        for name in unusable:
            self._previous.pop(name, None)
            self._initial.pop(name, None)
        self.dropped_layers = [*self.dropped_layers, *unusable]
        self.layer_names = keep

    def _capture_on_all_ranks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, _Layer]:
        """:meth:`_capture`, with every rank told whether any rank failed, so that no rank
        waits in a collective that another rank will never join."""
        error: Exception | None = None
        layers: dict[str, _Layer] = {}
        try:
            layers = self._capture(trainer, pl_module)
        except Exception as caught:
            error = caught
        agreed = trainer.world_size <= 1 or trainer.strategy.reduce_boolean_decision(
            error is None, all=True
        )
        if not agreed:
            raise error or RuntimeError("another rank could not run the probe batch")
        if error is not None:
            raise error
        return layers

    def _gather(self, trainer: pl.Trainer, local: Tensor) -> Tensor:
        if trainer.world_size <= 1:
            return local
        full = trainer.strategy.all_gather(local)  # (world, n_local, d), rank order
        return full.reshape(-1, local.shape[1])

    def _sum(self, trainer: pl.Trainer, local: Tensor) -> Tensor:
        if trainer.world_size <= 1:
            return local
        return trainer.strategy.reduce(local.clone(), reduce_op="sum")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Run one check: run the probe batch, update the references, and return the
        readings (keys relative to ``stability/``). Called on every rank together."""
        if self._probe is None:
            self._prepare_probe(trainer, pl_module)
        captured = self._capture_on_all_ranks(trainer, pl_module)
        values: dict[str, float] = {}
        consecutive: list[float] = []
        row: dict[str, Any] = {"step": int(trainer.global_step), "cka": [], "cka_initial": []}
        for name in self.layer_names:
            layer = captured[name]
            x = self._gather(trainer, torch.cat(layer.features))
            sums = self._sum(trainer, layer.sums)
            values[f"act/{name}/rms"] = float((sums[0] / sums[1]).sqrt())
            if layer.positive is not None:
                fired = self._sum(trainer, layer.positive)
                values[f"act/{name}/dead_fraction"] = float((fired <= 0).double().mean())
            rep = Representation.of(x)
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
            if len(consecutive) == len(self.layer_names):
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
        # The probe batch or the module does not fit this monitor (an iterable dataset, a
        # training_step that fails on the probe batch, layers without per-sample
        # outputs): the run does not depend on it.
        if self._through_step:
            hint = (
                "Pass input_fn=lambda batch: <what pl_module(...) takes> to measure through "
                "pl_module(...) instead of training_step, or layers=[...]."
            )
        else:
            hint = "Pass probe_inputs=<what pl_module(...) takes> or input_fn=lambda batch: <that>."
        self.step_aside(
            "drift",
            f"cannot measure representation drift ({type(error).__name__}: {error}); the "
            f"stability/cka/* and stability/act/* readings are off for this run. {hint}",
        )

    # ----------------------------------------------------------------------- hooks
    def _checks_by_epoch(self, trainer: pl.Trainer) -> bool:
        if not self.every_n_epochs:
            return False
        if self.every_n_steps is None:
            return True
        steps = _steps_per_epoch(trainer)
        return steps is not None and self.every_n_epochs * steps <= self.every_n_steps

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.by_epoch = self._checks_by_epoch(trainer)
        try:
            self._prepare_probe(trainer, pl_module)
        except Exception as error:
            self._cannot_measure(error)
            return
        if not self._previous:  # a resumed run keeps its references
            self._check(trainer, pl_module, log=False)

    @override
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
            not self.by_epoch
            and self.every_n_steps is not None
            and step % self.every_n_steps == 0
            and step != self.last_check_step
        ):
            self._check(trainer, pl_module, log=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        due = (
            self.by_epoch
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and step - self.last_check_step >= self.min_steps
        )
        if (due or _last_epoch(trainer)) and step != self.last_check_step:
            self._check(trainer, pl_module, log=True)
        if (
            self.heatmap
            and trainer.is_global_zero
            and self.history
            and self.num_checks != self._heatmap_checks
        ):
            self._heatmap_checks = self.num_checks
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

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "layer_names": list(self.layer_names),
            "dropped_layers": list(self.dropped_layers),
            "probe_indices": None if self.probe_indices is None else list(self.probe_indices),
            "num_checks": self.num_checks,
            "last_check_step": self.last_check_step,
            "history": [dict(row) for row in self.history],
            "initial": {n: r.to_state() for n, r in self._initial.items()},
            "previous": {n: r.to_state() for n, r in self._previous.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_indices = state_dict.get("probe_indices")
        self.num_checks = int(state_dict.get("num_checks", 0))
        self.last_check_step = int(state_dict.get("last_check_step", -1))
        self.history = list(state_dict.get("history", []))
        dropped = [str(n) for n in state_dict.get("dropped_layers", [])]
        if self.layer_names and dropped:
            # Layers the run found unusable stay dropped (they were resolved again in setup).
            self.layer_names = [n for n in self.layer_names if n not in dropped]
            self.dropped_layers = dropped
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
        self._probe = None  # redrawn from probe_indices for this run's rank layout


class _Layer:
    """What one check keeps of one layer on this rank: narrowed features per chunk, the
    sum of squares and count of the raw activations, and which raw units ever fired."""

    def __init__(self) -> None:
        self.features: list[Tensor] = []
        self.sums: Tensor = torch.zeros(2, dtype=torch.float64)
        self.positive: Tensor | None = None

    def add(self, raw: Tensor, narrowed: Tensor, relu_like: bool) -> None:
        self.features.append(narrowed)
        self.sums = self.sums.to(raw.device) + torch.stack(
            [raw.square().sum(), raw.new_tensor(float(raw.numel()))]
        )
        if relu_like:
            fired = (raw > 0).any(dim=0).double()
            self.positive = fired if self.positive is None else self.positive.maximum(fired)


def _steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps in one training epoch, ``None`` when unknown (an iterable loader)."""
    batches = trainer.num_training_batches
    if not isinstance(batches, int) and not (isinstance(batches, float) and math.isfinite(batches)):
        return None
    return max(1, math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches)))


def _last_epoch(trainer: pl.Trainer) -> bool:
    """Whether the epoch ending now is the fit's last (max_epochs or max_steps reached)."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    return max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps


def _seed_generators(module: nn.Module, seed: int) -> None:
    """Seed the CPU generator and those of the CUDA devices ``module`` lives on (the ones
    :func:`preserved_state` restores), and no other."""
    torch.random.default_generator.manual_seed(seed)
    for device in {p.device for p in module.parameters()}:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)


def _chunks(batch: Any, n: int, size: int) -> Iterator[tuple[Any, int]]:
    """Pieces of at most ``size`` samples of a batch of ``n``; the whole batch when it
    holds anything but tensors of ``n`` samples (which could not be split alike)."""
    splittable = all(
        isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n for t in _leaves(batch)
    )
    if n <= size or not splittable:
        yield batch, n
        return
    for start in range(0, n, size):
        stop = min(start + size, n)
        piece = slice(start, stop)
        yield apply_to_collection(batch, Tensor, lambda t, s=piece: t[s]), stop - start


def _leaves(collection: Any) -> Iterator[Any]:
    if isinstance(collection, Mapping):
        for value in collection.values():
            yield from _leaves(value)
    elif isinstance(collection, (list, tuple)):
        for item in collection:
            yield from _leaves(item)
    else:
        yield collection


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
