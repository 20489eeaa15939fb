"""Top-k eigenpairs of a symmetric operator by the Lanczos method.

Lanczos (1950) builds an orthonormal basis of the Krylov space
``span{v, Av, A^2 v, ...}`` in which the operator is tridiagonal; the extreme
eigenvalues of that small tridiagonal matrix (Ritz values) converge to the extreme
eigenvalues of the operator. After ``m`` products the relative error on the top
eigenvalue is about ``(ln n / m)^2`` against ``ln n / m`` for power iteration
(Kuczyński & Woźniakowski 1992), and Lanczos returns the largest *algebraic*
eigenvalue, where power iteration returns the largest in *magnitude*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EigenResult", "LanczosStep", "lanczos_iterations", "lanczos_top_k"]

Matvec = Callable[[Tensor], Tensor]


@dataclass
class EigenResult:
    """Top-k eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64 on the CPU, descending, largest *algebraic* first.
        eigenvectors: ``(dim, k)`` orthonormal columns in the same order, in the compute
            dtype on the compute device.
        num_products: operator products (Hessian-vector products) used.
        converged: every requested eigenvalue met the tolerance (or the Krylov space
            was exhausted, which makes the result exact).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    num_products: int
    converged: bool


@dataclass
class LanczosStep:
    """State after one Lanczos step (yielded by :func:`lanczos_iterations`).

    Attributes:
        ritz_values: all current Ritz values, descending, float64 on the CPU.
        error_bounds: bound on ``|lambda_i - theta_i|`` for each Ritz value (same order).
        num_products: products used so far.
        exhausted: the Krylov space spans the whole space (Ritz values are exact).
        breakdown: the Krylov space became invariant at this step; the next step restarts
            from a random direction (an eigenvalue of multiplicity > 1 shows up only then).
        ritz_vectors: ``(m, m)`` eigenvectors of the tridiagonal matrix, columns in
            ``ritz_values`` order (their first row gives quadrature weights).
    """

    ritz_values: Tensor
    error_bounds: Tensor
    num_products: int
    exhausted: bool
    breakdown: bool
    ritz_vectors: Tensor
    _basis: Tensor

    def eigenvectors(self, k: int) -> Tensor:
        """The top ``k`` Ritz vectors as ``(dim, k)`` orthonormal columns."""
        m = self.ritz_vectors.shape[0]
        s = self.ritz_vectors[:, :k].to(device=self._basis.device, dtype=self._basis.dtype)
        vecs = self._basis[:m].T @ s
        return vecs / vecs.norm(dim=0, keepdim=True).clamp_min(torch.finfo(vecs.dtype).tiny)


def _start_vector(
    dim: int,
    warm_start: Tensor | None,
    warm_noise: float,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(dim, generator=generator, device=gen_device, dtype=dtype).to(device)
    noise = noise / noise.norm()
    if warm_start is None:
        return noise
    w = warm_start.to(device=device, dtype=dtype)
    if w.dim() == 1:
        w = w[:, None]
    if w.shape[0] != dim:
        raise ValueError(f"warm_start: expected shape ({dim},) or ({dim}, m), got {tuple(w.shape)}")
    # Equal weight on every previous eigenvector keeps all of them in the Krylov space
    # from the first steps, so top-k (not only top-1) converges fast; the random part
    # lets an eigenvalue that overtook them since the last call be found.
    w = w / w.norm(dim=0, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    v = w.sum(dim=1)
    v = v / v.norm().clamp_min(torch.finfo(dtype).tiny)
    v = v + warm_noise * noise
    return v / v.norm()


def lanczos_iterations(
    matvec: Matvec,
    dim: int,
    *,
    max_iter: int = 100,
    warm_start: Tensor | None = None,
    warm_noise: float = 1e-2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Iterator[LanczosStep]:
    """Run Lanczos with full reorthogonalisation, yielding the Ritz values after every
    product. See :func:`lanczos_top_k` for the arguments.

    Error bounds: for a Ritz pair with residual ``r = beta_m |s_m|`` the eigenvalue error
    is at most ``r`` and, given the gap ``delta`` to the rest of the spectrum, at most
    ``r^2 / delta`` (Parlett, *The Symmetric Eigenvalue Problem*, ch. 11); the gap is
    estimated from the other Ritz values.
    """
    if dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    steps = min(max_iter, dim)
    eps = torch.finfo(dtype).eps

    basis = torch.zeros(steps + 1, dim, dtype=dtype, device=device)
    basis[0] = _start_vector(dim, warm_start, warm_noise, generator, dtype, device)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for j in range(steps):
        q = basis[j]
        w = matvec(q).to(device=device, dtype=dtype).reshape(-1)
        if w.numel() != dim:
            raise ValueError(f"matvec returned {w.numel()} entries, expected dim={dim}")
        alpha = float(w @ q)
        # Full reorthogonalisation against the whole basis, twice ("twice is enough",
        # Kahan-Parlett): keeps the basis orthonormal in float32 so no ghost copies of
        # converged eigenvalues appear.
        active = basis[: j + 1]
        for _ in range(2):
            w = w - active.T @ (active @ w)
        beta = float(w.norm())
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise FloatingPointError(
                f"matvec returned non-finite values at Lanczos step {j + 1} "
                "(the operator, e.g. the Hessian at non-finite weights, is not finite)"
            )
        alphas.append(alpha)

        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j > 0:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)
        theta, s = theta.flip(0), s.flip(1)
        scale = max(scale, float(theta.abs().max()), abs(alpha))

        exhausted = j + 1 == dim
        breakdown = beta <= 10 * eps * max(scale, 1e-30) * math.sqrt(j + 1)
        residual = beta * s[-1].abs()
        if exhausted:
            residual = torch.zeros_like(residual)
        if theta.numel() > 1:
            diffs = (theta[:, None] - theta[None, :]).abs()
            diffs.fill_diagonal_(math.inf)
            gap = diffs.min(dim=1).values
            bound = torch.minimum(residual, residual**2 / gap.clamp_min(1e-300))
        else:
            bound = residual
        yield LanczosStep(theta, bound, j + 1, exhausted, breakdown, s, basis)
        if exhausted or j + 1 == steps:
            return

        if breakdown:
            # Invariant subspace found: its Ritz values are exact. Continue with a fresh
            # random direction orthogonal to the basis so the rest of the spectrum is
            # still explored (the tridiagonal matrix decouples, beta = 0).
            gen_device = generator.device if generator is not None else device
            w = torch.randn(dim, generator=generator, device=gen_device, dtype=dtype).to(device)
            for _ in range(2):
                w = w - active.T @ (active @ w)
            basis[j + 1] = w / w.norm()
            betas.append(0.0)
        else:
            basis[j + 1] = w / beta
            betas.append(beta)


def lanczos_top_k(
    matvec: Matvec,
    dim: int,
    k: int = 1,
    *,
    tol: float = 1e-4,
    max_iter: int = 100,
    warm_start: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    warm_noise: float = 1e-2,
) -> EigenResult:
    """The ``k`` largest (algebraic) eigenvalues and their eigenvectors of a symmetric
    operator, by Lanczos with full reorthogonalisation (Lanczos 1950).

    Args:
        matvec: ``v -> A v`` on flat vectors of length ``dim`` (e.g.
            :meth:`HessianOperator.matvec`).
        dim: size of the operator.
        k: number of eigenpairs, ``1 <= k <= dim``.
        tol: relative tolerance: stop once every one of the top ``k`` Ritz values has an
            error bound below ``tol * |lambda|_max`` (the largest Ritz value in magnitude,
            so eigenvalues near zero do not demand absolute precision). ``0`` runs
            ``max_iter`` steps. Default ``1e-4``.
        max_iter: maximum number of products (capped at ``dim``). Default 100.
        warm_start: previous eigenvectors, ``(dim,)`` or ``(dim, m)``. The start vector is
            their normalised sum plus ``warm_noise`` of a random unit vector, so a slowly
            changing operator converges in a few products.
        generator: random generator for the start vector (reproducible results).
        dtype: dtype of the Krylov basis (float32 or float64); the tridiagonal
            eigenproblem is always solved in float64.
        device: device of the Krylov basis (default: CPU).
        warm_noise: weight of the random component added to a warm start. Default 0.01.

    Returns:
        :class:`EigenResult`; ``converged`` is False when ``max_iter`` ran out first.
    """
    if k < 1 or k > dim:
        raise ValueError(f"k must satisfy 1 <= k <= dim={dim}, got {k}")
    if tol < 0 or not math.isfinite(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if max_iter < k:
        raise ValueError(f"max_iter must be >= k={k}, got {max_iter}")
    if warm_noise < 0:
        raise ValueError(f"warm_noise must be >= 0, got {warm_noise}")
    last: LanczosStep | None = None
    converged = False
    for step in lanczos_iterations(
        matvec,
        dim,
        max_iter=max_iter,
        warm_start=warm_start,
        warm_noise=warm_noise,
        generator=generator,
        dtype=dtype,
        device=device,
    ):
        last = step
        if step.exhausted:
            converged = True
            break
        if step.ritz_values.numel() < k or step.breakdown:
            continue
        spectral = float(step.ritz_values.abs().max())
        if tol > 0 and bool((step.error_bounds[:k] <= tol * spectral).all()):
            converged = True
            break
    assert last is not None
    return EigenResult(
        eigenvalues=last.ritz_values[:k].clone(),
        eigenvectors=last.eigenvectors(k),
        num_products=last.num_products,
        converged=converged,
    )
