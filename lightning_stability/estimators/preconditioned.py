"""Stability thresholds of optimizers and the preconditioned Hessian of adaptive methods.

Edge of stability (Cohen et al. 2021, "Gradient descent on neural networks typically
occurs at the edge of stability"): on a quadratic with curvature ``lambda`` the iteration
of an optimizer with step size ``lr`` diverges once ``lambda`` exceeds a threshold:

* gradient descent: ``2 / lr``;
* heavy ball as PyTorch writes it (``b <- mu b + (1 - dampening) g``, ``w <- w - lr b``):
  ``2 (1 + mu) / ((1 - dampening) lr)``;
* Nesterov (PyTorch form, ``w <- w - lr (g + mu b)``): ``2 (1 + mu) / ((1 + 2 mu) lr)``.

Adaptive methods (Cohen et al. 2022, "Adaptive gradient methods at the edge of
stability"): Adam steps ``w <- w - lr m_hat / D`` with ``D = diag(sqrt(v_hat) + eps)``, i.e.
preconditioned heavy ball with an exponential moving average ``m``. Its stability is
governed by the *preconditioned sharpness* ``lambda_max(D^-1 H)``, whose threshold is
``2 (1 + beta1) / ((1 - beta1) lr)`` (``38 / lr`` for ``beta1 = 0.9``). Writing
``P = D / lr`` (as the paper does) makes ``lambda_max(P^-1 H)`` dimensionless with the
threshold ``2 (1 + beta1) / (1 - beta1)``; both give the same ratio.

``D^-1 H`` is not symmetric, but it is similar to ``D^-1/2 H D^-1/2``, which has the same
eigenvalues and can be handed to Lanczos; :class:`ScaledOperator` is that symmetric form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ScaledOperator",
    "adam_edge",
    "adam_preconditioner",
    "adam_state_scale",
    "sgd_edge",
]


def sgd_edge(
    lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False
) -> float:
    """The curvature (1/parameter units^2 of the loss) above which SGD with PyTorch's
    momentum convention diverges on a quadratic; ``2 / lr`` without momentum."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if nesterov:
        return 2.0 * (1.0 + momentum) / ((1.0 + 2.0 * momentum) * lr)
    return 2.0 * (1.0 + momentum) / ((1.0 - dampening) * lr)


def adam_edge(lr: float, beta1: float) -> float:
    """The threshold ``2 (1 + beta1) / ((1 - beta1) lr)`` on the preconditioned sharpness
    ``lambda_max(D^-1 H)`` of Adam/AdamW (Cohen et al. 2022); ``38 / lr`` at
    ``beta1 = 0.9``."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1 must lie in [0, 1), got {beta1}")
    return 2.0 * (1.0 + beta1) / ((1.0 - beta1) * lr)


def adam_preconditioner(
    exp_avg_sq: Tensor, step: int | float | Tensor, beta2: float, eps: float
) -> Tensor:
    """Adam's diagonal ``D = sqrt(v_hat) + eps`` with ``v_hat = v / (1 - beta2^step)``
    (bias-corrected second moment), as the optimizer divides by it; float64 for accuracy.

    Pass ``max_exp_avg_sq`` for AMSGrad, which divides by the running maximum instead.
    """
    step = float(step)
    if step < 1:
        raise ValueError(f"step must be >= 1 (the optimizer has stepped), got {step}")
    v_hat = exp_avg_sq.detach().to(torch.float64) / (1.0 - beta2**step)
    return v_hat.sqrt() + eps


def adam_state_scale(
    optimizer: torch.optim.Optimizer, params: list[Tensor]
) -> tuple[Tensor, float] | None:
    """Per-parameter scale ``s = 1 / (D * edge)`` for the parameters ``params`` of an
    Adam-family ``optimizer``, flat and in parameter order, and the reference edge
    (that of the first group holding one of ``params``).

    ``lambda_max(s^1/2 H s^1/2)`` is then directly the edge-of-stability ratio, even when
    groups use different learning rates or betas. Returns ``None`` while any parameter
    has no second-moment state yet (before the first step), and while a group's learning
    rate is 0 (the start of a warm-up: no step is taken, so there is no edge).
    """
    group_of: dict[int, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group
    parts: list[Tensor] = []
    ref_edge: float | None = None
    for p in params:
        group = group_of.get(id(p))
        state = optimizer.state.get(p, {})
        if group is None or "exp_avg_sq" not in state or not float(group["lr"]) > 0:
            return None
        v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state["exp_avg_sq"]
        d = adam_preconditioner(v, state["step"], group["betas"][1], group["eps"])
        edge = adam_edge(float(group["lr"]), float(group["betas"][0]))
        if ref_edge is None:
            ref_edge = edge
        parts.append((1.0 / (d * edge)).reshape(-1))
    if not parts or ref_edge is None:
        return None
    return torch.cat(parts), ref_edge


class ScaledOperator:
    """The symmetric operator ``v -> s^1/2 * A(s^1/2 * v)`` for a symmetric ``A`` and a
    positive diagonal ``s``: similar to ``diag(s) A``, so it has the same eigenvalues.

    With ``A = H`` and ``s = 1 / D`` its top eigenvalue is Adam's preconditioned sharpness;
    with ``s = 1 / (D * edge)`` it is the edge-of-stability ratio itself.

    Args:
        matvec: ``v -> A v`` on flat vectors.
        scale: the diagonal ``s`` as a flat tensor (positive).
    """

    def __init__(self, matvec: Callable[[Tensor], Tensor], scale: Tensor) -> None:
        if scale.dim() != 1:
            raise ValueError(f"scale must be a flat vector, got shape {tuple(scale.shape)}")
        if not bool((scale > 0).all()):
            raise ValueError("scale must be positive everywhere")
        self._matvec = matvec
        self.sqrt_scale = scale.sqrt()
        self.num_products = 0

    @property
    def dim(self) -> int:
        return self.sqrt_scale.numel()

    def matvec(self, v: Tensor) -> Tensor:
        root = self.sqrt_scale.to(device=v.device, dtype=v.dtype)
        out = self._matvec(root * v)
        self.num_products += 1
        return root.to(device=out.device, dtype=out.dtype) * out

    __call__ = matvec
