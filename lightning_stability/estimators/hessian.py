"""Front end: the Hessian of a model's loss -> top-k eigenpairs, trace or spectral density,
measured without leaving a trace on the model.

Every function runs inside :func:`preserved_state` (modes, buffers, ``.grad`` and RNG
restored) and :func:`compute_precision` (autocast off, parameters viewed in float32 or
float64), with floating inputs of ``module`` cast to the compute dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_stability.estimators.density import SpectralDensity, slq_density
from lightning_stability.estimators.hvp import HessianOperator, Reducer
from lightning_stability.estimators.isolation import (
    compute_precision,
    preserved_state,
    resolve_compute_dtype,
)
from lightning_stability.estimators.lanczos import EigenResult, lanczos_top_k, start_vector
from lightning_stability.estimators.pyhessian_backend import PyHessianBackend
from lightning_stability.estimators.trace import (
    DEFAULT_BUDGET,
    TraceResult,
    hutchinson_trace,
    hutchpp_trace,
)

__all__ = ["hessian_density", "hessian_top_k", "hessian_trace", "isolated_hessian"]

LossFn = Callable[[], Tensor]


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with its floating tensors in ``dtype`` (any nesting of collections)."""
    return apply_to_collection(
        obj, Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, allow_frozen=True
    )


@contextlib.contextmanager
def _inputs_in(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Cast floating inputs of ``module``'s forward to ``dtype`` (float32 batches meet
    float64 weights when curvature is measured in float64)."""

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast(args, dtype), _cast(kwargs, dtype)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _params(module: nn.Module, params: Sequence[Tensor] | None) -> list[Tensor]:
    chosen = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
    if not chosen:
        raise ValueError("params: no parameter of the module requires grad")
    return chosen


@contextlib.contextmanager
def _isolated(
    module: nn.Module,
    params: Sequence[Tensor] | None,
    train: bool | None,
    dtype: torch.dtype | None,
) -> Iterator[list[Tensor]]:
    """State preserved, compute precision set, inputs cast: yields the chosen parameters."""
    chosen = _params(module, params)
    compute = resolve_compute_dtype(chosen, dtype)
    with (
        preserved_state(module, train),
        compute_precision(module, compute),
        _inputs_in(module, compute),
    ):
        yield chosen


@contextlib.contextmanager
def isolated_hessian(
    module: nn.Module,
    loss_fn: LossFn,
    *,
    params: Sequence[Tensor] | None = None,
    train: bool | None = None,
    dtype: torch.dtype | None = None,
    reduce: Reducer | None = None,
) -> Iterator[HessianOperator]:
    """A :class:`HessianOperator` for ``loss_fn()`` that leaves ``module`` untouched.

    Args:
        module: the model ``loss_fn`` runs.
        loss_fn: returns the scalar loss (e.g. ``lambda: criterion(model(x), y)``).
        params: parameters to differentiate with respect to (default: all trainable).
        train: ``True`` for train-mode curvature (dropout active, BatchNorm batch
            statistics), ``False`` for eval mode, ``None`` keeps the current modes.
        dtype: compute dtype, float32 or float64 (default: float64 for float64 models,
            else float32; half precision is never used).
        reduce: averages flat tensors across data-parallel ranks (see
            :class:`HessianOperator`).
    """
    with _isolated(module, params, train, dtype) as chosen:
        op = HessianOperator(loss_fn, chosen, reduce)
        try:
            yield op
        finally:
            op.close()


def hessian_top_k(
    module: nn.Module,
    loss_fn: LossFn,
    k: int = 1,
    *,
    tol: float = 1e-4,
    max_iter: int = 100,
    warm_start: Tensor | None = None,
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
    train: bool | None = None,
    dtype: torch.dtype | None = None,
    reduce: Reducer | None = None,
    backend: Literal["lanczos", "pyhessian"] = "lanczos",
    block_size: int | None = None,
    start: Literal["gradient", "random"] = "gradient",
) -> EigenResult:
    """Top ``k`` Hessian eigenpairs of ``loss_fn()`` (see :func:`lanczos_top_k`).

    Without ``warm_start`` the Lanczos basis starts from the loss gradient plus a random
    part (``start="gradient"``, the default, as :class:`~lightning_stability.probes.
    SharpnessMonitor` does; :func:`~lightning_stability.estimators.lanczos.gradient_start`)
    or from a random vector (``start="random"``). The gradient start keeps every
    eigenvector about as present as a random start does and adds the top eigenspace, where
    gradients concentrate, so it converges in fewer products and is less likely to miss
    the top of a tight cluster; ``benchmarks/RESULTS.md`` reports both.

    ``backend="pyhessian"`` uses PyHessian's power iteration instead (largest
    *magnitude* first; ``warm_start``, ``generator`` and ``reduce`` are not supported
    there). Under DDP, pass ``reduce`` and a generator seeded alike on every rank.
    ``block_size`` > 1 runs block Lanczos (see :func:`lanczos_top_k`: needed for repeated
    eigenvalues among the top ``k``; default 1 for ``k = 1``, else 2).
    """
    if backend not in ("lanczos", "pyhessian"):
        raise ValueError(f"backend must be 'lanczos' or 'pyhessian', got {backend!r}")
    if start not in ("gradient", "random"):
        raise ValueError(f"start must be 'gradient' or 'random', got {start!r}")
    if backend == "pyhessian":
        if reduce is not None or warm_start is not None:
            raise ValueError("backend='pyhessian' supports neither reduce nor warm_start")
        with _isolated(module, params, train, dtype) as chosen:
            return PyHessianBackend(loss_fn, chosen, module).top_k(k, max_iter=max_iter, tol=tol)
    with isolated_hessian(
        module, loss_fn, params=params, train=train, dtype=dtype, reduce=reduce
    ) as op:
        warm_start, noise = start_vector(op, warm_start, start == "gradient")
        return lanczos_top_k(
            op.matvec,
            op.dim,
            k,
            tol=tol,
            max_iter=max_iter,
            warm_start=warm_start,
            warm_noise=noise,
            generator=generator,
            dtype=op.dtype,
            device=op.device,
            block_size=block_size,
        )


def hessian_trace(
    module: nn.Module,
    loss_fn: LossFn,
    num_products: int = DEFAULT_BUDGET,
    *,
    method: Literal["hutchpp", "hutchinson", "pyhessian"] = "hutchpp",
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
    train: bool | None = None,
    dtype: torch.dtype | None = None,
    reduce: Reducer | None = None,
) -> TraceResult:
    """Hessian trace of ``loss_fn()`` with a budget of ``num_products`` products
    (default 60) by Hutch++ (default), plain Hutchinson, or PyHessian's Hutchinson
    (which may stop earlier on its own tolerance)."""
    if method not in ("hutchpp", "hutchinson", "pyhessian"):
        raise ValueError(f"method must be 'hutchpp', 'hutchinson' or 'pyhessian', got {method!r}")
    if method == "pyhessian":
        with _isolated(module, params, train, dtype) as chosen:
            return PyHessianBackend(loss_fn, chosen, module).trace(max_iter=num_products)
    estimator = hutchpp_trace if method == "hutchpp" else hutchinson_trace
    with isolated_hessian(
        module, loss_fn, params=params, train=train, dtype=dtype, reduce=reduce
    ) as op:
        return estimator(
            op.matvec, op.dim, num_products, generator=generator, dtype=op.dtype, device=op.device
        )


def hessian_density(
    module: nn.Module,
    loss_fn: LossFn,
    num_steps: int = 80,
    num_probes: int = 1,
    *,
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
    train: bool | None = None,
    dtype: torch.dtype | None = None,
    reduce: Reducer | None = None,
) -> SpectralDensity:
    """Hessian eigenvalue density of ``loss_fn()`` by stochastic Lanczos quadrature
    (see :func:`slq_density`)."""
    with isolated_hessian(
        module, loss_fn, params=params, train=train, dtype=dtype, reduce=reduce
    ) as op:
        return slq_density(
            op.matvec,
            op.dim,
            num_steps,
            num_probes,
            generator=generator,
            dtype=op.dtype,
            device=op.device,
        )
