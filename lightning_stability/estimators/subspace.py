"""Comparing curvature readings between checks: the rotation of the top-k eigenspace
(landscape shift) and the change of the top eigenvalue (landscape flattening)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["log_flattening", "principal_sines", "subspace_shift"]


def _orthonormal(v: Tensor) -> Tensor:
    v = v.detach().double()
    if v.dim() == 1:
        v = v[:, None]
    q, _ = torch.linalg.qr(v)
    return q


def principal_sines(a: Tensor, b: Tensor) -> Tensor:
    """Sines of the principal angles between ``span(a)`` and ``span(b)``, descending.

    Args:
        a, b: ``(dim,)`` or ``(dim, k)`` bases (orthonormalised here; float64 inside).

    Returns:
        ``(min(k_a, k_b),)`` float64 on the CPU; the cosines are the singular values of
        ``Q_a^T Q_b`` (Björck & Golub 1973), and each sine is computed as
        ``sqrt(1 - cos^2)`` clamped to [0, 1].
    """
    qa, qb = _orthonormal(a), _orthonormal(b.to(a.device))
    if qa.shape[0] != qb.shape[0]:
        raise ValueError(f"a and b must have the same length, got {qa.shape[0]} and {qb.shape[0]}")
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)
    return (1.0 - cos**2).clamp_min(0.0).sqrt().sort(descending=True).values.cpu()


def subspace_shift(previous: Tensor, current: Tensor) -> float:
    """Landscape shift: the sine of the largest principal angle between the previous and
    the current top-k eigenspaces; 0 = the same subspace, 1 = a direction of one is
    orthogonal to the other. For ``k = 1`` it is ``sin`` of the angle between the two top
    eigenvectors (sign-free). Only as meaningful as the subspace is well defined: with
    ``lambda_k`` close to ``lambda_{k+1}`` the top-k eigenspace itself is noise."""
    return float(principal_sines(previous, current)[0])


def log_flattening(previous: float, current: float) -> float:
    """Landscape flattening between two top eigenvalues: ``ln(previous / current)``.

    Positive when the landscape flattened (``lambda_max`` fell), negative when it
    sharpened; 0.1 is a fall of about 10%, ``ln 2`` a halving. NaN when either value is
    not positive or not finite (a ratio of curvatures of opposite sign has no meaning).
    """
    if not (previous > 0 and current > 0 and math.isfinite(previous) and math.isfinite(current)):
        return math.nan
    return math.log(previous / current)
