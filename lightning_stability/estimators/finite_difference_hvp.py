"""Hessian-vector products by central differences of gradients, for models whose loss
cannot be differentiated twice: sharded parameters (FSDP), where the forward pass runs on
all-gathered copies and double backward does not reach the shards, or custom kernels
without a second derivative."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_stability.estimators.hvp import LossClosure, ParameterOperator, Reducer
from lightning_stability.estimators.sharding import (
    full_tensor,
    full_to_local,
    is_sharded,
    local_shard,
)

__all__ = ["FiniteDifferenceHessian"]


class FiniteDifferenceHessian(ParameterOperator):
    """The Hessian of ``loss_closure()`` with respect to ``params`` as a linear operator
    on flat vectors, by central differences of gradients:

    ``H v ~= (g(w + h u) - g(w - h u)) / (2 h) * ||v||`` with ``u = v / ||v||``,

    where ``g`` is the gradient the module's ordinary backward pass produces. The same
    interface as :class:`~lightning_stability.estimators.hvp.HessianOperator`, so every
    algorithm (Lanczos, Hutch++, SLQ) runs on either.

    Cost: each product is two forward and two backward passes (the exact operator needs
    one extra backward pass per product after building the gradient graph once);
    :meth:`gradient` is one more forward and backward pass. No gradient graph is kept, so
    the memory is that of a training step plus one copy of the (local) weights.

    Error: the central difference is exact on a quadratic; otherwise its truncation error
    is ``h^2 / 6`` times the third derivative along ``u``, and its rounding error about
    ``u_mach * ||g|| / h`` (``u_mach`` the unit roundoff of the parameter dtype). The
    default ``h = 1e-3`` (weights of order one) balances the two for float32; for float64
    the rounding term is negligible and the same step keeps the quotient comparable
    across dtypes. Gradients are differenced in float64. Piecewise-linear activations
    (ReLU) are the exception: their second derivative is zero almost everywhere, which is
    what double backward returns, but a unit whose pre-activation changes sign between
    ``w - h u`` and ``w + h u`` makes the gradient jump, and the difference quotient
    counts that jump divided by ``2 h``. The product is then the curvature of the loss
    over the step, not the Hessian at ``w``, and the two can differ by far more than the
    error above; a smaller ``h`` makes crossings rarer but weighs each one more, so it
    does not help. Smooth activations (GELU, tanh, SiLU) do not have this.
    ``benchmarks/RESULTS.md`` has the measured error against the exact operator for both
    kinds.

    Sharded parameters (``DTensor``): vectors are full-length and identical on every rank
    (what Lanczos keeps); a product moves each rank's local shard by its slice of ``h u``
    in place under ``no_grad``, runs the backward pass (the sharding wrapper
    reduce-scatters the gradient, so it is already averaged over the data-parallel
    ranks), gathers the gradient shards into a full vector, and copies the saved shards
    back: the weights are bit-identical afterwards, since ``(w + h u) - h u`` is not ``w``
    in floating point. Plain (unsharded) parameters are moved the same way; their
    gradients are averaged with ``reduce`` (one call per gradient), as a module's own
    backward outside the data-parallel wrapper does not average them.

    ``.grad``: with only plain parameters the gradients come from ``torch.autograd.grad``
    and no ``.grad`` is touched. With sharded ones the module's own backward pass is
    needed (the sharding wrapper's hooks reduce-scatter the gradient into ``.grad``), and
    it writes the ``.grad`` of every parameter of the module, so the ``.grad`` of
    ``params`` and ``guard`` is saved on first use, cleared before each pass (FSDP
    accumulates into an existing ``.grad``) and put back by :meth:`close`.

    Args:
        loss_closure: returns the scalar loss at the current parameters; called once per
            gradient evaluation, with gradients enabled.
        params: parameters to differentiate with respect to (those without
            ``requires_grad`` are skipped).
        reduce: averages a flat tensor over data-parallel ranks, for plain parameters.
        step: the difference step ``h`` in parameter units along the unit direction.
            Default ``1e-3``.
        guard: the module's other parameters, whose ``.grad`` a backward pass may write
            (a curvature subset leaves them out of ``params``).

    Attributes:
        num_products: Hessian-vector products computed so far.
    """

    def __init__(
        self,
        loss_closure: LossClosure,
        params: Sequence[Tensor],
        reduce: Reducer | None = None,
        step: float = 1e-3,
        guard: Sequence[Tensor] = (),
    ) -> None:
        super().__init__(loss_closure, params, reduce)
        if not (isinstance(step, (int, float)) and step > 0):
            raise ValueError(f"step must be > 0, got {step!r}")
        self._sharded = [is_sharded(p) for p in self.params]
        self._backward = any(self._sharded)
        ids = {id(p) for p in self.params}
        self._guarded = self.params + [t for t in guard if id(t) not in ids]
        self.step = float(step)
        self._saved_grads: list[Tensor | None] | None = None
        self._saved_weights: list[Tensor] | None = None
        self._loss: float | None = None
        self._flat_grad: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return local_shard(self.params[0]).device

    def _open(self) -> None:
        if self._saved_weights is None:
            self._saved_grads = [p.grad for p in self._guarded]
            self._saved_weights = [local_shard(p).detach().clone() for p in self.params]

    def _restore_weights(self) -> None:
        assert self._saved_weights is not None
        with torch.no_grad():
            for p, w in zip(self.params, self._saved_weights):
                local_shard(p).copy_(w)

    def _grad(self) -> tuple[Tensor, float]:
        """The flat float64 gradient at the current weights (rank-averaged) and the loss."""
        if self._backward:
            for p in self._guarded:
                p.grad = None
        with torch.enable_grad():
            loss = self._closure()
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("loss_closure must return a scalar tensor")
            if not loss.requires_grad:
                raise ValueError("loss_closure returned a loss that does not depend on params")
            if self._backward:
                loss.backward()
                grads = [p.grad for p in self.params]
            else:
                grads = list(torch.autograd.grad(loss, self.params, allow_unused=True))
        parts: list[Tensor] = []
        plain: list[int] = []
        for i, (p, g, sharded) in enumerate(zip(self.params, grads, self._sharded)):
            if g is None:
                g = torch.zeros(p.shape, dtype=torch.float64, device=self.device)
            g = full_tensor(g.detach()).reshape(-1).to(torch.float64)
            if not sharded:
                plain.append(i)
            parts.append(g)
        if self._backward:
            for p in self._guarded:
                p.grad = None
        if self._reduce is not None and plain:
            for i in plain:
                parts[i] = self._reduce(parts[i])
        return torch.cat(parts), float(loss.detach())

    def _shifted_grad(self, direction: Tensor, h: float) -> Tensor:
        """The gradient at ``w + h * direction`` (weights restored afterwards)."""
        assert self._saved_weights is not None
        offset = 0
        try:
            with torch.no_grad():
                for p, w in zip(self.params, self._saved_weights):
                    n = p.numel()
                    piece = direction[offset : offset + n]
                    offset += n
                    local = full_to_local(piece, p).reshape(w.shape)
                    local_shard(p).copy_(w + (h * local).to(w.dtype))
            grad, _ = self._grad()
        finally:
            self._restore_weights()
        return grad

    @property
    def loss(self) -> float:
        """The loss value at the current weights (local to this rank)."""
        if self._loss is None:
            self.gradient()
        assert self._loss is not None
        return self._loss

    def gradient(self) -> Tensor:
        """The flat gradient at the current weights (rank-averaged), float64."""
        if self._flat_grad is None:
            self._open()
            self._flat_grad, self._loss = self._grad()
        return self._flat_grad

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (identical on every rank); returns a flat,
        detached vector in the parameter dtype, averaged over ranks."""
        self._open()
        v = v.detach().to(device=self.device, dtype=torch.float64).reshape(-1)
        norm = float(v.norm())
        self.num_products += 1
        if norm == 0.0:
            return torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        u = v / norm
        h = self.step
        plus = self._shifted_grad(u, h)
        minus = self._shifted_grad(u, -h)
        return ((plus - minus) * (norm / (2.0 * h))).to(self.dtype)

    def close(self) -> None:
        """Put the saved weights (bit for bit) and ``.grad`` back."""
        if self._saved_weights is not None:
            self._restore_weights()
            assert self._saved_grads is not None
            for p, g in zip(self._guarded, self._saved_grads):
                p.grad = g
        self._saved_weights = None
        self._saved_grads = None
        self._flat_grad = None
        self._loss = None
