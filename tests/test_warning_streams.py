"""The decision logic on synthetic reading streams with known ground truth: stationary
streams never warn, critical slowing down before a jump warns before the jump, a
non-finite reading is critical at once. Deterministic (seeded Python RNG)."""

import math
import random

import pytest
import torch

from lightning_stability.probes.base import Reading
from lightning_stability.warning import EarlyWarning, Level

KEY = "stability/grad/norm"


def replay(values, key=KEY, warning=None):
    """Feed one reading per optimizer step through an EarlyWarning's monitor and level
    tracker; the (step, level) of every event."""
    ew = warning or EarlyWarning()
    events = []
    for step, v in enumerate(values):
        a = ew.monitor.assess({key: Reading(v, step)}, step, ew.level)
        new = ew.tracker.update(step, a.proposed, a.hold, a.hard)
        if new is not None:
            events.append((step, new))
    return events


def ar_stream(n, seed, phi=lambda t: 0.5, sigma=lambda t: 0.1, jump_at=None):
    """A positive stream (a gradient norm, say) exp(x) with x an AR(1) process whose coefficient and
    noise may change over time, multiplied by 20 from ``jump_at`` on."""
    rng = random.Random(seed)
    x, out = 0.0, []
    for t in range(n):
        x = phi(t) * x + sigma(t) * rng.gauss(0, 1)
        out.append(math.exp(x) * (20.0 if jump_at is not None and t >= jump_at else 1.0))
    return out


@pytest.mark.parametrize(("seed", "phi"), [(0, 0.0), (1, 0.0), (2, 0.5), (3, 0.5)])
def test_stationary_stream_never_reaches_warning(seed, phi):
    events = replay(ar_stream(1200, seed, phi=lambda t: phi))
    assert all(level < Level.WARNING for _, level in events), events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rising_variance_and_autocorrelation_warn_before_the_jump(seed):
    jump = 800

    def ramp(t):
        return min(max((t - 300) / 500, 0.0), 1.0)

    values = ar_stream(
        jump + 5,
        seed,
        phi=lambda t: 0.2 + 0.77 * ramp(t),
        sigma=lambda t: 0.05 * (1 + 2 * ramp(t)),
        jump_at=jump,
    )
    warnings_ = [step for step, level in replay(values) if level >= Level.WARNING]
    assert warnings_, "no warning at all"
    assert 300 < warnings_[0] < jump
    # the same stream with the jump but without the slowing down warns only at the jump
    calm = ar_stream(jump + 5, seed, phi=lambda t: 0.2, sigma=lambda t: 0.05, jump_at=jump)
    calm_warnings = [step for step, level in replay(calm) if level >= Level.WARNING]
    assert calm_warnings and calm_warnings[0] >= jump


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_reading_is_critical_at_once(bad):
    values = ar_stream(100, 0, phi=lambda t: 0.0)
    values[60] = bad
    events = replay(values)
    assert events[0] == (60, Level.CRITICAL)


def test_nonfinite_count_is_critical_at_once_and_repeats_after_cooldown():
    ew = EarlyWarning(cooldown=5)
    events = []
    for step in range(30):
        readings = {"stability/grad/nonfinite": Reading(float(step >= 10), step)}
        a = ew.monitor.assess(readings, step, ew.level)
        new = ew.tracker.update(step, a.proposed, a.hold, a.hard)
        if new is not None:
            events.append((step, new))
    assert events == [
        (10, Level.CRITICAL),
        (15, Level.CRITICAL),
        (20, Level.CRITICAL),
        (25, Level.CRITICAL),
    ]


def test_state_survives_a_weights_only_checkpoint(tmp_path):
    values = ar_stream(600, 4, phi=lambda t: 0.3, jump_at=450)
    whole = EarlyWarning()
    expected = replay(values, warning=whole)
    first = EarlyWarning()
    head = replay(values[:300], warning=first)
    torch.save(first.state_dict(), tmp_path / "ew.pt")
    resumed = EarlyWarning()
    resumed.load_state_dict(torch.load(tmp_path / "ew.pt", weights_only=True))
    tail = []
    for step in range(300, 600):
        a = resumed.monitor.assess({KEY: Reading(values[step], step)}, step, resumed.level)
        new = resumed.tracker.update(step, a.proposed, a.hold, a.hard)
        if new is not None:
            tail.append((step, new))
    assert head + tail == expected
    assert any(level >= Level.WARNING for _, level in expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_moderate_shift_that_persists_warns_through_the_cusum(seed):
    """A level shift of about 6 robust sd from step 300 on: below warning_threshold on
    every single step, so only the CUSUM (Page 1954) can warn, and it does within
    threshold / (shift - drift) steps; with the CUSUM off the baseline learns the shift
    and no warning ever comes."""
    rng = random.Random(seed)
    sd = 0.05  # of log(value): above min_scale, so the robust scale is about sd
    shift = 6.0 * sd
    values = [math.exp(sd * rng.gauss(0, 1) + (shift if t >= 300 else 0.0)) for t in range(600)]
    on = [s for s, level in replay(values) if level >= Level.WARNING]
    assert on and 300 < on[0] <= 300 + 20, on
    off = replay(values, warning=EarlyWarning(cusum_threshold=None))
    assert all(level < Level.WARNING for _, level in off), off


def test_cusum_follows_pages_recursion_and_is_capped():
    from lightning_stability.warning.cusum import Cusum

    c = Cusum(drift=4.0, threshold=8.0)
    xs = [1.0, 6.0, 7.0, 3.0, float("nan"), 9.0, 30.0, 0.0, 0.0]
    # by hand: max(0, S + x - 4), nan ignored, capped at 2 x 8 = 16 (9 + 30 - 4 = 35)
    expected = [0.0, 2.0, 5.0, 4.0, 4.0, 9.0, 16.0, 12.0, 8.0]
    assert [c.update(x) for x in xs] == expected
    c2 = Cusum(4.0, 8.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value and c2.alarm == (c.value >= 8.0)
    for arg, bad in (
        ("cusum_drift", {"drift": 0.0, "threshold": 1.0}),
        ("cusum_threshold", {"drift": 1.0, "threshold": -1.0}),
    ):
        with pytest.raises(ValueError, match=arg):
            Cusum(**bad)


def test_rearm_after_a_rollback_lets_renewed_trouble_through_at_once():
    ew = EarlyWarning()
    values = [*ar_stream(100, 0), float("nan")]
    events = replay(values, warning=ew)
    assert events[-1] == (100, Level.CRITICAL)
    # without a rearm a second non-finite reading within the cooldown is not repeated
    a = ew.monitor.assess({KEY: Reading(float("nan"), 101)}, 101, ew.level)
    assert ew.tracker.update(101, a.proposed, a.hold, a.hard) is None
    ew.rearm(102, pause=5)
    assert ew.level == Level.OK and ew.monitor.cusum.value == 0.0
    a = ew.monitor.assess({KEY: Reading(float("nan"), 103)}, 103, ew.level)
    assert ew.tracker.update(103, a.proposed, a.hold, a.hard) == Level.CRITICAL
    # during the pause the baseline learns nothing
    baseline = ew.monitor.baselines[KEY]
    before = list(baseline.values)
    ew.monitor.assess({KEY: Reading(1.0, 104)}, 104, Level.OK)
    assert list(baseline.values) == before
    ew.monitor.assess({KEY: Reading(1.0, 108)}, 108, Level.OK)
    assert list(baseline.values) != before
