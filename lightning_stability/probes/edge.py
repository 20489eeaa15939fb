"""The edge-of-stability ratio carried from the last curvature reading to the learning rate
about to be used.

For every optimizer the probe supports, the edge is proportional to ``1 / lr`` (``2/lr``
for SGD, ``2(1+mu)/lr`` with momentum, ``2(1+beta1)/((1-beta1) lr)`` for Adam's
preconditioned sharpness; Cohen et al. 2021, 2022), so with the curvature unchanged the
ratio scales with the learning rate: ``predicted = measured * lr_now / lr_measured``.
Schedules, warm-up, a backoff and a manual change all show in ``lr_now``, which is read
from the optimizer just before it steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "LR_JUMP",
    "EdgePrediction",
    "group_edge",
    "lambda_edge",
    "preconditioned_edge",
    "step_lr",
]

LR_JUMP = 1.5
"""One-step growth of the learning rate that counts as a jump: a warm-up or a schedule moves
it by a few percent a step, a broken warm-up or a manual change by much more."""


def step_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest learning rate among the optimizer's param groups (the one whose edge is
    nearest)."""
    # optimizers that pick their own step size (Adafactor with relative steps) keep lr None
    return max((float(g.get("lr") or 0.0) for g in optimizer.param_groups), default=0.0)


class EdgePrediction:
    """The latest measured ratio and the learning rate it was measured at.

    Args:
        recheck_growth: learning-rate growth since the last reading after which a
            predicted ratio above 1 asks for a fresh reading (default 1.1).
    """

    def __init__(self, recheck_growth: float = 1.1) -> None:
        self.recheck_growth = recheck_growth
        self.ratio = math.nan
        self.ratio_lr = math.nan
        self.prev_lr = math.nan

    def measured(self, ratio: float | None, lr: float) -> None:
        """Record a fresh ratio reading taken with learning rate ``lr``."""
        if ratio is not None and math.isfinite(ratio) and lr > 0:
            self.ratio, self.ratio_lr = float(ratio), float(lr)

    def predict(self, lr: float) -> tuple[float, float]:
        """``(predicted ratio, one-step learning-rate change)`` for a step at ``lr``; NaN
        where not yet defined."""
        change = lr / self.prev_lr if self.prev_lr > 0 else math.nan
        self.prev_lr = lr
        if not (self.ratio_lr > 0):
            return math.nan, change
        return self.ratio * lr / self.ratio_lr, change

    def stale(self, lr: float, predicted: float) -> bool:
        """The edge has moved enough since the last reading to need a new one: the
        predicted ratio is above 1 and the learning rate grew by ``recheck_growth``."""
        return predicted > 1.0 and self.ratio_lr > 0 and lr >= self.recheck_growth * self.ratio_lr

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "ratio_lr": self.ratio_lr, "prev_lr": self.prev_lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ratio = float(state["ratio"])
        self.ratio_lr = float(state["ratio_lr"])
        self.prev_lr = float(state["prev_lr"])


ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW)
"""Optimizers whose edge of stability bounds the preconditioned Hessian (Cohen et al. 2022)."""


def group_edge(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> float:
    """The edge of the raw Hessian's curvature for one param group's next step (1 / units
    of the parameters squared); ``inf`` at learning rate 0 (no step, no edge).

    * SGD, heavy ball, Nesterov (PyTorch's conventions):
      :func:`~lightning_stability.estimators.sgd_edge`, exact on a quadratic;
    * any other optimizer: ``2 / lr``. For Adam/AdamW this is the reference the directional
      curvature's crossing is read against (Bai et al. 2025), not an edge: theirs bounds
      the preconditioned sharpness (:func:`preconditioned_edge`). For other adaptive
      optimizers (RMSprop, Adagrad) it is an approximation that ignores their state.
    """
    from lightning_stability.estimators.preconditioned import sgd_edge

    lr = float(group["lr"])
    if not lr > 0:
        return math.inf
    if isinstance(optimizer, torch.optim.SGD):
        return sgd_edge(
            lr,
            float(group.get("momentum", 0.0)),
            float(group.get("dampening", 0.0)),
            bool(group.get("nesterov", False)),
        )
    return 2.0 / lr


def lambda_edge(optimizer: torch.optim.Optimizer) -> float:
    """The edge ``lambda_max`` and ``directional`` are compared with: the smallest
    :func:`group_edge` over param groups (so the ratio is an upper bound). The one
    definition behind ``eos_ratio`` (optimizers other than Adam/AdamW),
    ``directional_ratio``, the dashboard's ``ref/lambda_edge`` line and the report."""
    return min((group_edge(optimizer, g) for g in optimizer.param_groups), default=math.inf)


def preconditioned_edge(optimizer: torch.optim.Optimizer) -> float | None:
    """The edge ``2 (1 + beta1) / ((1 - beta1) lr)`` of Adam/AdamW's preconditioned
    sharpness ``lambda_max(D^-1 H)`` (Cohen et al. 2022; the smallest over groups), behind
    their ``eos_ratio`` and the dashboard's ``ref/preconditioned_edge``; ``None`` for
    other optimizers."""
    from lightning_stability.estimators.preconditioned import adam_edge

    if not isinstance(optimizer, ADAPTIVE):
        return None
    edges = [
        adam_edge(float(g["lr"]), float(g["betas"][0]))
        for g in optimizer.param_groups
        if float(g["lr"]) > 0
    ]
    return min(edges, default=math.inf)
