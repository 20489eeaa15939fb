"""Pure-PyTorch estimators (no Lightning import): Hessian spectrum, CKA, robust statistics."""

from lightning_stability.estimators.cka import (
    Representation,
    hsic,
    linear_cka,
    representation_cka,
)
from lightning_stability.estimators.cka_metric import MinibatchCKA
from lightning_stability.estimators.critical_sharpness import (
    CriticalStep,
    LineLoss,
    critical_step_size,
)
from lightning_stability.estimators.density import SpectralDensity, slq_density
from lightning_stability.estimators.hessian import (
    hessian_density,
    hessian_top_k,
    hessian_trace,
    isolated_hessian,
)
from lightning_stability.estimators.hvp import (
    HessianOperator,
    flatten,
    forward_over_reverse_hvp,
    unflatten,
)
from lightning_stability.estimators.isolation import (
    compute_precision,
    frozen_rng,
    preserved_state,
    resolve_compute_dtype,
)
from lightning_stability.estimators.lanczos import (
    EigenResult,
    gradient_start,
    lanczos_iterations,
    lanczos_top_k,
)
from lightning_stability.estimators.online_stats import (
    EMAStats,
    RollingWindow,
    lag1_autocorrelation,
)
from lightning_stability.estimators.perturbation import (
    AuditConfig,
    Fork,
    PerturbationAuditor,
    lr_margin,
)
from lightning_stability.estimators.preconditioned import (
    ScaledOperator,
    adam_edge,
    adam_preconditioner,
    adam_state_scale,
    sgd_edge,
)
from lightning_stability.estimators.pyhessian_backend import PyHessianBackend
from lightning_stability.estimators.subspace import (
    log_flattening,
    principal_sines,
    subspace_shift,
)
from lightning_stability.estimators.trace import TraceResult, hutchinson_trace, hutchpp_trace

__all__ = [
    "AuditConfig",
    "CriticalStep",
    "EMAStats",
    "EigenResult",
    "Fork",
    "HessianOperator",
    "LineLoss",
    "MinibatchCKA",
    "PerturbationAuditor",
    "PyHessianBackend",
    "Representation",
    "RollingWindow",
    "ScaledOperator",
    "SpectralDensity",
    "TraceResult",
    "adam_edge",
    "adam_preconditioner",
    "adam_state_scale",
    "compute_precision",
    "critical_step_size",
    "flatten",
    "forward_over_reverse_hvp",
    "frozen_rng",
    "gradient_start",
    "hessian_density",
    "hessian_top_k",
    "hessian_trace",
    "hsic",
    "hutchinson_trace",
    "hutchpp_trace",
    "isolated_hessian",
    "lag1_autocorrelation",
    "lanczos_iterations",
    "lanczos_top_k",
    "linear_cka",
    "log_flattening",
    "lr_margin",
    "preserved_state",
    "principal_sines",
    "representation_cka",
    "resolve_compute_dtype",
    "sgd_edge",
    "slq_density",
    "subspace_shift",
    "unflatten",
]
