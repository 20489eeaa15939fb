"""Hessian-vector products of a scalar loss, with no side effects on the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "HessianOperator",
    "LossClosure",
    "ParameterOperator",
    "Reducer",
    "flatten",
    "forward_over_reverse_hvp",
    "unflatten",
]

LossClosure = Callable[[], Tensor]
"""A function of no arguments returning the scalar loss at the current parameters."""

Reducer = Callable[[Tensor], Tensor]
"""Maps a flat tensor to its average over data-parallel ranks (identity when single)."""


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Concatenate tensors into one flat vector (optionally cast to ``dtype``)."""
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped (and typed) like ``like``."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].view_as(t).to(t.dtype))
        offset += n
    return out


class ParameterOperator:
    """What a Hessian operator on a module's parameters keeps whatever computes its
    products: the parameters that require grad, the loss closure, the reducer over ranks,
    the count of products, its size and dtype; :meth:`close` runs on leaving a ``with``
    block. Subclasses implement :meth:`matvec`, :meth:`gradient` and :meth:`close`."""

    def __init__(
        self,
        loss_closure: LossClosure,
        params: Sequence[Tensor],
        reduce: Reducer | None = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params: no parameter requires grad")
        self._closure = loss_closure
        self._reduce = reduce
        self.num_products = 0

    @property
    def dim(self) -> int:
        """Number of scalar parameters (over all shards; the operator is ``dim x dim``)."""
        return sum(p.numel() for p in self.params)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def gradient(self) -> Tensor:
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def close(self) -> None:
        """Release what the products hold."""

    def __enter__(self) -> ParameterOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HessianOperator(ParameterOperator):
    """The Hessian of ``loss_closure()`` with respect to ``params`` as a linear operator
    on flat vectors, by double backward.

    The gradient graph is built once (``create_graph=True``) and reused for every
    product, so each product costs one extra backward pass. Products never write to
    ``.grad``; the graph is released by :meth:`close` (or on leaving a ``with`` block).

    Args:
        loss_closure: returns the scalar loss; called once, lazily.
        params: parameters to differentiate with respect to (frozen ones are skipped by
            the caller); their dtype is the dtype of the products.
        reduce: averages a flat tensor over data-parallel ranks. ``autograd.grad`` does
            not fire DDP's gradient hooks, so under DDP every product and the gradient
            must be reduced explicitly for all ranks to see the Hessian of the union
            of their batches.

    Attributes:
        num_products: Hessian-vector products computed so far.
    """

    def __init__(
        self,
        loss_closure: LossClosure,
        params: Sequence[Tensor],
        reduce: Reducer | None = None,
    ) -> None:
        super().__init__(loss_closure, params, reduce)
        self._loss: Tensor | None = None
        self._grads: tuple[Tensor, ...] | None = None
        self._flat_grad: Tensor | None = None

    def _build(self) -> tuple[Tensor, ...]:
        if self._grads is None:
            with torch.enable_grad():
                loss = self._closure()
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError("loss_closure must return a scalar tensor")
                if not loss.requires_grad:
                    raise ValueError("loss_closure returned a loss that does not depend on params")
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            self._loss = loss.detach()
            self._grads = tuple(
                g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)
            )
        return self._grads

    def _reduced(self, flat: Tensor) -> Tensor:
        return self._reduce(flat) if self._reduce is not None else flat

    @property
    def loss(self) -> float:
        """The loss value at which the Hessian is taken (local to this rank)."""
        self._build()
        assert self._loss is not None
        return float(self._loss)

    def gradient(self) -> Tensor:
        """The flat gradient at the current parameters (rank-averaged), detached."""
        if self._flat_grad is None:
            self._flat_grad = self._reduced(flatten([g.detach() for g in self._build()]))
        return self._flat_grad

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (cast to the parameter dtype); returns a flat,
        detached vector, averaged over ranks."""
        grads = self._build()
        v = v.to(device=self.device, dtype=self.dtype)
        with torch.enable_grad():
            hv = torch.autograd.grad(
                grads,
                self.params,
                grad_outputs=unflatten(v, self.params),
                retain_graph=True,
                allow_unused=True,
            )
        flat = torch.cat(
            [
                (h if h is not None else torch.zeros_like(p)).reshape(-1)
                for h, p in zip(hv, self.params)
            ]
        ).detach()
        self.num_products += 1
        return self._reduced(flat)

    def close(self) -> None:
        """Free the gradient graph."""
        self._grads = None
        self._loss = None
        self._flat_grad = None


def forward_over_reverse_hvp(
    loss_of_params: Callable[..., Tensor],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
) -> tuple[Tensor, ...]:
    """``H v`` by forward-mode differentiation of the gradient (``torch.func.jvp`` of
    ``torch.func.grad``), for a loss written as a pure function of its parameters
    (e.g. through ``torch.func.functional_call``).

    Each product re-runs the forward and backward pass, where :class:`HessianOperator`
    builds the gradient graph once and reuses it; ``benchmarks/estimators.py`` measures
    both, and the operator (double backward with graph reuse) is the default because
    curvature probes take many products at one point.
    """
    grad_fn = torch.func.grad(lambda ps: loss_of_params(*ps))
    _, hv = torch.func.jvp(grad_fn, (tuple(params),), (tuple(vectors),))
    return tuple(hv)
