"""How :class:`~lightning_stability.probes.sharpness.SharpnessMonitor` measures curvature on
its probe batches: the warm-started Lanczos check (top eigenvalues, landscape shift and
flattening, trace, spectral density), the edge ratio (preconditioned for Adam), the
directional reading along the gradient and the critical sharpness along the last update.
It returns readings; publishing them is the monitor's."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_stability.estimators.critical_sharpness import LineLoss, critical_step_size
from lightning_stability.estimators.hvp import HessianOperator, flatten
from lightning_stability.estimators.isolation import (
    compute_precision,
    frozen_rng,
    preserved_state,
    resolve_compute_dtype,
)
from lightning_stability.estimators.lanczos import EigenResult, lanczos_top_k, start_vector
from lightning_stability.estimators.preconditioned import ScaledOperator, adam_state_scale
from lightning_stability.estimators.pyhessian_backend import PyHessianBackend
from lightning_stability.estimators.sharding import full_tensor, local_view
from lightning_stability.estimators.subspace import log_flattening, subspace_shift
from lightning_stability.estimators.trace import hutchpp_trace
from lightning_stability.probes.base import LossFn, module_loss
from lightning_stability.probes.config import SharpnessEstimator, SharpnessMeasures
from lightning_stability.probes.curvature_subset import HvpMode, make_operator
from lightning_stability.probes.edge import lambda_edge
from lightning_stability.probes.spectral_density import log_density
from lightning_stability.vocabulary import (
    SHARPNESS_CRITICAL,
    SHARPNESS_DIRECTIONAL,
    SHARPNESS_DIRECTIONAL_RATIO,
    SHARPNESS_EOS_RATIO,
    SHARPNESS_FLATTENING,
    SHARPNESS_HVPS,
    SHARPNESS_LAMBDA_MAX,
    SHARPNESS_PRECONDITIONED,
    SHARPNESS_SHIFT,
    SHARPNESS_SKIPPED,
    SHARPNESS_TRACE,
    reading_name,
    sharpness_lambda_key,
)

__all__ = ["CurvatureMeasurement", "mean_reducer", "trainable"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Readings are returned relative to ``stability/``, as ``StabilityProbe.publish`` takes them.
_LAMBDA_MAX = reading_name(SHARPNESS_LAMBDA_MAX)
_EOS_RATIO = reading_name(SHARPNESS_EOS_RATIO)
_PRECONDITIONED = reading_name(SHARPNESS_PRECONDITIONED)
_DIRECTIONAL = reading_name(SHARPNESS_DIRECTIONAL)
_DIRECTIONAL_RATIO = reading_name(SHARPNESS_DIRECTIONAL_RATIO)
_CRITICAL = reading_name(SHARPNESS_CRITICAL)
_SHIFT = reading_name(SHARPNESS_SHIFT)
_FLATTENING = reading_name(SHARPNESS_FLATTENING)
_TRACE = reading_name(SHARPNESS_TRACE)
_HVPS = reading_name(SHARPNESS_HVPS)
_SKIPPED = reading_name(SHARPNESS_SKIPPED)


def trainable(pl_module: pl.LightningModule) -> list[Tensor]:
    """The parameters of ``pl_module`` that require a gradient."""
    return [p for p in pl_module.parameters() if p.requires_grad]


def mean_reducer(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
    """The mean over ranks of a tensor, ``None`` in a single process."""
    if trainer.world_size <= 1:
        return None
    return lambda t: trainer.strategy.reduce(t, reduce_op="mean")


class CurvatureMeasurement:
    """The curvature measurements and what they carry from one to the next: the previous
    eigenvectors (warm starts and landscape shift), the previous valid ``lambda_max``
    (flattening), the previous critical step (the line search's first bracket), the count
    of readings withheld as NaN, and the weights before the last optimizer step (critical
    sharpness).

    Args:
        estimator: eigenvalues, backend, Lanczos tolerance and cap, warm start, dtype, seed
            (:class:`~lightning_stability.probes.config.SharpnessEstimator`).
        measures: which optional readings are taken
            (:class:`~lightning_stability.probes.config.SharpnessMeasures`).
        density_every_n_checks: checks between spectral densities (``None``: never).
        loss_fn: ``loss_fn(module, batch) -> scalar`` instead of ``training_step``.
        train_mode: measure the train-mode loss (``False``: eval mode).
    """

    def __init__(
        self,
        estimator: SharpnessEstimator,
        measures: SharpnessMeasures,
        density_every_n_checks: int | None,
        loss_fn: LossFn | None,
        train_mode: bool,
    ) -> None:
        self.k = estimator.k
        self.backend = estimator.backend
        self.tol = estimator.tol
        self.max_iter = estimator.max_iter
        self.warm_start = estimator.warm_start
        self.dtype = _DTYPES[estimator.dtype] if estimator.dtype is not None else None
        self.seed = estimator.seed
        self.critical = measures.critical
        self.preconditioned = measures.preconditioned
        self.trace = measures.trace
        self.trace_samples = measures.trace_samples
        self.density_every_n_checks = density_every_n_checks
        self.loss_fn = loss_fn
        self.train_mode = train_mode

        self.num_checks = 0
        self.num_skipped = 0
        self.last_products = 0
        self.prev_lambda: float | None = None
        self.eigvecs: Tensor | None = None
        self.valid_eigvecs: Tensor | None = None
        self.pre_eigvecs: Tensor | None = None
        self.eta_c: float | None = None
        self.weights_before: list[Tensor] | None = None

    def forget_landscape(self) -> None:
        """Drop the warm starts (after a non-finite landscape)."""
        self.eigvecs = self.pre_eigvecs = self.valid_eigvecs = None

    def measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: list[Tensor],
        batches: Sequence[Any],
        batch_idx: Sequence[int],
        hvp: HvpMode,
        *,
        check: bool,
        directional: bool,
    ) -> dict[str, float]:
        """One measurement of the curvature of the mean loss of ``batches`` (each re-run
        with its ``batch_idx``) over ``params``, with products computed as ``hvp`` says;
        the readings, keys relative to ``stability/``."""
        dtype = resolve_compute_dtype(params, self.dtype)
        reduce = mean_reducer(trainer)
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
                        for b, idx in zip(batches, batch_idx)
                    ]
                return torch.stack(losses).mean()

            grad: Tensor | None = None
            with make_operator(hvp, closure, params, reduce, list(pl_module.parameters())) as op:
                if check:
                    values.update(self._check(trainer, pl_module, op, closure, optimizer, dtype))
                if directional:
                    g = grad = op.gradient().to(dtype)
                    gnorm = float(g.norm())
                    if gnorm > 0 and math.isfinite(gnorm):
                        u = g / gnorm
                        d = float(u @ op.matvec(u).to(dtype))
                        values[_DIRECTIONAL] = d
                        if lrs and optimizer is not None:
                            edge = lambda_edge(optimizer)
                            values[_DIRECTIONAL_RATIO] = d / edge
            if directional and self.critical and self.weights_before is not None and lrs:
                crit = self._critical(params, closure, reduce, max(lrs), dtype, grad)
                if crit is not None:
                    values[_CRITICAL] = crit
                    if not math.isfinite(crit):
                        self.num_skipped += 1
        if check or directional:
            values[_SKIPPED] = float(self.num_skipped)
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
        """The Lanczos check: top eigenvalues, shift, flattening, ratio, trace, density."""
        values: dict[str, float] = {}
        products_before = op.num_products
        gen = torch.Generator().manual_seed(self.seed + self.num_checks)
        if self.backend == "pyhessian":
            res = PyHessianBackend(
                closure, op.params, module=pl_module, seed=self.seed + self.num_checks
            ).top_k(self.k, max_iter=self.max_iter, tol=max(self.tol, 1e-6))
            external_products = res.num_products
        else:
            res = self._lanczos(op.matvec, op, self.k, self.eigvecs, dtype, gen, from_gradient=True)
            external_products = 0
        eigenvalues, vecs = res.eigenvalues.tolist(), res.eigenvectors
        # A reading that did not converge is not a reading: NaN, counted, and kept out of
        # the ratio, the shift and the flattening (its vectors still make a warm start).
        valid = bool(res.converged)
        lam = float(eigenvalues[0]) if valid else math.nan
        values[_LAMBDA_MAX] = lam
        for i, value in enumerate(eigenvalues[1:], start=1):
            values[reading_name(sharpness_lambda_key(i))] = float(value) if valid else math.nan
        if not valid:
            self.num_skipped += 1
        elif (
            self.valid_eigvecs is not None
            and vecs is not None
            and self.valid_eigvecs.shape[0] == vecs.shape[0]
        ):
            values[_SHIFT] = subspace_shift(self.valid_eigvecs, vecs)
        if valid and self.prev_lambda is not None:
            values[_FLATTENING] = log_flattening(self.prev_lambda, lam)
        if vecs is not None:
            self.eigvecs = vecs.detach().clone()
            if valid:
                self.valid_eigvecs = self.eigvecs
        if valid:
            self.prev_lambda = lam

        if optimizer is not None and (valid or self._preconditioned_for(optimizer)):
            values.update(self._ratio(optimizer, op, lam, dtype, gen))
        if self.trace:
            values[_TRACE] = self._trace(op, dtype, gen)
        if self.density_every_n_checks and (self.num_checks + 1) % self.density_every_n_checks == 0:
            log_density(trainer, op, dtype, gen)
        self.num_checks += 1
        self.last_products = op.num_products - products_before + external_products
        values[_HVPS] = float(self.last_products)
        return values

    def _lanczos(
        self,
        matvec: Callable[[Tensor], Tensor],
        op: HessianOperator,
        k: int,
        previous: Tensor | None,
        dtype: torch.dtype,
        gen: torch.Generator,
        from_gradient: bool = False,
    ) -> EigenResult:
        """The top ``k`` eigenpairs of ``matvec`` (of ``op``'s dimension), warm-started from
        ``previous`` when warm starts are on and its dimension still matches; a cold start
        begins from the probe gradient when ``from_gradient`` (the Hessian itself,
        :func:`start_vector`), else from a random vector."""
        warm = previous if self.warm_start else None
        if warm is not None and warm.shape[0] != op.dim:
            warm = None
        warm, noise = start_vector(op, warm, from_gradient)
        return lanczos_top_k(
            matvec,
            op.dim,
            k=k,
            tol=self.tol,
            max_iter=self.max_iter,
            warm_start=warm,
            warm_noise=noise,
            generator=gen,
            dtype=dtype,
            device=op.device,
        )

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
        """The edge ratio: ``lambda_max`` over the optimizer's edge, or for Adam/AdamW the
        top eigenvalue of the Hessian scaled by its preconditioner and edge."""
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            if not self.preconditioned:
                return {}
            scaled = adam_state_scale(optimizer, op.params)
            if scaled is None:
                return {}
            scale, edge = scaled
            scale = full_tensor(scale)
            sop = ScaledOperator(op.matvec, scale.to(device=op.device, dtype=dtype))
            res = self._lanczos(sop, op, 1, self.pre_eigvecs, dtype, gen)
            self.pre_eigvecs = res.eigenvectors.detach().clone()
            if not res.converged:
                # The ratio feeds the warning layer, which reads a non-finite value as
                # damage: an unconverged ratio is withheld, its sharpness published as NaN.
                self.num_skipped += 1
                return {_PRECONDITIONED: math.nan}
            ratio = float(res.eigenvalues[0])
            return {_EOS_RATIO: ratio, _PRECONDITIONED: ratio * edge}
        edge = lambda_edge(optimizer)
        return {_EOS_RATIO: lam / edge}

    def _critical(
        self,
        params: list[Tensor],
        closure: Callable[[], Tensor],
        reduce: Callable[[Tensor], Tensor] | None,
        lr: float,
        dtype: torch.dtype,
        grad: Tensor | None,
    ) -> float | None:
        """Critical sharpness along the last update, in curvature units (loss /
        parameter^2), NaN where undefined: the update is not a descent direction of the
        probe loss (``d^T g >= 0``), or the crossing the search found is below the loss's
        resolution (the first-order decrease over the bracket is within the rounding of
        the loss), where it would read noise as a huge curvature.

        Along the unit direction ``u = d / |d|`` the loss returns to its starting value at
        the distance ``s_c = eta_c |d|``; the curvature that puts the crossing there is
        ``-2 (u . g) / s_c = (2 / eta_c) (-d . g) / |d|^2``. For plain SGD (``d = -g``) this
        is ``2 / eta_c``; for any update it is, on a quadratic, the Rayleigh quotient
        ``d^T H d / d^T d``, so it is read against ``lambda_max`` whatever the optimizer
        (``2 / eta_c`` itself is in units of the optimizer's step: under Adam it scales with
        the preconditioner)."""
        assert self.weights_before is not None
        step = flatten([full_tensor(p.detach()) for p in params], dtype) - flatten(
            [full_tensor(w) for w in self.weights_before], dtype
        )
        if float(step.norm()) == 0.0 or lr <= 0:
            return None
        direction = step / lr
        if grad is None:
            return math.nan
        slope = float(direction @ grad.to(direction))
        norm2 = float(direction @ direction)

        def loss() -> Tensor:
            value = closure().detach().reshape(1)
            return reduce(value) if reduce is not None else value

        with LineLoss(*local_view(params, direction), loss) as line:
            loss0 = line(0.0)
            result = critical_step_size(line, loss0, self.eta_c or lr, rtol=0.05, slope=slope)
        if not result.defined:
            return math.nan
        resolution = 16 * torch.finfo(dtype).eps * max(abs(loss0), 1e-30)
        if math.isfinite(result.upper) and -slope * result.upper <= resolution:
            return math.nan
        if math.isfinite(result.eta):
            self.eta_c = result.eta
        return result.sharpness * (-slope) / norm2

    def _trace(self, op: HessianOperator, dtype: torch.dtype, gen: torch.Generator) -> float:
        """Hutch++ estimate of the Hessian's trace."""
        return hutchpp_trace(
            op.matvec,
            op.dim,
            max(3, self.trace_samples),
            generator=gen,
            dtype=dtype,
            device=op.device,
        ).estimate
