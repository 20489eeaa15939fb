"""A robust online baseline: rolling median and MAD, with warm-up and freezing."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

__all__ = ["MAD_TO_SIGMA", "RobustBaseline", "median"]

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a standard deviation for Gaussian data."""


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])


class RobustBaseline:
    """What "normal" looks like for one signal: the median of its last ``window``
    values and a robust spread ``max(1.4826 * MAD, min_scale)``.

    Median and MAD ignore the isolated spikes that an EWMA would absorb, so a single
    bad batch neither moves the baseline nor hides the next one.

    Args:
        window: number of recent values kept (default 64).
        warmup: values needed before :meth:`score` answers (default 20).
        min_scale: floor of the spread, in the signal's own (transformed) units.
    """

    def __init__(self, window: int = 64, warmup: int = 20, min_scale: float = 0.02) -> None:
        if window < 3:
            raise ValueError(f"window must be >= 3, got {window!r}")
        if not 1 <= warmup <= window:
            raise ValueError(f"warmup must be in [1, window={window}], got {warmup!r}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {min_scale!r}")
        self.window = window
        self.warmup = warmup
        self.min_scale = min_scale
        self.values: deque[float] = deque(maxlen=window)
        self._center = math.nan
        self._scale = math.nan

    @property
    def ready(self) -> bool:
        return len(self.values) >= self.warmup

    @property
    def center(self) -> float:
        return self._center

    @property
    def scale(self) -> float:
        return self._scale

    def update(self, value: float) -> None:
        """Learn from ``value`` (non-finite values are ignored)."""
        if not math.isfinite(value):
            return
        self.values.append(value)
        vals = list(self.values)
        self._center = median(vals)
        mad = median([abs(v - self._center) for v in vals])
        self._scale = max(MAD_TO_SIGMA * mad, self.min_scale)

    def score(self, value: float) -> float | None:
        """Robust z-score of ``value`` against the baseline; None during warm-up."""
        if not self.ready:
            return None
        return (value - self._center) / self._scale

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values.clear()
        for v in state["values"]:
            self.update(float(v))
