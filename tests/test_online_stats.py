"""Rolling-window and EMA statistics against reference formulas."""

import math

import numpy as np
import pytest
import torch

from lightning_stability.estimators.online_stats import (
    EMAStats,
    RollingWindow,
    lag1_autocorrelation,
)


def test_rolling_window_matches_numpy_on_the_last_values():
    g = torch.Generator().manual_seed(1)
    stream = torch.randn(50, generator=g, dtype=torch.float64).tolist()
    w = RollingWindow(16)
    w.extend(stream)
    ref = np.array(stream[-16:])
    assert len(w) == 16 and w.full and w.total == 50
    assert w.values() == stream[-16:]
    assert w.mean() == pytest.approx(ref.mean(), rel=1e-12)
    assert w.var() == pytest.approx(ref.var(ddof=1), rel=1e-12)
    assert w.max() == ref.max() and w.min() == ref.min()
    assert w.quantile(0.9) == pytest.approx(np.quantile(ref, 0.9), rel=1e-12)
    d = ref - ref.mean()
    assert w.ac1() == pytest.approx((d[:-1] * d[1:]).sum() / (d * d).sum(), rel=1e-12)


def test_lag1_autocorrelation_separates_persistent_from_alternating_series():
    # AR(1) with phi=0.9 is strongly autocorrelated; an alternating series is -1-like.
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, generator=g, dtype=torch.float64)
    x = torch.zeros_like(noise)
    for t in range(1, len(x)):
        x[t] = 0.9 * x[t - 1] + noise[t]
    assert lag1_autocorrelation(x) == pytest.approx(0.9, abs=0.03)
    assert lag1_autocorrelation([1.0, -1.0] * 20) < -0.9
    assert math.isnan(lag1_autocorrelation([1.0, 1.0, 1.0]))
    assert math.isnan(lag1_autocorrelation([1.0, 2.0]))


def test_empty_window_statistics_are_nan_and_bad_size_is_rejected():
    w = RollingWindow(4)
    assert math.isnan(w.mean()) and math.isnan(w.max()) and math.isnan(w.quantile(0.5))
    w.update(torch.tensor(2.0))
    assert w.mean() == 2.0 and math.isnan(w.var())
    with pytest.raises(ValueError, match="size"):
        RollingWindow(0)
    with pytest.raises(ValueError, match="q must be"):
        w.quantile(1.5)


def test_rolling_window_state_round_trip_survives_weights_only_load(tmp_path):
    w = RollingWindow(5)
    w.extend([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    torch.save(w.state_dict(), tmp_path / "s.pt")
    restored = RollingWindow(5)
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert restored.values() == w.values() and restored.total == 6
    restored.update(7.0)
    w.update(7.0)
    assert restored.values() == w.values()
    smaller = RollingWindow(2)
    smaller.load_state_dict(w.state_dict())
    assert smaller.values() == [6.0, 7.0]


def test_ema_matches_explicit_weighted_moments():
    alpha = 0.1
    g = torch.Generator().manual_seed(2)
    xs = (3.0 + torch.randn(200, generator=g, dtype=torch.float64)).tolist()
    ema = EMAStats(alpha)
    for x in xs:
        ema.update(x)
    # Explicit weights of the recursion: the first value carries (1-a)^(n-1), the others
    # a(1-a)^(n-1-i).
    n = len(xs)
    w = np.array(
        [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - 1 - i) for i in range(1, n)]
    )
    assert w.sum() == pytest.approx(1.0)
    mean = float((w * np.array(xs)).sum())
    var = float((w * (np.array(xs) - mean) ** 2).sum())
    assert ema.mean == pytest.approx(mean, rel=1e-10)
    assert ema.var == pytest.approx(var, rel=1e-10)
    assert ema.count == n
    assert ema.zscore(ema.mean + 2 * ema.std) == pytest.approx(2.0)


def test_ema_ignores_nonfinite_and_round_trips(tmp_path):
    ema = EMAStats(0.5)
    for x in [1.0, float("nan"), 3.0, float("inf")]:
        ema.update(x)
    assert ema.count == 2 and ema.mean == 2.0 and ema.var == pytest.approx(1.0)
    torch.save(ema.state_dict(), tmp_path / "e.pt")
    other = EMAStats(0.5)
    other.load_state_dict(torch.load(tmp_path / "e.pt", weights_only=True))
    assert (other.mean, other.var, other.count) == (ema.mean, ema.var, ema.count)
    with pytest.raises(ValueError, match="alpha"):
        EMAStats(0.0)
