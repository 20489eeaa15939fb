"""The curvature probe: a Lightning callback that measures the curvature of the loss
landscape during training (top Hessian eigenvalues, the edge-of-stability ratio,
preconditioned sharpness for Adam, cheap directional and critical sharpness readings) and
publishes it. When it measures is :mod:`~lightning_stability.probes.curvature_schedule`'s,
how is :mod:`~lightning_stability.probes.curvature_measurement`'s; this module holds the
hooks, the probe batches, the checkpoint state and the publishing."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_stability.configuration import regroup
from lightning_stability.estimators.isolation import frozen_rng
from lightning_stability.estimators.sharding import any_sharded, flat_sharded
from lightning_stability.probes.base import (
    MANUAL_OPTIMIZATION,
    LossFn,
    NoProbeLoss,
    Reading,
    StabilityProbe,
    detach_batch,
    logs_this_step,
    needs_loss_fn,
    step_loss,
)
from lightning_stability.probes.config import (
    SHARPNESS_FLAT_ALIASES,
    SharpnessCadence,
    SharpnessEstimator,
    SharpnessMeasures,
)
from lightning_stability.probes.curvature_measurement import CurvatureMeasurement, trainable
from lightning_stability.probes.curvature_schedule import (
    CurvatureSchedule,
    closer_watch_requested,
)
from lightning_stability.probes.curvature_subset import (
    HVP_MODES,
    HvpMode,
    check_patterns,
    select_parameters,
    unmatched_patterns,
)
from lightning_stability.probes.edge import EdgePrediction, step_lr
from lightning_stability.probes.parts import Kept
from lightning_stability.probes.probe_batches import check_probe_loader, is_plain, to_cpu
from lightning_stability.probes.spectral_density import density_figure as density_figure
from lightning_stability.vocabulary import (
    SHARPNESS_DIRECTIONAL_RATIO,
    SHARPNESS_EOS_RATIO,
    SHARPNESS_LR_CHANGE,
    SHARPNESS_NONFINITE,
    SHARPNESS_PREDICTED_RATIO,
    check_positive_int,
    reading_name,
)

__all__ = ["SharpnessMonitor"]

_EOS_RATIO = reading_name(SHARPNESS_EOS_RATIO)
_DIRECTIONAL_RATIO = reading_name(SHARPNESS_DIRECTIONAL_RATIO)


class SharpnessMonitor(StabilityProbe):
    """Measures the curvature of the training loss on a fixed probe batch.

    Every ``every_n_steps`` optimizer steps (a *check*) it runs warm-started Lanczos
    (Lanczos 1950) on the Hessian of the module's own loss and publishes, under
    ``stability/sharpness/``:

    * ``lambda_max``: top Hessian eigenvalue (``lambda_<i>`` for ``i < k`` when ``k > 1``);
    * ``eos_ratio``: distance to the edge of stability (Cohen et al. 2021), 1.0 = the edge.
      SGD: ``lambda_max / edge`` with ``edge = 2 (1 + mu) / ((1 - dampening) lr)``
      (``lambda_max * lr / 2`` without momentum; Nesterov uses ``2 (1 + mu) / ((1 + 2 mu)
      lr)``); with per-group learning rates the smallest edge is used (an upper bound).
      Adam/AdamW: the top eigenvalue of ``s^1/2 H s^1/2`` with
      ``s = 1 / ((sqrt(v_hat) + eps) * 2 (1 + beta1) / ((1 - beta1) lr))`` per parameter
      (Cohen et al. 2022), i.e. ``preconditioned * (1 - beta1) lr / (2 (1 + beta1))``;
    * ``preconditioned`` (Adam/AdamW only): ``lambda_max(D^-1 H)``, ``D = sqrt(v_hat) + eps``
      from the optimizer's second-moment state, in units of ``1/lr``; its edge is
      ``2 (1 + beta1) / ((1 - beta1) lr)`` = ``38 / lr`` at ``beta1 = 0.9``;
    * ``shift``: the sine of the largest principal angle between this check's and the
      previous valid check's top-``k`` eigenspaces (0 = unchanged, 1 = a direction of one
      is orthogonal to the other; landscape shift,
      :func:`~lightning_stability.estimators.subspace.subspace_shift`); its noise floor on
      a reference model is in ``benchmarks/RESULTS.md``. ``flattening``:
      ``ln(lambda_prev / lambda_max)`` between successive valid checks (positive when the
      landscape flattens; 0.1 is a fall of about 10%);
    * ``trace`` (Hutch++, when ``trace=True``) and ``hvps``: Hessian-vector products the
      check used.

    Validity: a Lanczos reading that did not converge (residual rule of
    :func:`~lightning_stability.estimators.lanczos.lanczos_top_k` within ``max_iter``) and a
    critical sharpness that is undefined (the last update is not a descent direction of
    the probe loss, or its crossing is below the loss's rounding) are published as NaN, and
    ``skipped`` counts them (cumulative); the ratio keys that feed the warning layer
    (``eos_ratio``) are withheld instead of NaN, and ``shift``/``flattening`` compare valid
    checks only.

    Every optimizer step, once a ratio has been measured, it publishes ``predicted_ratio``
    (the latest ``eos_ratio`` or ``directional_ratio`` rescaled to the learning rate the
    optimizer is about to use, :mod:`~lightning_stability.probes.edge`) and ``lr_change``
    (that learning rate over the previous step's). A one-step jump of the learning rate by
    1.5x or more, or growth by 10% since the last reading that takes the predicted ratio
    above 1, moves the next directional reading to this step (at most one such extra
    reading every 10 steps): the edge moves with the learning rate.

    Every ``directional_every_n_steps`` steps (cheaper; no Lanczos) it publishes
    ``directional`` = ``g^T H g / g^T g`` (one product; "batch sharpness", Andreyev &
    Beneventano 2024, which settles at ``2/lr`` under mini-batch SGD; for Adam its crossing
    of ``2/lr`` precedes spikes, Bai et al. 2025), ``directional_ratio`` =
    ``directional / edge`` with the same optimizer edge as ``eos_ratio`` for SGD (so 1.0
    is the edge for both readings; ``directional * lr / 2`` without momentum) and
    ``directional * lr / 2`` for other optimizers (largest group lr), and ``critical``, the
    critical sharpness along the last update ``d = (w_t - w_{t-1}) / lr``: with ``eta_c``
    the smallest step, in learning-rate units, along ``d`` that raises the probe loss
    (Kalra et al. 2026; forward passes only), ``critical = (2 / eta_c) (-d . g) / |d|^2``,
    the curvature along ``d`` that puts the crossing there (loss / parameter^2, as
    ``lambda_max``). For plain gradient descent it is ``2 / eta_c``; on a quadratic it is
    ``d^T H d / d^T d`` for any optimizer, at most ``lambda_max``, so under momentum or
    Adam it is not inflated by the size of the step the optimizer takes. It needs a copy
    of the trainable weights taken just before the optimizer step that precedes a
    directional check (one model's worth of memory, released after the check).

    Probe batch: the first ``num_probe_batches`` training batches for which
    ``training_step`` returned a loss are cached (detached clones, taken in
    ``on_train_batch_start``; the training loader is never iterated by the callback, so
    the data order is untouched) and ``training_step`` is re-run with the ``batch_idx``
    they had, unless ``probe_batch`` or ``probe_dataloader`` is given. A probe loader is
    read once at ``setup`` under a frozen RNG; a shuffled one must bring its own
    ``generator`` (else it is refused), so the probe batch is reproducible and the
    training run's RNG stream is untouched.
    Several probe batches are averaged (the Hessian of their mean loss). Under DDP each
    rank uses its own probe batches and products are averaged over ranks, so every rank
    sees the Hessian of the union.

    Sharded parameters (``DTensor``: FSDP2's ``fully_shard``, e.g. through
    ``ModelParallelStrategy``): double backward does not reach the shards, so products
    are finite differences of gradients (``hvp="auto"``), two forward and backward passes
    each, with the gradients reduce-scattered by the sharding wrapper itself. Lanczos
    vectors are full-length and identical on every rank (up to ``max_iter`` of them per
    eigenproblem, as for one process); ``params=`` bounds them with the subset.

    Resume: the cadence, step counters, previous eigenvectors and last readings are
    checkpointed, and so are the probe batches of a single-process run (when they hold
    only tensors, numbers, strings, lists and dicts), so a resumed run measures the same
    landscape. Under DDP the probe batches are cached afresh after resuming.

    Isolation: measurements run after the optimizer step inside ``preserved_state`` (modes,
    buffers, ``.grad`` and RNG restored) with autocast off and parameters in float32 (or
    float64 when the model is), so the run trains bit-identically with and without it.
    Fused attention kernels have no double backward, so scaled-dot-product attention runs
    its math kernel during a measurement.

    Args:
        cadence: when it measures: steps between Lanczos checks and between directional
            readings, the spectral density's interval, the adaptive cadence
            (:class:`~lightning_stability.probes.config.SharpnessCadence`).
        estimator: how: number of eigenvalues, backend, Lanczos tolerance and cap, warm
            start, dtype, seed (:class:`~lightning_stability.probes.config.SharpnessEstimator`).
        measures: which optional readings it publishes: directional, critical,
            preconditioned, trace (:class:`~lightning_stability.probes.config.SharpnessMeasures`).
        num_probe_batches: training batches cached and averaged. Default 1.
        probe_batch: a fixed batch to use instead of training batches.
        probe_dataloader: a loader whose first ``num_probe_batches`` batches are used.
        loss_fn: ``loss_fn(module, batch) -> scalar`` instead of ``training_step``. Needed
            under manual optimization (whose ``training_step`` steps the optimizers and
            cannot be re-run); without it the curvature readings are off, with a warning.
        train_mode: measure in train mode (BatchNorm with batch statistics, dropout on,
            one fixed dropout mask per measurement): the loss the optimizer descends.
            ``False`` measures the eval-mode loss. Default True.
        params: a curvature subset: parameter-name patterns (``fnmatch`` globs such as
            ``"blocks.11.*"`` or ``"*norm*"``, exact names, or module prefixes such as
            ``"head"``); every reading is then taken on the Hessian block of the
            selected parameters, the others held fixed, so a check's cost and memory are
            bounded by the subset. Its top eigenvalue is a lower bound of the full
            ``lambda_max`` (Cauchy interlacing), equal when the top eigenvector lies in
            the subset; curvature along directions that mix in other parameters is
            missed. A pattern that selects no parameter is a ``ValueError`` at ``setup``.
            ``None`` (default): all trainable parameters.
        hvp: how Hessian-vector products are computed. ``"exact"``: double backward
            (:class:`~lightning_stability.estimators.hvp.HessianOperator`).
            ``"finite_difference"``: central differences of gradients
            (:class:`~lightning_stability.estimators.finite_difference_hvp.FiniteDifferenceHessian`;
            two forward and backward passes per product, error of order the step squared
            times the third derivative plus rounding over the step; with ReLU-like
            activations it also counts units that cross their kink within the step, see
            its docstring). ``"auto"``
            (default): finite differences when the parameters are sharded (``DTensor``,
            as under FSDP2's ``fully_shard``, where double backward does not reach the
            shards) or when double backward fails on the model; exact otherwise.
        **deprecated: the flat keywords of the previous release (``every_n_steps=500``,
            ``k=2``, ``trace=True``, ...; ``every_n_steps`` and ``k`` also positionally),
            folded into their group with a ``DeprecationWarning`` that names it.

    Example::

        from lightning.pytorch import Trainer
        from lightning_stability import SharpnessCadence, SharpnessMonitor

        monitor = SharpnessMonitor(cadence=SharpnessCadence(every_n_steps=500))
        trainer = Trainer(callbacks=[monitor])
    """

    # settings and state held by the schedule (when) and the measurement (how)
    every_n_steps = Kept("schedule", "every_n_steps")
    directional_every_n_steps = Kept("schedule", "directional_every_n_steps")
    adaptive = Kept("schedule", "adaptive")
    ratio_threshold = Kept("schedule", "ratio_threshold")
    adaptive_factor = Kept("schedule", "adaptive_factor")
    recheck_jump = Kept("schedule", "recheck_jump")
    recheck_gap = Kept("schedule", "recheck_gap")
    _interval = Kept("schedule", "interval")
    _directional_interval = Kept("schedule", "directional_interval")
    _next_check = Kept("schedule", "next_check")
    _next_directional = Kept("schedule", "next_directional")
    _recheck_after = Kept("schedule", "recheck_after")
    k = Kept("measurement", "k")
    backend = Kept("measurement", "backend")
    tol = Kept("measurement", "tol")
    max_iter = Kept("measurement", "max_iter")
    warm_start = Kept("measurement", "warm_start")
    dtype = Kept("measurement", "dtype")
    seed = Kept("measurement", "seed")
    critical = Kept("measurement", "critical")
    preconditioned = Kept("measurement", "preconditioned")
    trace = Kept("measurement", "trace")
    trace_samples = Kept("measurement", "trace_samples")
    density_every_n_checks = Kept("measurement", "density_every_n_checks")
    loss_fn = Kept("measurement", "loss_fn")
    train_mode = Kept("measurement", "train_mode")
    _pre_eigvecs = Kept("measurement", "pre_eigvecs")
    _eta_c = Kept("measurement", "eta_c")

    def __init__(
        self,
        cadence: SharpnessCadence | None = None,
        estimator: SharpnessEstimator | None = None,
        measures: SharpnessMeasures | None = None,
        *,
        num_probe_batches: int = 1,
        probe_batch: Any = None,
        probe_dataloader: DataLoader | None = None,
        loss_fn: LossFn | None = None,
        train_mode: bool = True,
        params: list[str] | None = None,
        hvp: HvpMode = "auto",
        **deprecated: Any,
    ) -> None:
        super().__init__()
        if isinstance(cadence, int) and not isinstance(cadence, bool):
            deprecated["every_n_steps"] = cadence  # the old first positional argument
            cadence = None
        if isinstance(estimator, int) and not isinstance(estimator, bool):
            deprecated["k"] = estimator  # the old second positional argument
            estimator = None
        groups = regroup(
            "SharpnessMonitor",
            deprecated,
            SHARPNESS_FLAT_ALIASES,
            {
                "cadence": (SharpnessCadence, cadence),
                "estimator": (SharpnessEstimator, estimator),
                "measures": (SharpnessMeasures, measures),
            },
        )
        cadence, estimator, measures = groups["cadence"], groups["estimator"], groups["measures"]
        check_positive_int(num_probe_batches, "num_probe_batches")
        if hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
        self.params = check_patterns(params)
        self.hvp: HvpMode = hvp
        self._fd_fallback = False
        if probe_batch is not None and probe_dataloader is not None:
            raise ValueError("probe_batch, probe_dataloader: give at most one of them")
        if probe_dataloader is not None:
            check_probe_loader(probe_dataloader)
        self.cadence = cadence
        self.estimator = estimator
        self.measures = measures
        self.schedule = CurvatureSchedule(cadence)
        """When the next check and directional reading are due."""
        self.measurement = CurvatureMeasurement(
            estimator, measures, cadence.density_every_n_checks, loss_fn, train_mode
        )
        """The Lanczos check, edge ratio, directional and critical readings."""
        self.directional = measures.directional
        self.num_probe_batches = num_probe_batches
        self.probe_dataloader = probe_dataloader

        self._fixed_batches = probe_batch is not None
        self._batches: list[Any] = [detach_batch(probe_batch)] if probe_batch is not None else []
        self._batch_idx: list[int] = []  # the batch_idx of each cached training batch
        self._candidate: tuple[Any, int] | None = None
        self._seen_step = -1
        self._world_size = 1
        self.edge = EdgePrediction()

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._world_size = trainer.world_size
        if self.params is not None:
            missing = unmatched_patterns((n for n, _ in pl_module.named_parameters()), self.params)
            if missing:
                names = [n for n, _ in pl_module.named_parameters()]
                shown = names[:20] + (["..."] if len(names) > 20 else [])
                raise ValueError(
                    f"params: pattern(s) {missing} match no parameter of "
                    f"{type(pl_module).__name__}; its parameters are {shown}"
                )
        if self.backend == "pyhessian" and trainer.world_size > 1:
            raise ValueError(
                "backend: 'pyhessian' does not average Hessian-vector products over ranks; "
                "use backend='native' under distributed training"
            )
        if self.probe_dataloader is not None and not self._batches:
            # Creating a loader iterator draws a base seed from the global RNG (unless the
            # loader has its own generator), which would shift dropout and data order.
            with frozen_rng():
                for batch in self.probe_dataloader:
                    self._batches.append(detach_batch(batch))
                    if len(self._batches) == self.num_probe_batches:
                        break
            self._fixed_batches = True

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._fixed_batches and len(self._batches) < self.num_probe_batches:
            # kept at batch end only if training_step returned a loss for it
            self._candidate = (detach_batch(batch), batch_idx)
        if self.adaptive and closer_watch_requested(trainer):
            self.schedule.tighten(trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.optimizers and optimizer is trainer.optimizers[0]:
            self._predict(trainer, pl_module, optimizer)
        if self.directional and self.critical and trainer.global_step + 1 >= self._next_directional:
            self.measurement.weights_before = [
                p.detach().clone() for p in self._measured(pl_module)
            ]

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._candidate is not None:
            # A batch that training_step skipped (no loss) would give no probe loss either.
            candidate, self._candidate = self._candidate, None
            if self.loss_fn is not None or step_loss(trainer, pl_module, outputs) is not None:
                self._batches.append(candidate[0])
                self._batch_idx.append(candidate[1])
        if self.is_set_aside("curvature"):
            return
        if needs_loss_fn(pl_module, self.loss_fn):
            self.directional = False  # no weight copies for readings that will not come
            self.step_aside(
                "curvature",
                f"{MANUAL_OPTIMIZATION}; the curvature readings (stability/sharpness/*) are "
                "off for this run. To measure them, pass loss_fn=lambda module, batch: "
                "<scalar loss to measure>.",
            )
            return
        step = trainer.global_step
        if step == self._seen_step:
            return  # no optimizer step since the last batch (gradient accumulation)
        self._seen_step = step
        check, directional_due = self.schedule.due(step)
        directional = self.directional and directional_due
        if not (check or directional):
            return
        if not trainable(pl_module):
            # a fine-tuning schedule may unfreeze parameters later: skip, do not step aside
            self.warn_once(
                "frozen",
                "the module has no trainable parameter (every requires_grad is False), so "
                "there is no Hessian to measure; curvature checks are skipped until some "
                "parameters train again.",
            )
            return
        if not self._batches:
            self.warn_once(
                "no_batch",
                "no probe batch yet: training_step has returned no loss for any batch so "
                "far, so checks wait for one that does. To measure now, pass probe_batch=... "
                "or loss_fn=lambda module, batch: <scalar loss>.",
            )
            return
        try:
            values = self.measure(trainer, pl_module, check=check, directional=directional)
        except (FloatingPointError, torch.linalg.LinAlgError):
            # The curvature itself is not finite (weights or probe loss blew up): that is a
            # reading for the warning layer, not a reason to stop the run. Warm starts from
            # a broken landscape are dropped.
            self.measurement.forget_landscape()
            values = {reading_name(SHARPNESS_NONFINITE): 1.0}
        except NoProbeLoss as error:
            # Perhaps only for now (a module that skips non-finite losses): later checks try again.
            self.warn_once(
                "no_loss",
                f"{error}. Checks on such a batch are skipped. To measure, make the probe "
                "batch's loss available: pass probe_batch=... with a batch training_step "
                "returns a loss for, or loss_fn=lambda module, batch: <scalar loss>.",
            )
            values = {}
        except Exception as error:
            # An unsupported model or optimizer (no double backward, a learning rate that is
            # not a number, ...): the run itself does not depend on this measurement.
            self.measurement.weights_before = None
            self.directional = False
            self.step_aside(
                "curvature",
                f"a curvature measurement failed ({type(error).__name__}: {error}); the "
                "curvature readings (stability/sharpness/*) are off for this run. A loss "
                "that autograd can differentiate twice and an optimizer whose param groups "
                "have a numeric 'lr' are needed; loss_fn=... can supply such a loss.",
            )
            return
        self.measurement.weights_before = None
        self.publish(trainer, pl_module, values)
        self.schedule.measured(
            step,
            check,
            directional,
            values.get(_EOS_RATIO),
            lambda: closer_watch_requested(trainer),
        )
        ratios = [
            values[k]
            for k in (_EOS_RATIO, _DIRECTIONAL_RATIO)
            if k in values and math.isfinite(values[k])
        ]
        if ratios and trainer.optimizers:
            self.edge.measured(max(ratios), step_lr(trainer.optimizers[0]))

    def _probe_batch_idx(self) -> list[int]:
        """The ``batch_idx`` that ``training_step`` is re-run with for each probe batch: the
        one a cached training batch had, else its position."""
        if len(self._batch_idx) == len(self._batches):
            return list(self._batch_idx)
        return list(range(len(self._batches)))

    def _predict(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Publish the ratio predicted for the learning rate this step will use, and ask for
        a reading on this step when the edge has moved: a one-step jump of the learning
        rate, or growth that takes the predicted ratio above 1."""
        lr = step_lr(optimizer)
        predicted, change = self.edge.predict(lr)
        values = {}
        if math.isfinite(predicted):
            values[reading_name(SHARPNESS_PREDICTED_RATIO)] = predicted
        if math.isfinite(change):
            values[reading_name(SHARPNESS_LR_CHANGE)] = change
        if not values:
            return
        self.publish(trainer, pl_module, values, log=logs_this_step(trainer))
        step = trainer.global_step
        moved = self.schedule.edge_moved(step, change, lambda: self.edge.stale(lr, predicted))
        if self._batches and moved:
            self.schedule.recheck(step, self.directional)

    # ------------------------------------------------------------ measurement
    def _measured(self, pl_module: pl.LightningModule) -> list[Tensor]:
        """The parameters the curvature is taken over: the trainable ones, restricted to
        the ``params`` subset when given."""
        if self.params is None:
            return trainable(pl_module)
        return select_parameters(pl_module, self.params)

    def _hvp_mode(self) -> HvpMode:
        return "finite_difference" if self._fd_fallback else self.hvp

    def measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        *,
        check: bool = True,
        directional: bool = True,
    ) -> dict[str, float]:
        """Take one measurement now on the cached probe batches and return the readings
        (keys relative to ``stability/``), without publishing them.

        With ``hvp="auto"``, a measurement whose exact (double backward) products fail is
        taken again with finite differences, which the rest of the run then uses."""
        try:
            return self._measure(trainer, pl_module, check=check, directional=directional)
        except (FloatingPointError, torch.linalg.LinAlgError, NoProbeLoss):
            raise
        except (RuntimeError, NotImplementedError) as error:
            params = self._measured(pl_module)
            if self.hvp != "auto" or self._fd_fallback or not params or any_sharded(params):
                raise
            self._fd_fallback = True
            self.warn_once(
                "finite_difference",
                f"double backward failed on this model ({type(error).__name__}: {error}); "
                "curvature is measured from here on with finite differences of gradients "
                "(two forward and backward passes per Hessian-vector product).",
            )
            return self._measure(trainer, pl_module, check=check, directional=directional)

    def _measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        *,
        check: bool = True,
        directional: bool = True,
    ) -> dict[str, float]:
        if not self._batches:
            raise ValueError("probe_batch: no probe batch yet (none given and none cached)")
        params = self._measured(pl_module)
        if self._world_size > 1 and flat_sharded(params):
            raise ValueError(
                "FSDP1 flattened parameter shards (FSDPStrategy) are not supported; shard "
                "with FSDP2's fully_shard (e.g. through ModelParallelStrategy) instead"
            )
        return self.measurement.measure(
            trainer,
            pl_module,
            params,
            self._batches,
            self._probe_batch_idx(),
            self._hvp_mode(),
            check=check,
            directional=directional,
        )

    @property
    def num_checks(self) -> int:
        """Lanczos checks taken so far."""
        return self.measurement.num_checks

    @num_checks.setter
    def num_checks(self, value: int) -> None:
        self.measurement.num_checks = value

    @property
    def num_skipped(self) -> int:
        """Readings published as NaN so far because they did not converge or were
        undefined (published as ``sharpness/skipped``)."""
        return self.measurement.num_skipped

    @num_skipped.setter
    def num_skipped(self, value: int) -> None:
        self.measurement.num_skipped = value

    @property
    def last_products(self) -> int:
        """Hessian-vector products of the last Lanczos check (all eigenproblems)."""
        return self.measurement.last_products

    @last_products.setter
    def last_products(self, value: int) -> None:
        self.measurement.last_products = value

    @property
    def _weights_before(self) -> list[Tensor] | None:
        return self.measurement.weights_before

    @_weights_before.setter
    def _weights_before(self, value: list[Tensor] | None) -> None:
        self.measurement.weights_before = value

    @property
    def _eigvecs(self) -> Tensor | None:
        return self.measurement.eigvecs

    @_eigvecs.setter
    def _eigvecs(self, value: Tensor | None) -> None:
        self.measurement.eigvecs = value

    @property
    def _valid_eigvecs(self) -> Tensor | None:
        return self.measurement.valid_eigvecs

    @_valid_eigvecs.setter
    def _valid_eigvecs(self, value: Tensor | None) -> None:
        self.measurement.valid_eigvecs = value

    @property
    def _prev_lambda(self) -> float | None:
        return self.measurement.prev_lambda

    @_prev_lambda.setter
    def _prev_lambda(self, value: float | None) -> None:
        self.measurement.prev_lambda = value

    @property
    def interval(self) -> int:
        """Current steps between Lanczos checks (shorter while on closer watch)."""
        return self._interval

    # ----------------------------------------------------------------- state
    @property
    @override
    def state_key(self) -> str:
        # a subset is part of the identity (a full and a subset monitor side by side);
        # without one the key is what it always was, so older checkpoints still load
        subset = {"params": self.params} if self.params is not None else {}
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, k=self.k, backend=self.backend, **subset
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "interval": self._interval,
            "directional_interval": self._directional_interval,
            "next_check": self._next_check,
            "next_directional": self._next_directional,
            "num_checks": self.num_checks,
            "prev_lambda": self._prev_lambda,
            "eta_c": self._eta_c,
            "skipped": self.num_skipped,
            "readings": {k: [r.value, r.step] for k, r in self.readings.items()},
            "edge": self.edge.state_dict(),
            "recheck_after": self._recheck_after,
        }
        if self._eigvecs is not None:
            state["eigvecs"] = self._eigvecs.detach().cpu()
        if self._valid_eigvecs is not None:
            state["valid_eigvecs"] = self._valid_eigvecs.detach().cpu()
        if self._pre_eigvecs is not None:
            state["pre_eigvecs"] = self._pre_eigvecs.detach().cpu()
        # A checkpoint holds rank 0's state only: under DDP every rank would resume with
        # rank 0's batches, so there each rank caches its own again instead.
        if self._batches and self._world_size == 1 and is_plain(self._batches):
            state["probe_batches"] = to_cpu(self._batches)
            state["probe_batch_idx"] = self._probe_batch_idx()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.interval = int(state_dict["interval"])
        self.schedule.directional_interval = int(state_dict["directional_interval"])
        self.schedule.next_check = int(state_dict["next_check"])
        self.schedule.next_directional = int(state_dict["next_directional"])
        self.measurement.num_checks = int(state_dict["num_checks"])
        self.measurement.prev_lambda = state_dict.get("prev_lambda")
        self.measurement.eta_c = state_dict.get("eta_c")
        self.readings = {
            k: Reading(float(v), int(s)) for k, (v, s) in state_dict["readings"].items()
        }
        if "edge" in state_dict:
            self.edge.load_state_dict(state_dict["edge"])
        self.schedule.recheck_after = int(state_dict.get("recheck_after", -1))
        self.measurement.eigvecs = state_dict.get("eigvecs")
        self.measurement.valid_eigvecs = state_dict.get("valid_eigvecs", self._eigvecs)
        self.measurement.pre_eigvecs = state_dict.get("pre_eigvecs")
        self.measurement.num_skipped = int(state_dict.get("skipped", 0))
        if "probe_batches" in state_dict and not (self._fixed_batches and self._batches):
            self._batches = list(state_dict["probe_batches"])
            self._batch_idx = [int(i) for i in state_dict.get("probe_batch_idx", [])]
