"""Early-warning indicators of a critical transition: rising variance and rising lag-1
autocorrelation ("critical slowing down"), tested for a trend with Kendall's tau.

Scheffer et al. 2009, "Early-warning signals for critical transitions"; Dakos et al.
2012, "Methods for detecting early warnings of critical transitions in time series
illustrated using simulated ecological data" (rolling-window variance and lag-1
autocorrelation of the detrended series, Kendall's tau of each against time).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from lightning_stability.warning.events import Level

__all__ = ["TrendIndicator", "TrendReading", "kendall_tau", "variance_and_ac1"]


def kendall_tau(values: Sequence[float]) -> float:
    """Kendall's tau-b between ``values`` and their position (time): +1 when strictly
    increasing, -1 when strictly decreasing, about 0 for no monotone trend."""
    n = len(values)
    if n < 2:
        return 0.0
    concordant = 0
    ties = 0
    for i in range(n - 1):
        vi = values[i]
        for j in range(i + 1, n):
            d = values[j] - vi
            if d > 0:
                concordant += 1
            elif d < 0:
                concordant -= 1
            else:
                ties += 1
    pairs = n * (n - 1) // 2
    # tau-b: time has no ties, so only the values' ties shrink the denominator
    denom = (pairs * (pairs - ties)) ** 0.5
    return concordant / denom if denom > 0 else 0.0


def variance_and_ac1(values: Sequence[float]) -> tuple[float, float]:
    """Variance and lag-1 autocorrelation of ``values`` after removing their least-squares
    line, so that a steady drift (a falling loss) is not mistaken for memory."""
    n = len(values)
    t_mean = (n - 1) / 2
    v_mean = sum(values) / n
    stt = sum((t - t_mean) ** 2 for t in range(n))
    slope = sum((t - t_mean) * (v - v_mean) for t, v in enumerate(values)) / stt
    r = [v - v_mean - slope * (t - t_mean) for t, v in enumerate(values)]
    ss = sum(x * x for x in r)
    var = ss / (n - 2)
    ac1 = sum(r[t] * r[t - 1] for t in range(1, n)) / ss if ss > 0 else 0.0
    return var, ac1


class TrendReading(NamedTuple):
    """The indicator's state after a value: Kendall's tau of the rolling variance and of
    the rolling lag-1 autocorrelation against time, the ratio of the latest rolling
    variance to the earliest in the history, the rise of the autocorrelation over the
    history, and the level this amounts to."""

    tau_var: float
    tau_ac1: float
    var_ratio: float
    ac1_rise: float
    level: Level


class TrendIndicator:
    """Critical-slowing-down detector for one signal.

    Every value updates a rolling window; once it is full, the window's variance and
    lag-1 autocorrelation are appended to a history. Once the history is full, the
    signal is at WATCH when the variance has a rising trend (Kendall tau >= ``tau``) and
    grew by at least ``var_factor`` over the history; at WARNING when, in addition, the
    lag-1 autocorrelation rises (tau >= ``tau``, growth >= ``ac1_rise``) and both have
    held for ``sustain`` consecutive values. Short bursts of apparent slowing down are
    common in stationary autocorrelated series, hence the persistence requirement.

    Args:
        window: values per rolling window (default 32).
        history: rolling statistics over which the trend is tested (default 64).
        tau: minimum Kendall tau of a rising trend (default 0.6).
        var_factor: minimum growth of the rolling variance (default 3.0).
        ac1_rise: minimum rise of the lag-1 autocorrelation (default 0.2).
        sustain: consecutive values both must rise for before WARNING (default 10).
    """

    def __init__(
        self,
        window: int = 32,
        history: int = 64,
        tau: float = 0.6,
        var_factor: float = 3.0,
        ac1_rise: float = 0.2,
        sustain: int = 10,
    ) -> None:
        if window < 4:
            raise ValueError(f"trend_window must be >= 4, got {window!r}")
        if history < 4:
            raise ValueError(f"trend_history must be >= 4, got {history!r}")
        if not 0 < tau <= 1:
            raise ValueError(f"trend_tau must be in (0, 1], got {tau!r}")
        if not var_factor > 1:
            raise ValueError(f"trend_var_factor must be > 1, got {var_factor!r}")
        if sustain < 1:
            raise ValueError(f"trend_sustain must be >= 1, got {sustain!r}")
        self.window = window
        self.history = history
        self.tau = tau
        self.var_factor = var_factor
        self.ac1_rise = ac1_rise
        self.sustain = sustain
        self.streak = 0
        self.values: deque[float] = deque(maxlen=window)
        self.variances: deque[float] = deque(maxlen=history)
        self.ac1s: deque[float] = deque(maxlen=history)
        self.last: TrendReading | None = None

    def update(self, value: float) -> TrendReading | None:
        """Add a value; the indicator's reading, or None until the history is full."""
        self.values.append(value)
        if len(self.values) < self.window:
            return None
        var, ac1 = variance_and_ac1(list(self.values))
        self.variances.append(var)
        self.ac1s.append(ac1)
        self.last = self._evaluate(advance=True)
        return self.last

    def _evaluate(self, advance: bool = False) -> TrendReading | None:
        if len(self.variances) < self.history:
            return None
        tau_var = kendall_tau(list(self.variances))
        tau_ac1 = kendall_tau(list(self.ac1s))
        first = self.variances[0]
        ratio = self.variances[-1] / first if first > 0 else float("inf")
        rise = self.ac1s[-1] - self.ac1s[0]
        level = Level.OK
        if tau_var >= self.tau and ratio >= self.var_factor:
            level = Level.WATCH
            slowing = tau_ac1 >= self.tau and rise >= self.ac1_rise
            if advance:
                self.streak = self.streak + 1 if slowing else 0
            if slowing and self.streak >= self.sustain:
                level = Level.WARNING
        elif advance:
            self.streak = 0
        return TrendReading(tau_var, tau_ac1, ratio, rise, level)

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": list(self.values),
            "variances": list(self.variances),
            "ac1s": list(self.ac1s),
            "streak": self.streak,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state["values"])
        self.variances.clear()
        self.variances.extend(float(v) for v in state["variances"])
        self.ac1s.clear()
        self.ac1s.extend(float(v) for v in state["ac1s"])
        self.streak = int(state.get("streak", 0))
        self.last = self._evaluate()
