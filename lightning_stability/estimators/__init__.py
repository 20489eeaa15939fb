"""Pure-PyTorch estimators (no Lightning import): Hessian spectrum, CKA, robust statistics."""

from lightning_stability.estimators.hvp import HessianOperator, flatten, unflatten
from lightning_stability.estimators.isolation import (
    compute_precision,
    frozen_rng,
    preserved_state,
    resolve_compute_dtype,
)
from lightning_stability.estimators.lanczos import EigenResult, lanczos_iterations, lanczos_top_k
from lightning_stability.estimators.online_stats import (
    EMAStats,
    RollingWindow,
    lag1_autocorrelation,
)

__all__ = [
    "EMAStats",
    "EigenResult",
    "HessianOperator",
    "RollingWindow",
    "compute_precision",
    "flatten",
    "frozen_rng",
    "lag1_autocorrelation",
    "lanczos_iterations",
    "lanczos_top_k",
    "preserved_state",
    "resolve_compute_dtype",
    "unflatten",
]
