"""Curvature of the loss landscape during training: top Hessian eigenvalues, the
edge-of-stability ratio, preconditioned sharpness for Adam, and cheap directional and
critical sharpness readings."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, RandomSampler
from typing_extensions import override

from lightning_stability.configuration import regroup
from lightning_stability.estimators.critical_sharpness import LineLoss, critical_step_size
from lightning_stability.estimators.density import slq_density
from lightning_stability.estimators.hvp import HessianOperator, flatten
from lightning_stability.estimators.isolation import (
    compute_precision,
    frozen_rng,
    preserved_state,
    resolve_compute_dtype,
)
from lightning_stability.estimators.lanczos import lanczos_top_k
from lightning_stability.estimators.preconditioned import (
    ScaledOperator,
    adam_state_scale,
)
from lightning_stability.estimators.pyhessian_backend import PyHessianBackend
from lightning_stability.estimators.sharding import (
    any_sharded,
    flat_sharded,
    full_tensor,
    local_view,
)
from lightning_stability.estimators.subspace import log_flattening, subspace_shift
from lightning_stability.estimators.trace import hutchpp_trace
from lightning_stability.probes.base import (
    MANUAL_OPTIMIZATION,
    LossFn,
    NoProbeLoss,
    Reading,
    StabilityProbe,
    detach_batch,
    logs_this_step,
    module_loss,
    needs_loss_fn,
    step_loss,
)
from lightning_stability.probes.config import (
    SHARPNESS_FLAT_ALIASES,
    SharpnessCadence,
    SharpnessEstimator,
    SharpnessMeasures,
)
from lightning_stability.probes.curvature_subset import (
    HVP_MODES,
    HvpMode,
    check_patterns,
    make_operator,
    select_parameters,
    unmatched_patterns,
)
from lightning_stability.probes.edge import LR_JUMP, EdgePrediction, lambda_edge, step_lr
from lightning_stability.vocabulary import check_positive_int

__all__ = ["SharpnessMonitor"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _plain(obj: Any) -> bool:
    """Whether ``obj`` is made only of tensors, numbers, strings, lists, tuples and dicts
    (what ``torch.load(weights_only=True)`` accepts)."""
    if obj is None or isinstance(obj, (Tensor, bool, int, float, str)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(x) for x in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    return False


def _to_cpu(obj: Any) -> Any:
    """A :func:`_plain` ``obj`` with its tensors detached on the CPU, in plain lists, tuples
    and dicts (a named tuple becomes a tuple), which ``torch.load(weights_only=True)`` reads
    back; ``apply_to_collection`` would keep the named tuple's class."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, list):
        return [_to_cpu(x) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


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
    ``directional * lr / 2`` for other optimizers (largest group lr), and ``critical`` = ``2 / eta_c`` where
    ``eta_c`` is the smallest step, in learning-rate units, along the last update
    direction ``(w_t - w_{t-1}) / lr`` that raises the probe loss (Kalra et al. 2026;
    forward passes only). For plain gradient descent ``critical`` equals ``directional``
    on a quadratic. It needs a copy of the trainable weights taken just before the
    optimizer step that precedes a directional check (one model's worth of memory,
    released after the check).

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
            _check_probe_loader(probe_dataloader)
        self.cadence = cadence
        self.estimator = estimator
        self.measures = measures
        every_n_steps = cadence.every_n_steps
        self.every_n_steps = every_n_steps
        self.k = estimator.k
        self.directional_every_n_steps = min(
            cadence.directional_every_n_steps or every_n_steps, every_n_steps
        )
        self.directional = measures.directional
        self.critical = measures.critical
        self.preconditioned = measures.preconditioned
        self.trace = measures.trace
        self.trace_samples = measures.trace_samples
        self.density_every_n_checks = cadence.density_every_n_checks
        self.num_probe_batches = num_probe_batches
        self.probe_dataloader = probe_dataloader
        self.loss_fn = loss_fn
        self.train_mode = train_mode
        self.backend = estimator.backend
        self.tol = estimator.tol
        self.max_iter = estimator.max_iter
        self.warm_start = estimator.warm_start
        self.adaptive = cadence.adaptive
        self.ratio_threshold = cadence.ratio_threshold
        self.adaptive_factor = cadence.adaptive_factor
        self.dtype = _DTYPES[estimator.dtype] if estimator.dtype is not None else None
        self.seed = estimator.seed

        self._fixed_batches = probe_batch is not None
        self._batches: list[Any] = [detach_batch(probe_batch)] if probe_batch is not None else []
        self._batch_idx: list[int] = []  # the batch_idx of each cached training batch
        self._candidate: tuple[Any, int] | None = None
        self._interval = every_n_steps
        self._directional_interval = self.directional_every_n_steps
        self._next_check = every_n_steps
        self._next_directional = self.directional_every_n_steps
        self._seen_step = -1
        self.num_checks = 0
        self._prev_lambda: float | None = None
        self._eigvecs: Tensor | None = None
        self._valid_eigvecs: Tensor | None = None
        self._pre_eigvecs: Tensor | None = None
        self.num_skipped = 0
        """Readings published as NaN so far because they did not converge or were
        undefined (published as ``sharpness/skipped``)."""
        self._eta_c: float | None = None
        self._weights_before: list[Tensor] | None = None
        self._world_size = 1
        self.last_products: int = 0
        """Hessian-vector products of the last Lanczos check (all eigenproblems)."""
        self.edge = EdgePrediction()
        self.recheck_jump = LR_JUMP
        self.recheck_gap = 10
        self._recheck_after = -1

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
        if self.adaptive and self._watch_requested(trainer):
            self._tighten(trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.optimizers and optimizer is trainer.optimizers[0]:
            self._predict(trainer, pl_module, optimizer)
        if self.directional and self.critical and trainer.global_step + 1 >= self._next_directional:
            self._weights_before = [p.detach().clone() for p in self._measured(pl_module)]

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
        check = step >= self._next_check
        directional = self.directional and step >= self._next_directional
        if not (check or directional):
            return
        if not _trainable(pl_module):
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
            self._eigvecs = self._pre_eigvecs = self._valid_eigvecs = None
            values = {"sharpness/nonfinite": 1.0}
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
            self._weights_before = None
            self.directional = False
            self.step_aside(
                "curvature",
                f"a curvature measurement failed ({type(error).__name__}: {error}); the "
                "curvature readings (stability/sharpness/*) are off for this run. A loss "
                "that autograd can differentiate twice and an optimizer whose param groups "
                "have a numeric 'lr' are needed; loss_fn=... can supply such a loss.",
            )
            return
        self._weights_before = None
        self.publish(trainer, pl_module, values)
        self._schedule(trainer, step, check, directional, values.get("sharpness/eos_ratio"))
        ratios = [
            values[k]
            for k in ("sharpness/eos_ratio", "sharpness/directional_ratio")
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
            values["sharpness/predicted_ratio"] = predicted
        if math.isfinite(change):
            values["sharpness/lr_change"] = change
        if not values:
            return
        self.publish(trainer, pl_module, values, log=logs_this_step(trainer))
        step = trainer.global_step
        jumped = math.isfinite(change) and change >= self.recheck_jump
        drifted = step >= self._recheck_after and self.edge.stale(lr, predicted)
        if self._batches and (jumped or drifted):
            self._recheck_after = step + self.recheck_gap
            if self.directional:
                self._next_directional = min(self._next_directional, step + 1)
            else:
                self._next_check = min(self._next_check, step + 1)

    # ------------------------------------------------------------ measurement
    def _measured(self, pl_module: pl.LightningModule) -> list[Tensor]:
        """The parameters the curvature is taken over: the trainable ones, restricted to
        the ``params`` subset when given."""
        if self.params is None:
            return _trainable(pl_module)
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
        dtype = resolve_compute_dtype(params, self.dtype)
        reduce = _reducer(trainer)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        lrs = [float(g["lr"]) for g in optimizer.param_groups] if optimizer else []
        values: dict[str, float] = {}
        # Fused attention kernels (flash / memory-efficient) have no double backward; the
        # math kernel computes the same function and is twice differentiable.
        with (
            preserved_state(pl_module, train=self.train_mode),
            compute_precision(pl_module, dtype),
            sdpa_kernel(SDPBackend.MATH),
        ):

            def closure() -> Tensor:
                # Same RNG state for every evaluation: one dropout mask per measurement.
                with frozen_rng(list({p.device for p in params})):
                    losses = [
                        module_loss(pl_module, b, idx, self.loss_fn)
                        for b, idx in zip(self._batches, self._probe_batch_idx())
                    ]
                return torch.stack(losses).mean()

            grad: Tensor | None = None
            with make_operator(
                self._hvp_mode(), closure, params, reduce, list(pl_module.parameters())
            ) as op:
                if check:
                    values.update(self._check(trainer, pl_module, op, closure, optimizer, dtype))
                if directional:
                    g = grad = op.gradient().to(dtype)
                    gnorm = float(g.norm())
                    if gnorm > 0 and math.isfinite(gnorm):
                        u = g / gnorm
                        d = float(u @ op.matvec(u).to(dtype))
                        values["sharpness/directional"] = d
                        if lrs and optimizer is not None:
                            edge = lambda_edge(optimizer)
                            values["sharpness/directional_ratio"] = d / edge
            if directional and self.critical and self._weights_before is not None and lrs:
                crit = self._critical(params, closure, reduce, max(lrs), dtype, grad)
                if crit is not None:
                    values["sharpness/critical"] = crit
                    if not math.isfinite(crit):
                        self.num_skipped += 1
        if check or directional:
            values["sharpness/skipped"] = float(self.num_skipped)
        return values

    def _check(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        op: HessianOperator,
        closure: Callable[[], Tensor],
        optimizer: torch.optim.Optimizer | None,
        dtype: torch.dtype,
    ) -> dict[str, float]:
        values: dict[str, float] = {}
        products_before = op.num_products
        gen = torch.Generator().manual_seed(self.seed + self.num_checks)
        if self.backend == "pyhessian":
            res = PyHessianBackend(
                closure, op.params, module=pl_module, seed=self.seed + self.num_checks
            ).top_k(self.k, max_iter=self.max_iter, tol=max(self.tol, 1e-6))
            external_products = res.num_products
        else:
            warm = self._eigvecs if self.warm_start else None
            if warm is not None and warm.shape[0] != op.dim:
                warm = None
            res = lanczos_top_k(
                op.matvec,
                op.dim,
                k=self.k,
                tol=self.tol,
                max_iter=self.max_iter,
                warm_start=warm,
                generator=gen,
                dtype=dtype,
                device=op.device,
            )
            external_products = 0
        eigenvalues, vecs = res.eigenvalues.tolist(), res.eigenvectors
        # A reading that did not converge is not a reading: NaN, counted, and kept out of
        # the ratio, the shift and the flattening (its vectors still make a warm start).
        valid = bool(res.converged)
        lam = float(eigenvalues[0]) if valid else math.nan
        values["sharpness/lambda_max"] = lam
        for i, value in enumerate(eigenvalues[1:], start=1):
            values[f"sharpness/lambda_{i}"] = float(value) if valid else math.nan
        if not valid:
            self.num_skipped += 1
        elif (
            self._valid_eigvecs is not None
            and vecs is not None
            and self._valid_eigvecs.shape[0] == vecs.shape[0]
        ):
            values["sharpness/shift"] = subspace_shift(self._valid_eigvecs, vecs)
        if valid and self._prev_lambda is not None:
            values["sharpness/flattening"] = log_flattening(self._prev_lambda, lam)
        if vecs is not None:
            self._eigvecs = vecs.detach().clone()
            if valid:
                self._valid_eigvecs = self._eigvecs
        if valid:
            self._prev_lambda = lam

        if optimizer is not None and (valid or self._preconditioned_for(optimizer)):
            values.update(self._ratio(optimizer, op, lam, dtype, gen))
        if self.trace:
            values["sharpness/trace"] = self._trace(op, dtype, gen)
        if self.density_every_n_checks and (self.num_checks + 1) % self.density_every_n_checks == 0:
            self._log_density(trainer, op, dtype, gen)
        self.num_checks += 1
        self.last_products = op.num_products - products_before + external_products
        values["sharpness/hvps"] = float(self.last_products)
        return values

    def _preconditioned_for(self, optimizer: torch.optim.Optimizer) -> bool:
        """The ratio comes from the preconditioned Hessian, not from ``lambda_max``."""
        return self.preconditioned and isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))

    def _ratio(
        self,
        optimizer: torch.optim.Optimizer,
        op: HessianOperator,
        lam: float,
        dtype: torch.dtype,
        gen: torch.Generator,
    ) -> dict[str, float]:
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            if not self.preconditioned:
                return {}
            scaled = adam_state_scale(optimizer, op.params)
            if scaled is None:
                return {}
            scale, edge = scaled
            scale = full_tensor(scale)
            sop = ScaledOperator(op.matvec, scale.to(device=op.device, dtype=dtype))
            warm = self._pre_eigvecs if self.warm_start else None
            if warm is not None and warm.shape[0] != op.dim:
                warm = None
            res = lanczos_top_k(
                sop,
                op.dim,
                k=1,
                tol=self.tol,
                max_iter=self.max_iter,
                warm_start=warm,
                generator=gen,
                dtype=dtype,
                device=op.device,
            )
            self._pre_eigvecs = res.eigenvectors.detach().clone()
            if not res.converged:
                # The ratio feeds the warning layer, which reads a non-finite value as
                # damage: an unconverged ratio is withheld, its sharpness published as NaN.
                self.num_skipped += 1
                return {"sharpness/preconditioned": math.nan}
            ratio = float(res.eigenvalues[0])
            return {"sharpness/eos_ratio": ratio, "sharpness/preconditioned": ratio * edge}
        edge = lambda_edge(optimizer)
        return {"sharpness/eos_ratio": lam / edge}

    def _critical(
        self,
        params: list[Tensor],
        closure: Callable[[], Tensor],
        reduce: Callable[[Tensor], Tensor] | None,
        lr: float,
        dtype: torch.dtype,
        grad: Tensor | None,
    ) -> float | None:
        """Critical sharpness along the last update, NaN where undefined: the update is not
        a descent direction of the probe loss (``d^T g >= 0``), or the crossing the search
        found is below the loss's resolution (the first-order decrease over the bracket
        is within the rounding of the loss), where ``2 / eta_c`` would read noise as a
        huge curvature."""
        assert self._weights_before is not None
        step = flatten([full_tensor(p.detach()) for p in params], dtype) - flatten(
            [full_tensor(w) for w in self._weights_before], dtype
        )
        if float(step.norm()) == 0.0 or lr <= 0:
            return None
        direction = step / lr
        slope = float(direction @ grad.to(direction)) if grad is not None else None

        def loss() -> Tensor:
            value = closure().detach().reshape(1)
            return reduce(value) if reduce is not None else value

        with LineLoss(*local_view(params, direction), loss) as line:
            loss0 = line(0.0)
            result = critical_step_size(line, loss0, self._eta_c or lr, rtol=0.05, slope=slope)
        if not result.defined:
            return math.nan
        resolution = 16 * torch.finfo(dtype).eps * max(abs(loss0), 1e-30)
        if (
            slope is not None
            and math.isfinite(result.upper)
            and -slope * result.upper <= resolution
        ):
            return math.nan
        if math.isfinite(result.eta):
            self._eta_c = result.eta
        return result.sharpness

    def _trace(self, op: HessianOperator, dtype: torch.dtype, gen: torch.Generator) -> float:
        return hutchpp_trace(
            op.matvec,
            op.dim,
            max(3, self.trace_samples),
            generator=gen,
            dtype=dtype,
            device=op.device,
        ).estimate

    def _log_density(
        self, trainer: pl.Trainer, op: HessianOperator, dtype: torch.dtype, gen: torch.Generator
    ) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        density = slq_density(op.matvec, op.dim, generator=gen, dtype=dtype, device=op.device)
        if trainer.is_global_zero:
            grid, values = density.curve(num_points=200)
            _write_histogram(
                loggers, "stability/sharpness/density", grid, values, op.dim, trainer.global_step
            )
            figure = density_figure(grid, values, trainer.global_step)
            for logger in loggers:
                logger.experiment.add_figure(
                    "stability/sharpness/density_plot", figure, trainer.global_step, close=False
                )

    # --------------------------------------------------------------- cadence
    def _watch_requested(self, trainer: pl.Trainer) -> bool:
        watchers = [cb for cb in trainer.callbacks if hasattr(cb, "request_closer_watch")]
        if not watchers:
            return False
        flag = any(bool(getattr(cb, "request_closer_watch", False)) for cb in watchers)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        return flag

    def _tighten(self, step: int) -> None:
        self._interval = max(1, self.every_n_steps // self.adaptive_factor)
        self._directional_interval = max(1, self.directional_every_n_steps // self.adaptive_factor)
        self._next_check = min(self._next_check, step + self._interval)
        self._next_directional = min(self._next_directional, step + self._directional_interval)

    def _schedule(
        self, trainer: pl.Trainer, step: int, check: bool, directional: bool, ratio: float | None
    ) -> None:
        if check and self.adaptive:
            if ratio is not None and ratio > self.ratio_threshold:
                self._tighten(step)
            elif not self._watch_requested(trainer):
                self._interval = self.every_n_steps
                self._directional_interval = self.directional_every_n_steps
        if check:
            self._next_check = step + self._interval
        if directional:
            self._next_directional = step + self._directional_interval

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
        if self._batches and self._world_size == 1 and _plain(self._batches):
            state["probe_batches"] = _to_cpu(self._batches)
            state["probe_batch_idx"] = self._probe_batch_idx()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._interval = int(state_dict["interval"])
        self._directional_interval = int(state_dict["directional_interval"])
        self._next_check = int(state_dict["next_check"])
        self._next_directional = int(state_dict["next_directional"])
        self.num_checks = int(state_dict["num_checks"])
        self._prev_lambda = state_dict.get("prev_lambda")
        self._eta_c = state_dict.get("eta_c")
        self.readings = {
            k: Reading(float(v), int(s)) for k, (v, s) in state_dict["readings"].items()
        }
        if "edge" in state_dict:
            self.edge.load_state_dict(state_dict["edge"])
        self._recheck_after = int(state_dict.get("recheck_after", -1))
        self._eigvecs = state_dict.get("eigvecs")
        self._valid_eigvecs = state_dict.get("valid_eigvecs", self._eigvecs)
        self._pre_eigvecs = state_dict.get("pre_eigvecs")
        self.num_skipped = int(state_dict.get("skipped", 0))
        if "probe_batches" in state_dict and not (self._fixed_batches and self._batches):
            self._batches = list(state_dict["probe_batches"])
            self._batch_idx = [int(i) for i in state_dict.get("probe_batch_idx", [])]


def _check_probe_loader(loader: DataLoader) -> None:
    sampler = getattr(loader, "sampler", None)
    if (
        isinstance(sampler, RandomSampler)
        and sampler.generator is None
        and loader.generator is None
    ):
        raise ValueError(
            "probe_dataloader: a shuffled loader without its own generator draws from the "
            "global RNG and would change the training run; pass shuffle=False or "
            "generator=torch.Generator().manual_seed(...)"
        )


def _trainable(pl_module: pl.LightningModule) -> list[Tensor]:
    return [p for p in pl_module.parameters() if p.requires_grad]


def _reducer(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
    if trainer.world_size <= 1:
        return None
    return lambda t: trainer.strategy.reduce(t, reduce_op="mean")


def density_figure(grid: Tensor, density: Tensor, step: int) -> Any:
    """A matplotlib ``Figure`` of the smoothed Hessian spectral density (log scale, so the
    bulk near zero and the outliers both show). Built without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2.6))
    ax = fig.subplots()
    ax.semilogy(grid.double().cpu().numpy(), density.double().cpu().clamp_min(1e-12).numpy())
    ax.set_xlabel("eigenvalue", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.set_title(f"Hessian spectral density (SLQ), step {step}", fontsize=9)
    fig.tight_layout()
    return fig


def _write_histogram(
    loggers: list, tag: str, grid: Tensor, density: Tensor, dim: int, step: int
) -> None:
    """Write a smoothed spectral density as a TensorBoard histogram whose bucket counts
    are expected numbers of eigenvalues (density x bucket width x dim)."""
    grid = grid.detach().double().cpu()
    width = float(grid[1] - grid[0]) if grid.numel() > 1 else 1.0
    counts = density.detach().double().cpu() * width * dim
    total = float(counts.sum())
    for logger in loggers:
        logger.experiment.add_histogram_raw(
            tag,
            min=float(grid[0]),
            max=float(grid[-1]),
            num=total,
            sum=float((grid * counts).sum()),
            sum_squares=float((grid**2 * counts).sum()),
            bucket_limits=grid.tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )
