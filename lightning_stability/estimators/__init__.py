"""Pure-PyTorch estimators (no Lightning import): Hessian spectrum, CKA, robust statistics."""

from lightning_stability.estimators.cka import (
    Representation,
    hsic,
    linear_cka,
    representation_cka,
)
from lightning_stability.estimators.cka_metric import MinibatchCKA
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
    "MinibatchCKA",
    "Representation",
    "RollingWindow",
    "compute_precision",
    "flatten",
    "frozen_rng",
    "hsic",
    "lag1_autocorrelation",
    "lanczos_iterations",
    "lanczos_top_k",
    "linear_cka",
    "preserved_state",
    "representation_cka",
    "resolve_compute_dtype",
    "unflatten",
]
