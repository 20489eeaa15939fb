"""Stochastic trace estimators for an operator given only by products ``v -> A v``.

Hutchinson (1989): ``tr(A) = E[g^T A g]`` for Rademacher ``g``; the error after ``m``
products falls as ``1/sqrt(m)``, so reaching relative error ``eps`` costs ``O(1/eps^2)``.

Hutch++ (Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace
Estimation", SOSA 2021): a third of the budget sketches the top of the spectrum, whose
trace is taken exactly on that subspace; Hutchinson estimates only the remainder, which
has far less variance. ``O(1/eps)`` products for a positive semi-definite operator and a
large gain whenever a few eigenvalues dominate, as in neural-network Hessians.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TraceResult", "hutchinson_trace", "hutchpp_trace", "rademacher"]

Matvec = Callable[[Tensor], Tensor]

DEFAULT_BUDGET = 60
"""Default number of operator products for a trace estimate."""


@dataclass
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the estimated trace.
        num_products: operator products used.
        std_error: standard error of the stochastic part (``nan`` when it cannot be
            estimated, e.g. fewer than two samples).
    """

    estimate: float
    num_products: int
    std_error: float


def rademacher(
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Independent +-1 entries with equal probability."""
    gen_device = generator.device if generator is not None else device
    bits = torch.randint(0, 2, shape, generator=generator, device=gen_device)
    return (bits.to(dtype) * 2 - 1).to(device)


def _check(dim: int, num_products: int, minimum: int) -> None:
    if dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    if num_products < minimum:
        raise ValueError(f"num_products must be >= {minimum}, got {num_products}")


def _apply(matvec: Matvec, columns: Tensor) -> Tensor:
    """``A X`` column by column (``X`` is ``(dim, c)``)."""
    out = torch.empty_like(columns)
    for i in range(columns.shape[1]):
        out[:, i] = matvec(columns[:, i]).to(device=columns.device, dtype=columns.dtype)
    return out


def hutchinson_trace(
    matvec: Matvec,
    dim: int,
    num_products: int = DEFAULT_BUDGET,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TraceResult:
    """Hutchinson's estimator ``mean_i g_i^T A g_i`` over ``num_products`` Rademacher
    vectors (Hutchinson 1989). Default budget 60 products."""
    _check(dim, num_products, 1)
    g = rademacher((dim, num_products), generator, dtype, device)
    samples = (g * _apply(matvec, g)).sum(dim=0).double()
    std = float(samples.std() / math.sqrt(num_products)) if num_products > 1 else math.nan
    return TraceResult(float(samples.mean()), num_products, std)


def hutchpp_trace(
    matvec: Matvec,
    dim: int,
    num_products: int = DEFAULT_BUDGET,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TraceResult:
    """Hutch++ (Meyer et al. 2021) with exactly ``num_products`` products (at least 3).

    With ``s = num_products // 3``: ``Q = orth(A S)`` for an ``s``-column Rademacher
    sketch ``S``; the trace is ``tr(Q^T A Q)`` (``s`` products) plus Hutchinson on
    ``(I - QQ^T) A (I - QQ^T)`` with the remaining ``num_products - 2 s`` vectors.
    Default budget 60 products.
    """
    _check(dim, num_products, 3)
    sketch = num_products // 3
    rest = num_products - 2 * sketch
    s = rademacher((dim, sketch), generator, dtype, device)
    g = rademacher((dim, rest), generator, dtype, device)
    q, _ = torch.linalg.qr(_apply(matvec, s))
    # Columns of A S that are numerically dependent (rank-deficient A) give spurious
    # directions in Q; they are orthonormal anyway, so the split stays exact.
    top = float(torch.einsum("ij,ij->", q.double(), _apply(matvec, q).double()))
    g = g - q @ (q.T @ g)
    samples = (g * _apply(matvec, g)).sum(dim=0).double()
    std = float(samples.std() / math.sqrt(rest)) if rest > 1 else math.nan
    return TraceResult(top + float(samples.mean()), num_products, std)
