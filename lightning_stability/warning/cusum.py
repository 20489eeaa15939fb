"""A one-sided CUSUM on the meta-state deviation: sustained moderate shifts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["Cusum"]


class Cusum:
    """Page's one-sided cumulative sum (Page 1954, "Continuous inspection schemes").

    ``S_t = max(0, S_{t-1} + x_t - drift)``: each step's excess of ``x_t`` over ``drift``
    accumulates, and steps below ``drift`` pay it back. A single spike adds its excess
    once; a shift that persists, even one too small to cross a per-step threshold, grows
    ``S`` linearly until it reaches ``threshold``. Baselines that adapt to a slow drift
    (a rolling median does within half its window) miss exactly this case. ``S`` is
    capped at twice the threshold, so that it falls below the threshold within a few calm
    steps after a long alarm.

    Args:
        drift: the per-step allowance, in the units of ``x`` (robust sd for the
            deviation); values at or below it never accumulate.
        threshold: the alarm level of ``S``.
    """

    def __init__(self, drift: float, threshold: float) -> None:
        if not drift > 0:
            raise ValueError(f"cusum_drift must be > 0, got {drift!r}")
        if not threshold > 0:
            raise ValueError(f"cusum_threshold must be > 0, got {threshold!r}")
        self.drift = drift
        self.threshold = threshold
        self.value = 0.0

    def update(self, x: float) -> float:
        """Add one observation (non-finite ones are ignored) and return ``S``."""
        if math.isfinite(x):
            self.value = min(max(0.0, self.value + x - self.drift), 2.0 * self.threshold)
        return self.value

    @property
    def alarm(self) -> bool:
        return self.value >= self.threshold

    def reset(self) -> None:
        self.value = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.value = float(state["value"])
