"""Representation drift: how far a network's internal representations move between checks,
measured by debiased linear CKA on a fixed probe set, plus activation health. This module
holds the callback (hooks, references, readings, checkpoint state); which layers it
watches is :mod:`~lightning_stability.probes.layer_selection`'s, the probe set
:mod:`~lightning_stability.probes.drift_probe_set`'s, how activations are read
:mod:`~lightning_stability.probes.activation_capture`'s, when it checks
:mod:`~lightning_stability.probes.drift_schedule`'s and the heat map
:mod:`~lightning_stability.probes.cka_heatmap`'s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_stability.configuration import regroup
from lightning_stability.estimators.cka import Representation, representation_cka
from lightning_stability.probes.activation_capture import ActivationCapture, LayerCapture
from lightning_stability.probes.base import (
    MANUAL_OPTIMIZATION,
    NoProbeLoss,
    StabilityProbe,
)
from lightning_stability.probes.cka_heatmap import cka_heatmap as cka_heatmap
from lightning_stability.probes.cka_heatmap import log_heatmap
from lightning_stability.probes.config import (
    DRIFT_FLAT_ALIASES,
    DriftCadence,
    DriftLimits,
    DriftProbe,
)
from lightning_stability.probes.drift_probe_set import (
    InputFn,
    default_input_fn,
    draw_indices,
    local_batch,
    source_loader,
)
from lightning_stability.probes.drift_schedule import (
    checks_by_epoch,
    epoch_check_due,
    step_check_due,
)
from lightning_stability.probes.layer_selection import default_layers as default_layers
from lightning_stability.probes.layer_selection import resolve_layers
from lightning_stability.probes.parts import Kept
from lightning_stability.vocabulary import (
    CKA_MIN,
    activation_key,
    check_positive_int,
    cka_initial_key,
    cka_key,
    reading_name,
)

__all__ = ["InputFn", "RepresentationDriftMonitor", "default_input_fn"]


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

    # settings and state held by the activation capture
    max_features = Kept("capture", "max_features")
    chunk_size = Kept("capture", "chunk_size")
    seed = Kept("capture", "seed")
    _hashing = Kept("capture", "hashing")
    _batch_idx = Kept("capture", "batch_idx")

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
        self.capture = ActivationCapture(limits.max_features, limits.chunk_size, probe.seed)
        """Runs the probe set and reads the watched layers."""
        self.probe_size = probe.probe_size
        self.source = probe.source
        self.every_n_epochs = cadence.every_n_epochs
        self.every_n_steps = cadence.every_n_steps
        self.min_steps = cadence.min_steps
        self.probe_inputs = probe_inputs
        self.input_fn = input_fn
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
        self._heatmap_checks = 0

    @property
    def _inputs(self) -> Any:
        """The local probe batch (or model input on the ``forward`` path)."""
        return self._probe

    # ----------------------------------------------------------------------- selection
    def _resolve_layers(self, module: nn.Module) -> list[str]:
        names, self.capture.relu_like = resolve_layers(
            module, self.layers, self.layer_types, self.max_layers
        )
        return names

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
        loader = source_loader(trainer, self.source, self._through_step)
        if self.probe_indices is None:
            size = len(loader.dataset)  # type: ignore[arg-type]
            self.probe_indices = draw_indices(size, self.probe_size, self.seed, world)
        if len(self.probe_indices) < 4 * world:
            raise ValueError(
                f"probe_size: the probe set needs at least 4 samples per rank, got "
                f"{len(self.probe_indices)} on {world} rank(s)"
            )
        batch, self._probe_n = local_batch(loader, self.probe_indices, rank, world)
        self._probe = batch if self._through_step else (self.input_fn or default_input_fn)(batch)

    # ----------------------------------------------------------------------- measuring
    def _narrow(self, name: str, x: Tensor) -> Tensor:
        """``x`` (``(n, d)`` float64) with at most ``max_features`` columns
        (:meth:`ActivationCapture.narrow`)."""
        return self.capture.narrow(name, x)

    def _capture(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, LayerCapture]:
        """This rank's share of every watched layer; layers that gave no usable output
        are dropped."""
        layers, unusable = self.capture.capture(
            trainer, pl_module, self.layer_names, self._probe, self._probe_n, self._through_step
        )
        self._drop(trainer, unusable)
        return {n: layers[n] for n in self.layer_names}

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
    ) -> dict[str, LayerCapture]:
        """:meth:`_capture`, with every rank told whether any rank failed, so that no rank
        waits in a collective that another rank will never join."""
        error: Exception | None = None
        layers: dict[str, LayerCapture] = {}
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
            values[reading_name(activation_key(name, "rms"))] = float((sums[0] / sums[1]).sqrt())
            if layer.positive is not None:
                fired = self._sum(trainer, layer.positive)
                dead = float((fired <= 0).double().mean())
                values[reading_name(activation_key(name, "dead_fraction"))] = dead
            rep = Representation.of(x)
            previous = self._previous.get(name)
            if previous is not None:
                cka = float(representation_cka(previous.to(x.device), rep))
                initial = float(representation_cka(self._initial[name].to(x.device), rep))
                values[reading_name(cka_key(name))] = cka
                values[reading_name(cka_initial_key(name))] = initial
                consecutive.append(cka)
                row["cka"].append(cka)
                row["cka_initial"].append(initial)
            stored = rep.to("cpu")
            self._previous[name] = stored
            self._initial.setdefault(name, stored)
        if consecutive:
            values[reading_name(CKA_MIN)] = min(consecutive)
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
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.by_epoch = checks_by_epoch(trainer, self.every_n_epochs, self.every_n_steps)
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
        if step_check_due(
            trainer.global_step, self.by_epoch, self.every_n_steps, self.last_check_step
        ):
            self._check(trainer, pl_module, log=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if epoch_check_due(
            trainer, self.by_epoch, self.every_n_epochs, self.min_steps, self.last_check_step
        ):
            self._check(trainer, pl_module, log=True)
        if (
            self.heatmap
            and trainer.is_global_zero
            and self.history
            and self.num_checks != self._heatmap_checks
        ):
            self._heatmap_checks = self.num_checks
            log_heatmap(trainer, self.layer_names, self.history)

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
