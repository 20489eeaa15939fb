"""A robust online baseline: rolling median and MAD, with warm-up and freezing."""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "MAD_TO_SIGMA",
    "RobustBaseline",
    "SortedWindow",
    "median",
    "median_abs_deviation_of_sorted",
    "median_of_sorted",
]

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a standard deviation for Gaussian data."""


def median(values: Iterable[float]) -> float:
    return median_of_sorted(sorted(values))


def median_of_sorted(s: list[float]) -> float:
    """The median of values already in ascending order."""
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])


def median_abs_deviation_of_sorted(s: list[float], center: float) -> float:
    """The median of ``|v - center|`` over ``s`` (ascending, no NaN), by merging the two
    sides of ``center`` outwards instead of sorting the deviations: ``O(n)`` rather than
    ``O(n log n)``, and the same value, since ``center - v`` is exactly ``|v - center|``
    for ``v < center`` in IEEE arithmetic."""
    n = len(s)
    if n == 0:
        return math.nan
    right = bisect.bisect_left(s, center)  # s[right:] >= center
    left = right - 1  # s[:right] < center
    upper = n // 2  # index of the upper middle deviation
    previous = current = 0.0
    for k in range(upper + 1):
        below = center - s[left] if left >= 0 else math.inf
        above = s[right] - center if right < n else math.inf
        if below <= above:
            current, left = below, left - 1
        else:
            current, right = above, right + 1
        if k == upper - 1:
            previous = current
    return current if n % 2 else 0.5 * (previous + current)


class SortedWindow:
    """The last ``maxlen`` values, in arrival order (:attr:`values`, a deque) and in
    ascending order (:meth:`ordered`), the latter kept up to date by bisection as values
    arrive and leave instead of being sorted again at every request.

    While a NaN is held (which has no place in an order) :meth:`ordered` sorts the values
    as ``sorted`` does, so the result is the same either way.
    """

    __slots__ = ("_sorted", "values")

    def __init__(self, maxlen: int) -> None:
        self.values: deque[float] = deque(maxlen=maxlen)
        self._sorted: list[float] | None = []  # None: rebuild on request

    def __len__(self) -> int:
        return len(self.values)

    def append(self, value: float) -> None:
        ordered = self._sorted
        if ordered is not None:
            if value != value:
                self._sorted = None
            else:
                if len(self.values) == self.values.maxlen:
                    del ordered[bisect.bisect_left(ordered, self.values[0])]
                bisect.insort(ordered, value)
        self.values.append(value)

    def extend(self, values: Iterable[float]) -> None:
        for value in values:
            self.append(value)

    def clear(self) -> None:
        self.values.clear()
        self._sorted = []

    def ordered(self) -> list[float]:
        """The values in ascending order (do not modify the list)."""
        if self._sorted is None:
            ordered = sorted(self.values)
            if any(v != v for v in ordered):
                return ordered
            self._sorted = ordered
        return self._sorted

    def median(self) -> float:
        return median_of_sorted(self.ordered())


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
        self._window = SortedWindow(window)
        self.values: deque[float] = self._window.values
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
        self._window.append(value)
        ordered = self._window.ordered()
        center = self._center = median_of_sorted(ordered)
        mad = median_abs_deviation_of_sorted(ordered, center)
        self._scale = max(MAD_TO_SIGMA * mad, self.min_scale)

    def score(self, value: float) -> float | None:
        """Robust z-score of ``value`` against the baseline; None during warm-up."""
        if not self.ready:
            return None
        return (value - self._center) / self._scale

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._window.clear()
        for v in state["values"]:
            self.update(float(v))
