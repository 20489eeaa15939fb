"""Online statistics of a scalar stream: a rolling window and an exponential moving average.

Both are pure Python/PyTorch, hold only numbers and lists in their ``state_dict`` (so they
survive a checkpoint loaded with ``torch.load(weights_only=True)``), and are shared by the
probes (loss and gradient windows) and the warning layer.

Rising variance and rising lag-1 autocorrelation over a window are the classic early
warnings of a critical transition ("critical slowing down", Scheffer et al. 2009,
*Early-warning signals for critical transitions*, Nature 461).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["EMAStats", "RollingWindow", "lag1_autocorrelation"]


def _as_float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def lag1_autocorrelation(values: Sequence[float] | Tensor) -> float:
    """Lag-1 autocorrelation of a series: ``sum((x_t - m)(x_{t+1} - m)) / sum((x_t - m)^2)``
    with ``m`` the series mean (the standard biased estimator, in ``[-1, 1]`` up to edge
    effects). ``nan`` for fewer than 3 values or a constant series."""
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if x.numel() < 3:
        return math.nan
    d = x - x.mean()
    denom = float(d.square().sum())
    if denom <= 0.0:
        return math.nan
    return float((d[:-1] * d[1:]).sum()) / denom


class RollingWindow:
    """The last ``size`` values of a stream, with their summary statistics.

    Args:
        size: number of values kept (the oldest is dropped first); must be >= 1.

    Statistics are computed on request over the values currently held, in float64; with
    no values they are ``nan``. ``var`` is the unbiased sample variance (``nan`` for fewer
    than 2 values).

    The values are also kept in sorted order, updated by bisection as they arrive and
    leave, so that a quantile costs two look-ups and one interpolation instead of a sort of
    the window (while the window holds a NaN, quantiles fall back to ``torch.quantile``).
    """

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size = size
        self._values: deque[float] = deque(maxlen=size)
        self._cached: Tensor | None = None  # the values as a tensor, shared by the statistics
        self._sorted: list[float] | None = []  # the values in order; None: rebuild (or a NaN)
        self.total = 0  # values ever added, including those already dropped

    def update(self, value: float | Tensor) -> None:
        """Append one value (a number or a one-element tensor)."""
        x = _as_float(value)
        ordered = self._sorted
        if ordered is not None:
            if x != x:  # NaN: no place in an order
                self._sorted = None
            else:
                if len(self._values) == self.size:
                    del ordered[bisect.bisect_left(ordered, self._values[0])]
                bisect.insort(ordered, x)
        self._values.append(x)
        self._cached = None
        self.total += 1

    def clear(self) -> None:
        """Drop the values held (``total`` keeps counting)."""
        self._values.clear()
        self._cached = None
        self._sorted = []

    def extend(self, values: Iterable[float | Tensor]) -> None:
        for v in values:
            self.update(v)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def full(self) -> bool:
        return len(self._values) == self.size

    def values(self) -> list[float]:
        """The values held, oldest first."""
        return list(self._values)

    def tensor(self) -> Tensor:
        """The values held, oldest first, as a float64 tensor (do not modify it in place)."""
        if self._cached is None:
            self._cached = torch.tensor(self._values, dtype=torch.float64)
        return self._cached

    @property
    def last(self) -> float:
        return self._values[-1] if self._values else math.nan

    def mean(self) -> float:
        return float(self.tensor().mean()) if self._values else math.nan

    def var(self) -> float:
        return float(self.tensor().var(correction=1)) if len(self._values) >= 2 else math.nan

    def std(self) -> float:
        return math.sqrt(self.var()) if len(self._values) >= 2 else math.nan

    def max(self) -> float:
        return max(self._values) if self._values else math.nan

    def min(self) -> float:
        return min(self._values) if self._values else math.nan

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (``0 <= q <= 1``) with linear interpolation, as ``torch.quantile``.

        Computed as ``torch.quantile`` computes it (the rank ``q * (n - 1)``, the values at
        its floor and ceiling, ``torch.lerp`` between them), from the sorted values, so the
        result is the same float."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        if not self._values:
            return math.nan
        ordered = self._ordered()
        if ordered is None:
            return float(torch.quantile(self.tensor(), q))
        rank = q * (len(ordered) - 1)
        below = int(rank)
        above = math.ceil(rank)
        low = ordered[below]
        if below == above and math.isfinite(low):
            return low + 0.0  # lerp(a, a, 0) = a + 0 * 0 (+0.0 for -0.0)
        t = torch.tensor((low, ordered[above], rank - below), dtype=torch.float64)
        return float(t[0].lerp(t[1], t[2]))

    def _ordered(self) -> list[float] | None:
        """The values in ascending order; ``None`` while the window holds a NaN."""
        if self._sorted is None and not any(v != v for v in self._values):
            self._sorted = sorted(self._values)
        return self._sorted

    def ac1(self) -> float:
        """Lag-1 autocorrelation of the values held (see :func:`lag1_autocorrelation`)."""
        return lag1_autocorrelation(self.tensor())

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "values": list(self._values), "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = [float(v) for v in state["values"]]
        # A resumed run may use a different window size; keep the newest values that fit.
        self._values = deque(values[-self.size :], maxlen=self.size)
        self._cached = None
        self._sorted = None
        self.total = int(state.get("total", len(values)))


class EMAStats:
    """Exponential moving mean and variance of a stream.

    With weight ``alpha`` on the newest value: ``delta = x - mean``,
    ``mean += alpha * delta``, ``var = (1 - alpha) * (var + alpha * delta^2)``
    (the incremental form in Finch 2009, *Incremental calculation of weighted mean and
    variance*). The first value initialises the mean with variance 0.

    Args:
        alpha: weight of the newest value, in ``(0, 1]`` (a half-life of about
            ``ln 2 / alpha`` values); default 0.02.
    """

    def __init__(self, alpha: float = 0.02) -> None:
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= 1:
            raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.mean = math.nan
        self.var = math.nan
        self.count = 0

    def update(self, value: float | Tensor) -> None:
        """Fold one value in. Non-finite values are ignored (they would poison the state)."""
        x = _as_float(value)
        if not math.isfinite(x):
            return
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            delta = x - self.mean
            self.mean += self.alpha * delta
            self.var = (1.0 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.count += 1

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count else math.nan

    def zscore(self, value: float | Tensor) -> float:
        """``(value - mean) / std``; ``nan`` before two values, ``inf`` for a deviation from a
        constant history."""
        x = _as_float(value)
        if self.count < 2:
            return math.nan
        std = self.std
        if std == 0.0:
            return 0.0 if x == self.mean else math.copysign(math.inf, x - self.mean)
        return (x - self.mean) / std

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])
