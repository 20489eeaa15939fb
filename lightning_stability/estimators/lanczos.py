"""Top-k eigenpairs of a symmetric operator by the Lanczos method.

Lanczos (1950) builds an orthonormal basis of the Krylov space
``span{v, Av, A^2 v, ...}`` in which the operator is tridiagonal; the extreme
eigenvalues of that small tridiagonal matrix (Ritz values) converge to the extreme
eigenvalues of the operator. After ``m`` products the relative error on the top
eigenvalue is about ``(ln n / m)^2`` against ``ln n / m`` for power iteration
(Kuczyński & Woźniakowski 1992), and Lanczos returns the largest *algebraic*
eigenvalue, where power iteration returns the largest in *magnitude*.

Convergence is judged by the residual ``||A y - theta y||`` of each Ritz pair
``(theta, y)``: for a symmetric operator some eigenvalue lies within that distance of
``theta`` whatever the gaps (Parlett, *The Symmetric Eigenvalue Problem*, thm. 4.5.1).
The quadratic bound ``r^2 / gap`` is sharper but needs the gap to the *operator's*
next eigenvalue; the gap between Ritz values overstates it on a clustered spectrum
(an unresolved eigenvalue hides between two Ritz values), so it is not used to stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_stability.estimators.hvp import ParameterOperator

WARM_NOISE = 1e-2
"""Weight of the random unit vector added to a warm start (the previous eigenvectors)."""

GRADIENT_NOISE = 2.0
"""Weight of the random unit vector added to a gradient start (the gradient has weight 1).
The random part keeps about 0.9 of a random start's component along every eigenvector,
so an eigenvector the gradient lacks is found as from a random start, while the gradient
part puts the top eigenspace in the Krylov space from the first products."""

__all__ = [
    "GRADIENT_NOISE",
    "WARM_NOISE",
    "EigenResult",
    "LanczosStep",
    "gradient_start",
    "lanczos_iterations",
    "lanczos_top_k",
    "start_vector",
]

Matvec = Callable[[Tensor], Tensor]


@dataclass
class EigenResult:
    """Top-k eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64 on the CPU, descending, largest *algebraic* first.
        eigenvectors: ``(dim, k)`` orthonormal columns in the same order, in the compute
            dtype on the compute device.
        num_products: operator products (Hessian-vector products) used.
        converged: every requested Ritz pair has a residual ``||A y - theta y||`` of at
            most ``tol`` times the scale (see :func:`lanczos_top_k`), or the Krylov space
            was exhausted, which makes the result exact.
        residuals: ``(k,)`` float64 residual norms ``||A y_i - theta_i y_i||`` of the
            returned pairs; each ``theta_i`` is within ``residuals[i]`` of an eigenvalue.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    num_products: int
    converged: bool
    residuals: Tensor | None = None


@dataclass
class LanczosStep:
    """State after one Lanczos step (yielded by :func:`lanczos_iterations`).

    Attributes:
        ritz_values: all current Ritz values, descending, float64 on the CPU.
        error_bounds: residual norm ``||A y_i - theta_i y_i||`` of each Ritz pair (same
            order), a bound on the distance from ``theta_i`` to the nearest eigenvalue.
        num_products: products used so far.
        exhausted: the Krylov space spans the whole space (Ritz values are exact).
        breakdown: the Krylov space became invariant at this step; the next step restarts
            from a random direction (an eigenvalue of multiplicity > 1 shows up only then).
        ritz_vectors: ``(m, m)`` eigenvectors of the projected matrix, columns in
            ``ritz_values`` order (for a block size of 1 their first row gives quadrature
            weights).
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


def _random_unit(
    dim: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(dim, generator=generator, device=gen_device, dtype=dtype).to(device)
    return noise / noise.norm()


def _start_block(
    dim: int,
    block_size: int,
    warm_start: Tensor | None,
    warm_noise: float,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``(block_size, dim)`` start vectors (not yet orthonormalised)."""
    noise = _random_unit(dim, generator, dtype, device)
    if warm_start is None:
        rows = [noise]
    else:
        w = warm_start.to(device=device, dtype=dtype)
        if w.dim() == 1:
            w = w[:, None]
        if w.shape[0] != dim:
            raise ValueError(
                f"warm_start: expected shape ({dim},) or ({dim}, m), got {tuple(w.shape)}"
            )
        w = w / w.norm(dim=0, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        # A block holds the previous eigenvectors one per column (the last column sums the
        # ones left over). A single vector gives equal weight to every previous
        # eigenvector, which keeps all of them in the Krylov space from the first steps so
        # top-k (not only top-1) converges fast. The random part lets an eigenvalue that
        # overtook them since the last call be found.
        cols = [w[:, i] for i in range(min(block_size - 1, w.shape[1]))]
        rest = w[:, len(cols) :].sum(dim=1) if w.shape[1] > len(cols) else None
        if rest is not None:
            cols.append(rest)
        rows = []
        for i, col in enumerate(cols):
            v = col / col.norm().clamp_min(torch.finfo(dtype).tiny)
            extra = noise if i == 0 else _random_unit(dim, generator, dtype, device)
            rows.append(v + warm_noise * extra)
    while len(rows) < block_size:
        rows.append(_random_unit(dim, generator, dtype, device))
    return torch.stack(rows)


def _orthogonalise(w: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """``w`` minus its projection on the rows of ``active``, twice ("twice is enough",
    Kahan-Parlett: keeps the basis orthonormal in float32 so no ghost copies of converged
    eigenvalues appear). Returns the remainder and the projection coefficients."""
    coeffs = torch.zeros(active.shape[0], dtype=w.dtype, device=w.device)
    for _ in range(2):
        c = active @ w
        w = w - active.T @ c
        coeffs = coeffs + c
    return w, coeffs


def lanczos_iterations(
    matvec: Matvec,
    dim: int,
    *,
    max_iter: int = 100,
    warm_start: Tensor | None = None,
    warm_noise: float = WARM_NOISE,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    block_size: int = 1,
) -> Iterator[LanczosStep]:
    """Run (block) Lanczos with full reorthogonalisation, yielding the Ritz pairs after
    every product. See :func:`lanczos_top_k` for the arguments.

    The products are taken one at a time: product ``j`` is orthogonalised against the
    whole basis and its remainder becomes basis vector ``j + block_size``, so the basis
    spans the block Krylov space of the start block (Golub & Underwood 1977). The
    projection coefficients give ``T = Q^T A Q`` on the ``p`` multiplied vectors and the
    coupling ``C`` of those vectors to the ``block_size`` not yet multiplied, so the
    residual of a Ritz pair ``(theta, Q s)`` is ``||C s||`` exactly (for a block size of 1
    this is the familiar ``beta_p |s_p|``; Parlett ch. 13), without extra products.
    """
    if dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    steps = min(max_iter, dim)
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny

    rows = min(steps + block_size, dim)
    basis = torch.zeros(rows, dim, dtype=dtype, device=device)
    # coupling[i, j] = q_i^T A q_j for the basis vectors that existed when q_j was multiplied.
    coupling = torch.zeros(rows, steps, dtype=torch.float64)
    start = _start_block(dim, block_size, warm_start, warm_noise, generator, dtype, device)
    size = 0
    for v in start[: min(block_size, dim)]:
        v, _ = _orthogonalise(v, basis[:size])
        norm = float(v.norm())
        if norm <= 10 * eps:
            v, _ = _orthogonalise(_random_unit(dim, generator, dtype, device), basis[:size])
            norm = float(v.norm())
        basis[size] = v / max(norm, tiny)
        size += 1

    scale = 0.0
    for j in range(steps):
        q = basis[j]
        w = matvec(q).to(device=device, dtype=dtype).reshape(-1)
        if w.numel() != dim:
            raise ValueError(f"matvec returned {w.numel()} entries, expected dim={dim}")
        w, coeffs = _orthogonalise(w, basis[:size])
        beta = float(w.norm())
        if not (bool(torch.isfinite(coeffs).all()) and math.isfinite(beta)):
            raise FloatingPointError(
                f"matvec returned non-finite values at Lanczos step {j + 1} "
                "(the operator, e.g. the Hessian at non-finite weights, is not finite)"
            )
        coupling[:size, j] = coeffs.double().cpu()
        p = j + 1
        t = coupling[:p, :p]
        t = 0.5 * (t + t.T)
        theta, s = torch.linalg.eigh(t)
        theta, s = theta.flip(0), s.flip(1)
        scale = max(scale, float(theta.abs().max()), abs(float(coeffs[j])))

        exhausted = p == dim
        breakdown = False
        if size < rows:
            breakdown = beta <= 10 * eps * max(scale, 1e-30) * math.sqrt(p)
            if breakdown:
                # Invariant subspace found: its Ritz values are exact. Continue with a
                # fresh random direction orthogonal to the basis so the rest of the
                # spectrum is still explored (the projected matrix decouples).
                w, _ = _orthogonalise(_random_unit(dim, generator, dtype, device), basis[:size])
                basis[size] = w / max(float(w.norm()), tiny)
            else:
                basis[size] = w / beta
                coupling[size, j] = beta
            size += 1
        tail = coupling[p:size, :p]
        residual = (tail @ s).norm(dim=0) if tail.numel() else torch.zeros(p, dtype=torch.float64)
        if exhausted:
            residual = torch.zeros_like(residual)
        yield LanczosStep(theta, residual, p, exhausted, breakdown, s, basis)
        if exhausted:
            return


def gradient_start(op: ParameterOperator) -> tuple[Tensor | None, float]:
    """A cold start for Lanczos on the Hessian: the loss gradient, and the weight of the
    random part to add to it (:data:`GRADIENT_NOISE`); ``(None, WARM_NOISE)`` (a random
    start) where the gradient is zero or not finite.

    Gradients concentrate in the top eigenspace of the Hessian during training
    (Gur-Ari, Roberts & Dyer 2018, "Gradient Descent Happens in a Tiny Subspace"), so
    the Krylov space of the gradient holds the top eigenvector in fewer products than
    that of a random vector. The gradient costs no product where the operator keeps the
    gradient graph (:class:`HessianOperator`); finite differences spend one gradient.
    """
    g = op.gradient().reshape(-1)
    norm = float(g.norm())
    if norm == 0.0 or not math.isfinite(norm):
        return None, WARM_NOISE
    return g, GRADIENT_NOISE


def start_vector(
    op: ParameterOperator, warm_start: Tensor | None, from_gradient: bool
) -> tuple[Tensor | None, float]:
    """The start of a solve on ``op`` and the weight of its random part: ``warm_start``
    (with :data:`WARM_NOISE`) when given, else the gradient start when ``from_gradient``
    (:func:`gradient_start`), else a random start ``(None, WARM_NOISE)``."""
    if warm_start is None and from_gradient:
        return gradient_start(op)
    return warm_start, WARM_NOISE


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
    warm_noise: float = WARM_NOISE,
    block_size: int | None = None,
    confirm: bool = True,
) -> EigenResult:
    """The ``k`` largest (algebraic) eigenvalues and their eigenvectors of a symmetric
    operator, by Lanczos with full reorthogonalisation (Lanczos 1950).

    Args:
        matvec: ``v -> A v`` on flat vectors of length ``dim`` (e.g.
            :meth:`HessianOperator.matvec`).
        dim: size of the operator.
        k: number of eigenpairs, ``1 <= k <= dim``.
        tol: relative tolerance on the residual: stop once each of the top ``k`` Ritz
            pairs ``(theta_i, y_i)`` has ``||A y_i - theta_i y_i|| <= tol * scale``, where
            ``scale`` is the largest ``|theta_i|`` among the ``k`` (so eigenvalues near zero
            do not demand absolute precision). Each returned eigenvalue is then within
            ``tol * scale`` of an eigenvalue of the operator, on clustered spectra too.
            ``0`` runs ``max_iter`` steps. Default ``1e-4``.
        max_iter: maximum number of products (capped at ``dim``). Default 100.
        warm_start: previous eigenvectors, ``(dim,)`` or ``(dim, m)``. With a block size of
            1 the start vector is their normalised sum plus ``warm_noise`` of a random
            unit vector, so a slowly changing operator converges in a few products.
        generator: random generator for the start vector (reproducible results).
        dtype: dtype of the Krylov basis (float32 or float64); the projected eigenproblem
            is always solved in float64.
        device: device of the Krylov basis (default: CPU).
        warm_noise: weight of the random component added to a warm start. Default 0.01.
        block_size: start vectors multiplied in turn (block Lanczos). A single start vector
            sees one copy of a repeated eigenvalue only (its Krylov space holds one
            direction of each eigenspace), so with an eigenvalue of multiplicity ``m``
            among the top ``k``, a block size of at least ``m`` is needed for the next
            slots to hold its copies. Beyond multiplicities, a second start vector makes it
            unlikely that a member of a cluster among the top ``k`` is nearly absent from
            the start, where a single vector can settle on the member below it. Default
            ``None``: 1 for ``k = 1``, 2 for ``k >= 2``.
        confirm: once the residuals pass, take ``max(2, ceil(m / 8))`` more products
            (``m`` = products so far) and accept only if they passed at every one, the last
            is the lowest of them (or below ``tol * scale / 8``) and no top-``k``
            Ritz value moved by more than ``tol * scale``. A residual bounds the distance
            to *some* eigenvalue; in a tight cluster whose member is nearly absent from
            the start vector, a Ritz value settles on a neighbour first and its residual
            dips, then rises again as the missing member emerges. Default True.

    Returns:
        :class:`EigenResult`; ``converged`` is False when ``max_iter`` ran out first.

    A Krylov method finds the top eigenvalue only if the start vector is not orthogonal to
    its eigenvector: a random start is not, and a warm start keeps ``warm_noise`` of a
    random direction for that reason.
    """
    if k < 1 or k > dim:
        raise ValueError(f"k must satisfy 1 <= k <= dim={dim}, got {k}")
    if tol < 0 or not math.isfinite(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if max_iter < k:
        raise ValueError(f"max_iter must be >= k={k}, got {max_iter}")
    if warm_noise < 0:
        raise ValueError(f"warm_noise must be >= 0, got {warm_noise}")
    if block_size is None:
        block_size = 1 if k == 1 else 2
    last: LanczosStep | None = None
    converged = False
    candidate: tuple[int, Tensor, Tensor] | None = None
    for step in lanczos_iterations(
        matvec,
        dim,
        max_iter=max_iter,
        warm_start=warm_start,
        warm_noise=warm_noise,
        generator=generator,
        dtype=dtype,
        device=device,
        block_size=block_size,
    ):
        last = step
        if step.exhausted:
            converged = True
            break
        # At a breakdown every Ritz pair has a zero residual, but the copies of repeated
        # eigenvalues (and any eigenvalue the start missed) are outside the invariant
        # subspace: carry on from the fresh direction before judging.
        if step.ritz_values.numel() < k or step.breakdown or tol == 0:
            continue
        theta = step.ritz_values[:k]
        scale = max(float(theta.abs().max()), 1e-12 * float(step.ritz_values.abs().max()))
        passed = bool((step.error_bounds[:k] <= tol * scale).all())
        if not passed:
            candidate = None
            continue
        if not confirm:
            converged = True
            break
        residuals = step.error_bounds[:k]
        if candidate is None:
            candidate = (step.num_products, theta.clone(), residuals.clone())
            continue
        first, values, lowest = candidate
        settled = bool((residuals <= lowest).all()) or bool((residuals <= tol * scale / 8).all())
        lowest = torch.minimum(lowest, residuals)
        candidate = (first, values, lowest)
        if step.num_products < first + max(2, math.ceil(first / 8)):
            continue
        if settled and float((theta - values).abs().max()) <= tol * scale:
            converged = True
            break
        candidate = (step.num_products, theta.clone(), residuals.clone())
    assert last is not None
    return EigenResult(
        eigenvalues=last.ritz_values[:k].clone(),
        eigenvectors=last.eigenvectors(k),
        num_products=last.num_products,
        converged=converged,
        residuals=last.error_bounds[:k].clone(),
    )
