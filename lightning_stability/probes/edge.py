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

__all__ = ["LR_JUMP", "EdgePrediction", "step_lr"]

LR_JUMP = 1.5
"""One-step growth of the learning rate that counts as a jump: a warm-up or a schedule moves
it by a few percent a step, a broken warm-up or a manual change by much more."""


def step_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest learning rate among the optimizer's param groups (the one whose edge is
    nearest)."""
    return max((float(g.get("lr", 0.0)) for g in optimizer.param_groups), default=0.0)


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
