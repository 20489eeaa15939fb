"""Pure-PyTorch estimators (no Lightning import): Hessian spectrum, CKA, robust statistics."""

from lightning_stability.estimators.hvp import HessianOperator, flatten, unflatten
from lightning_stability.estimators.isolation import (
    compute_precision,
    frozen_rng,
    preserved_state,
    resolve_compute_dtype,
)

__all__ = [
    "HessianOperator",
    "compute_precision",
    "flatten",
    "frozen_rng",
    "preserved_state",
    "resolve_compute_dtype",
    "unflatten",
]
