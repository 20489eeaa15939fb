"""Early-warning indicators of a critical transition: rising variance and rising lag-1
autocorrelation ("critical slowing down"), tested for a trend with Kendall's tau.

Scheffer et al. 2009, "Early-warning signals for critical transitions"; Dakos et al.
2012, "Methods for detecting early warnings of critical transitions in time series
illustrated using simulated ecological data" (rolling-window variance and lag-1
autocorrelation of the detrended series, Kendall's tau of each against time).
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import Any, NamedTuple

import torch

from lightning_stability.warning.baseline import SortedWindow
from lightning_stability.warning.events import Level

__all__ = ["TrendIndicator", "TrendReading", "kendall_tau", "variance_and_ac1"]


def kendall_tau(values: Sequence[float]) -> float:
    """Kendall's tau-b between ``values`` and their position (time): +1 when strictly
    increasing, -1 when strictly decreasing, about 0 for no monotone trend."""
    n = len(values)
    if n < 2:
        return 0.0
    x = torch.tensor(values, dtype=torch.float64)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    signs = torch.sign(x[None, :] - x[:, None])[upper]
    pairs = n * (n - 1) // 2
    ties = int((signs == 0).sum())
    # tau-b: time has no ties, so only the values' ties shrink the denominator
    denom = (pairs * (pairs - ties)) ** 0.5
    return float(signs.sum()) / denom if denom > 0 else 0.0


def variance_and_ac1(values: Sequence[float]) -> tuple[float, float]:
    """Sample variance and lag-1 autocorrelation of ``values`` about their mean."""
    n = len(values)
    mean = sum(values) / n
    r = [v - mean for v in values]
    mul = operator.mul
    ss = sum(map(mul, r, r))
    # the products r[t] * r[t - 1], summed in the order of t
    ac1 = sum(map(mul, islice(r, 1, None), r)) / ss if ss > 0 else 0.0
    return ss / (n - 1), ac1


class TrendReading(NamedTuple):
    """The indicator's state after a value: Kendall's tau of the rolling variance and of
    the rolling lag-1 autocorrelation against time, the ratio of the latest rolling
    variance to its long-run median, the rise of the autocorrelation above its long-run
    median, and the level this amounts to."""

    tau_var: float
    tau_ac1: float
    var_ratio: float
    ac1_rise: float
    level: Level


class TrendIndicator:
    """Critical-slowing-down detector for one signal.

    Each value is detrended by a slow exponential moving average (span ``4 * window``,
    the online analogue of the kernel smoothing of Dakos et al., so that a falling loss
    is not mistaken for memory) and the residual enters a rolling window; once it is
    full, the window's variance and lag-1 autocorrelation are appended to a history. Once the history is full, the
    signal is at WATCH when the variance has a rising trend over the history (Kendall
    tau >= ``tau``) and is at least ``var_factor`` times its long-run median (over the
    last ``4 * history`` rolling windows, so that a slow rise still counts); at WARNING
    when, in addition, the lag-1 autocorrelation rises (tau >= ``tau``, at least
    ``ac1_rise`` above its long-run median) and both have held for ``sustain``
    consecutive values. Short bursts of apparent slowing down are
    common in stationary autocorrelated series, hence the persistence requirement.

    Args:
        window: values per rolling window (default 48).
        history: rolling statistics over which the trend is tested (default 96).
        tau: minimum Kendall tau of a rising trend (default 0.6).
        var_factor: minimum growth of the rolling variance (default 3.0).
        ac1_rise: minimum rise of the lag-1 autocorrelation (default 0.2).
        sustain: consecutive values both must rise for before WARNING (default 10).
    """

    def __init__(
        self,
        window: int = 48,
        history: int = 96,
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
        self.level = math.nan
        self.values: deque[float] = deque(maxlen=window)
        # the long-run medians come from windows kept in order as they roll
        self._variances = SortedWindow(4 * history)
        self._ac1s = SortedWindow(4 * history)
        self.variances: deque[float] = self._variances.values
        self.ac1s: deque[float] = self._ac1s.values
        self.last: TrendReading | None = None

    def update(self, value: float) -> TrendReading | None:
        """Add a value; the indicator's reading, or None until the history is full."""
        alpha = 1.0 / (4 * self.window)
        self.level = value if math.isnan(self.level) else self.level + alpha * (value - self.level)
        self.values.append(value - self.level)
        if len(self.values) < self.window:
            return None
        var, ac1 = variance_and_ac1(list(self.values))
        self._variances.append(var)
        self._ac1s.append(ac1)
        self.last = self._evaluate(advance=True)
        return self.last

    def _evaluate(self, advance: bool = False) -> TrendReading | None:
        if len(self.variances) < self.history:
            return None
        variances = self.variances
        ac1s = self.ac1s
        reference = self._variances.median()
        ratio = variances[-1] / reference if reference > 0 else math.inf
        rise = ac1s[-1] - self._ac1s.median()
        # Kendall's tau is the expensive part: computed only when the cheap growth
        # conditions already hold (NaN otherwise), which in a calm run is rarely
        tau_var = tau_ac1 = math.nan
        level = Level.OK
        slowing = False
        if ratio >= self.var_factor:
            tau_var = kendall_tau(list(variances)[-self.history :])
            if tau_var >= self.tau:
                level = Level.WATCH
                if rise >= self.ac1_rise:
                    tau_ac1 = kendall_tau(list(ac1s)[-self.history :])
                    slowing = tau_ac1 >= self.tau
        if advance:
            self.streak = self.streak + 1 if slowing else 0
        if slowing and self.streak >= self.sustain:
            level = Level.WARNING
        return TrendReading(tau_var, tau_ac1, ratio, rise, level)

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": list(self.values),
            "level": self.level,
            "variances": list(self.variances),
            "ac1s": list(self.ac1s),
            "streak": self.streak,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state["values"])
        self.level = float(state["level"])
        self._variances.clear()
        self._variances.extend(float(v) for v in state["variances"])
        self._ac1s.clear()
        self._ac1s.extend(float(v) for v in state["ac1s"])
        self.streak = int(state.get("streak", 0))
        self.last = self._evaluate()
