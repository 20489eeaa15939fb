"""Critical sharpness: curvature along an update direction from forward passes only.

Kalra et al. (2026) measure how far a step along the optimizer's update direction can go
before the loss rises. For a direction ``d`` (the update per unit learning rate, e.g.
``d = -g`` for gradient descent) the *critical step size* is

    eta_c = min { eta > 0 : L(w + eta d) > L(w) },

and the *critical sharpness* is ``2 / eta_c``. On a quadratic
``L = 1/2 w^T H w + b^T w`` with gradient ``g``,
``L(w + eta d) - L(w) = eta d^T g + eta^2 / 2 d^T H d``, so
``eta_c = -2 d^T g / (d^T H d)`` and for ``d = -g`` the critical sharpness is the
directional curvature ``g^T H g / g^T g``: ``2 / eta_c`` compares with ``2 / lr`` as
``lambda_max`` does, without a single Hessian-vector product.

The reading is defined only along a descent direction (``d^T g < 0``): along any other
direction the loss rises from the first step, ``eta_c`` is 0 (or, in floating point, a
step of the order of the loss's rounding), and ``2 / eta_c`` is not a curvature. Such a
reading is undefined (NaN), not huge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CriticalStep", "LineLoss", "critical_step_size"]


@dataclass
class CriticalStep:
    """Result of :func:`critical_step_size`.

    Attributes:
        eta: estimate of the critical step size (midpoint of the final bracket);
            ``inf`` when the loss did not rise up to ``eta_max``, ``0`` when it rose at
            every step tried down to ``eta_min`` or until ``max_evals`` ran out (``d`` is
            not a descent direction); NaN when the slope given to
            :func:`critical_step_size` shows that ``d`` is not a descent direction.
        lower: largest step tried that did not raise the loss (0 if none).
        upper: smallest step tried that raised the loss (``inf`` if none).
        evaluations: loss evaluations (forward passes) used.
    """

    eta: float
    lower: float
    upper: float
    evaluations: int

    @property
    def defined(self) -> bool:
        """The search found a crossing (or none up to ``eta_max``) along a descent
        direction: ``eta > 0``, not NaN."""
        return self.eta > 0.0

    @property
    def sharpness(self) -> float:
        """``2 / eta`` (0 when the loss never rose up to ``eta_max``; NaN when undefined:
        the loss rose at every step tried, or the direction is not a descent direction)."""
        if not self.defined:
            return math.nan
        return 2.0 / self.eta


def critical_step_size(
    line_loss: Callable[[float], float],
    loss0: float,
    eta0: float,
    *,
    rtol: float = 0.02,
    max_evals: int = 30,
    eta_min: float = 1e-12,
    eta_max: float = 1e12,
    slope: float | None = None,
) -> CriticalStep:
    """Smallest step ``eta`` along a line at which the loss rises above ``loss0``,
    by bracketing (doubling or halving from ``eta0``) then bisection.

    Args:
        line_loss: ``eta -> L(w + eta d)``; a non-finite value counts as a rise.
        loss0: ``L(w)``.
        eta0: first step tried (the current learning rate or the last ``eta_c`` makes a
            good guess, so that few halvings or doublings are needed).
        rtol: stop once the bracket is narrower than ``rtol`` times its upper end.
            Default 0.02.
        max_evals: cap on loss evaluations. Default 30.
        eta_min, eta_max: give up below/above these steps.
        slope: the directional derivative ``d^T g`` at ``eta = 0``, if known. A slope
            that is not negative makes the result undefined (``eta`` NaN) without a single
            evaluation: the first crossing is at 0, and a search would only find where
            the loss's rounding noise first dips below ``loss0``.

    On a slice that is not convex the loss may rise and fall again; the search returns
    the crossing bracketed from ``eta0``, which is the first one whenever the slice is
    convex between 0 and ``eta0``.
    """
    if not (eta0 > 0 and math.isfinite(eta0)):
        raise ValueError(f"eta0 must be a finite number > 0, got {eta0}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must lie in (0, 1), got {rtol}")
    if max_evals < 2:
        raise ValueError(f"max_evals must be >= 2, got {max_evals}")
    if slope is not None and not slope < 0:
        return CriticalStep(math.nan, 0.0, 0.0, 0)
    evals = 0

    def rises(eta: float) -> bool:
        nonlocal evals
        evals += 1
        value = line_loss(eta)
        return not math.isfinite(value) or value > loss0

    lower, upper = 0.0, math.inf
    eta = min(max(eta0, eta_min), eta_max)
    if rises(eta):
        upper = eta
        while evals < max_evals:
            eta = upper / 2.0
            if eta < eta_min:
                return CriticalStep(0.0, 0.0, upper, evals)
            if rises(eta):
                upper = eta
            else:
                lower = eta
                break
        if lower == 0.0:  # rose at every step tried: not a descent direction
            return CriticalStep(0.0, 0.0, upper, evals)
    else:
        lower = eta
        while evals < max_evals:
            eta = lower * 2.0
            if eta > eta_max:
                return CriticalStep(math.inf, lower, math.inf, evals)
            if rises(eta):
                upper = eta
                break
            lower = eta
    if math.isinf(upper):
        return CriticalStep(math.inf, lower, upper, evals)
    while evals < max_evals and upper - lower > rtol * upper:
        mid = 0.5 * (lower + upper)
        if rises(mid):
            upper = mid
        else:
            lower = mid
    return CriticalStep(0.5 * (lower + upper), lower, upper, evals)


class LineLoss:
    """``eta -> L(w + eta d)`` on live parameters, for :func:`critical_step_size`.

    Moves ``params`` in place to ``w + eta d`` for each evaluation (under ``no_grad``) and
    copies the saved ``w`` back afterwards: a copy, not a subtraction, because
    ``(w + eta d) - eta d`` is not ``w`` in floating point. Use as a context manager so
    the weights are restored even if a forward pass raises.

    Args:
        params: the parameters to move.
        direction: flat direction ``d`` (in parameter order).
        loss: returns the scalar loss at the current parameters.

    Memory: one copy of ``params``.
    """

    def __init__(
        self, params: Sequence[Tensor], direction: Tensor, loss: Callable[[], Tensor]
    ) -> None:
        self.params = list(params)
        total = sum(p.numel() for p in self.params)
        if direction.numel() != total:
            raise ValueError(f"direction has {direction.numel()} entries, params have {total}")
        self._direction = direction.reshape(-1)
        self._loss = loss
        self._saved: list[Tensor] | None = None

    def __enter__(self) -> LineLoss:
        self._saved = [p.detach().clone() for p in self.params]
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
        self._saved = None

    def restore(self) -> None:
        """Put the saved weights back, bit for bit."""
        if self._saved is None:
            return
        with torch.no_grad():
            for p, w in zip(self.params, self._saved):
                p.copy_(w)

    def __call__(self, eta: float) -> float:
        if self._saved is None:
            raise RuntimeError("LineLoss must be used inside a `with` block")
        offset = 0
        with torch.no_grad():
            for p, w in zip(self.params, self._saved):
                n = p.numel()
                d = self._direction[offset : offset + n].view_as(p).to(p.dtype)
                p.copy_(w + eta * d)
                offset += n
            value = float(self._loss())
        self.restore()
        return value
