"""The warning layer's pieces against reference formulas: Kendall tau, rolling
statistics, robust baseline, meta-state mapping, hard rules and hysteresis."""

import math
import random
import warnings

import pytest
import scipy.stats
import torch

from lightning_stability import Baselines, DeviationThresholds, EdgeRule, LevelPolicy, TrendTest
from lightning_stability.probes.base import Reading
from lightning_stability.warning import EarlyWarning, Level, SignalSpec
from lightning_stability.warning.baseline import (
    RobustBaseline,
    median,
    median_abs_deviation_of_sorted,
)
from lightning_stability.warning.indicators import TrendIndicator, kendall_tau, variance_and_ac1
from lightning_stability.warning.levels import LevelTracker
from lightning_stability.warning.metastate import MetaState
from lightning_stability.warning.rules import HardRules


def test_kendall_tau_matches_scipy_with_and_without_ties():
    rng = random.Random(0)
    for n in (5, 17, 64):
        xs = [rng.gauss(0, 1) for _ in range(n)]
        ref = scipy.stats.kendalltau(range(n), xs).statistic
        assert kendall_tau(xs) == pytest.approx(ref, abs=1e-12)
        tied = [round(x) for x in xs]
        ref_tied = scipy.stats.kendalltau(range(n), tied, variant="b").statistic
        assert kendall_tau(tied) == pytest.approx(ref_tied, abs=1e-12)
    assert kendall_tau([1.0, 2.0, 3.0]) == 1.0
    assert kendall_tau([3.0, 2.0, 1.0]) == -1.0


def test_variance_and_ac1_match_reference_formula():
    x = torch.randn(50, dtype=torch.float64)
    var, ac1 = variance_and_ac1(x.tolist())
    r = x - x.mean()
    assert var == pytest.approx(float(x.var()), rel=1e-12)
    assert ac1 == pytest.approx(float((r[1:] * r[:-1]).sum() / (r * r).sum()), rel=1e-12)


def test_robust_baseline_is_median_and_scaled_mad_and_ignores_a_spike():
    b = RobustBaseline(window=9, warmup=5, min_scale=1e-6)
    for v in [1.0, 2.0, 3.0, 4.0]:
        b.update(v)
        assert b.score(0.0) is None  # warm-up
    for v in [5.0, 6.0, 7.0, 8.0, 1000.0]:
        b.update(v)
    vals = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 1000])
    med = vals.median()
    mad = (vals - med).abs().median()
    assert b.center == pytest.approx(float(med))
    assert b.scale == pytest.approx(1.4826 * float(mad))
    assert b.score(float(med) + 3 * b.scale) == pytest.approx(3.0)
    flat = RobustBaseline(window=8, warmup=2, min_scale=0.5)
    for _ in range(8):
        flat.update(1.0)
    assert flat.scale == 0.5  # floor: a constant signal does not make tiny changes alarming


def test_metastate_maps_transforms_orients_and_drops_stale_readings():
    meta = MetaState(max_age=10)
    readings = {
        "stability/loss/value": Reading(2.0, 5),
        "stability/grad/norm": Reading(3.0, 9),
        "stability/cka/min": Reading(0.9, 5),
        "stability/act/layer1/dead_fraction": Reading(0.25, 5),
        "stability/sharpness/eos_ratio": Reading(0.8, 0),
        "stability/unrelated": Reading(1.0, 5),
    }
    obs = {o.key: o for o in meta.observe(readings, step=12)}
    assert set(obs) == {
        "stability/loss/value",
        "stability/grad/norm",
        "stability/cka/min",
        "stability/act/layer1/dead_fraction",
    }  # eos_ratio is 12 steps old: stale; unrelated keys are not consumed
    assert obs["stability/loss/value"].value == 2.0  # minibatch loss: identity scale
    assert obs["stability/grad/norm"].value == pytest.approx(math.log(3.0))
    assert obs["stability/grad/norm"].dimension == "optimization"
    assert obs["stability/loss/value"].dimension == "learning_signal"
    assert obs["stability/loss/value"].age == 7 and obs["stability/loss/value"].fresh
    # a falling CKA is a rising log(1 - CKA)
    assert obs["stability/cka/min"].value == pytest.approx(math.log(0.1))
    assert obs["stability/act/layer1/dead_fraction"].dimension == "parametric"
    again = {o.key: o for o in meta.observe(readings, step=13)}
    assert not again["stability/loss/value"].fresh  # carried, not re-learned


def test_hard_rules_nonfinite_once_per_reading_and_sustained_eos():
    rules = HardRules(eos_margin=0.25, eos_sustain=2)
    meta = MetaState()
    r = {"stability/grad/nonfinite": Reading(3.0, 7)}
    assert [h.level for h in rules.check(meta.observe(r, 7), r)] == [Level.CRITICAL]
    assert rules.check(meta.observe(r, 8), r) == []  # same reading, carried
    for step, ratio, fires in [(10, 1.5, False), (20, 1.5, True), (30, 1.1, False)]:
        r = {"stability/sharpness/eos_ratio": Reading(ratio, step)}
        hits = rules.check(meta.observe(r, step), r)
        assert bool(hits) == fires
        if fires:
            assert hits[0].level == Level.WARNING


def test_level_tracker_patience_dwell_cooldown_and_critical_repeat():
    t = LevelTracker(patience=2, min_dwell=3, cooldown=10)
    warn, ok = Level.WARNING, Level.OK
    assert t.update(0, warn, warn) is None  # one step of evidence is not enough
    assert t.update(1, warn, warn) == warn
    assert t.update(2, ok, ok) is None  # minimum dwell
    assert t.update(4, ok, Level.WATCH) == Level.WATCH  # falls to what the exit threshold holds
    assert t.update(7, ok, ok) == ok
    # WARNING was left at step 4 and WATCH at 7: neither is re-entered within the cooldown
    assert t.update(8, warn, warn) is None
    assert t.update(9, warn, warn) is None
    assert t.update(14, warn, warn) == warn
    assert t.update(22, ok, ok, hard=True) == Level.CRITICAL
    assert t.update(23, ok, ok, hard=True) is None  # repeated only after the cooldown
    assert t.update(32, ok, ok, hard=True) == Level.CRITICAL


def test_directional_ratio_alone_triggers_the_edge_rule_on_its_own_streak():
    rules = HardRules(eos_margin=0.25, eos_sustain=2)
    meta = MetaState()
    key = "stability/sharpness/directional_ratio"
    fired = []
    # a sparse eos_ratio below the edge does not reset the directional streak
    for step, directional, eos in [
        (5, 1.3, None),
        (10, 1.3, 0.4),
        (15, 1.2, None),
        (20, 1.5, None),
    ]:
        r = {key: Reading(directional, step)}
        if eos is not None:
            r["stability/sharpness/eos_ratio"] = Reading(eos, step)
        hits = rules.check(meta.observe(r, step), r)
        fired.append([(h.level, h.signal) for h in hits])
    assert fired[0] == []  # one reading above 1.25 is not sustained
    assert fired[1] == [(Level.WARNING, key)]
    assert fired[2] == []  # 1.2 is within the margin: streak reset
    assert fired[3] == []
    restored = HardRules(eos_margin=0.25, eos_sustain=2)
    restored.load_state_dict(rules.state_dict())
    assert restored.eos_streaks == {key: 1, "stability/sharpness/eos_ratio": 0}
    r = {key: Reading(1.5, 25)}
    assert [h.signal for h in restored.check(meta.observe(r, 25), r)] == [key]


def test_level_tracker_repeats_a_persisting_warning_only_while_evidence_holds():
    t = LevelTracker(patience=1, min_dwell=3, cooldown=10, repeat_every=5)
    warn, watch, ok = Level.WARNING, Level.WATCH, Level.OK
    issued = {step: t.update(step, warn, warn) for step in range(0, 12)}
    assert {s: lv for s, lv in issued.items() if lv is not None} == {0: warn, 5: warn, 10: warn}
    # evidence below the exit threshold: no repeat, then the level falls after min_dwell
    t2 = LevelTracker(patience=1, min_dwell=20, cooldown=10, repeat_every=5)
    assert t2.update(0, warn, warn) == warn
    assert [t2.update(s, ok, watch) for s in range(1, 12)] == [None] * 11
    # CRITICAL (which triggers rollbacks) is not repeated by score
    crit = LevelTracker(patience=1, repeat_every=5)
    crit_levels = [crit.update(s, Level.CRITICAL, Level.CRITICAL) for s in range(0, 12)]
    assert crit_levels.count(Level.CRITICAL) == 1
    never = LevelTracker(patience=1, repeat_every=None)
    assert [never.update(s, warn, warn) for s in range(0, 60)].count(warn) == 1
    with pytest.raises(ValueError, match="repeat_every"):
        LevelTracker(repeat_every=0)


def test_trend_indicator_state_round_trip():
    a, b = TrendIndicator(window=8, history=8), TrendIndicator(window=8, history=8)
    rng = random.Random(1)
    xs = [rng.gauss(0, 1) * (1 + i / 50) for i in range(200)]
    for x in xs[:100]:
        a.update(x)
    b.load_state_dict(a.state_dict())
    assert [a.update(x) for x in xs[100:]] == [b.update(x) for x in xs[100:]]


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: DeviationThresholds(watch_threshold=0.0), "threshold"),
        (lambda: DeviationThresholds(watch_threshold=-1.0), "watch_threshold"),
        (lambda: EdgeRule(margin=0.25, critical=1.2), "critical"),
        (lambda: EdgeRule(lr_jump=1.0), "lr_jump"),
        (lambda: EdgeRule(sustain=0), "sustain"),
        (lambda: DeviationThresholds(exit_ratio=1.5), "exit_ratio"),
        (lambda: LevelPolicy(patience=0), "patience"),
        (lambda: Baselines(window=2), "window"),
        (lambda: Baselines(warmup=100), "warmup"),
        (lambda: Baselines(max_age=0), "max_age"),
        (lambda: TrendTest(tau=1.5), "tau"),
        (lambda: TrendTest(var_factor=0.5), "var_factor"),
        (lambda: EdgeRule(margin=-1.0), "margin"),
        (lambda: EarlyWarning(warn_level="loud"), "warn_level"),
    ],
)
def test_bad_arguments_name_themselves(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_bad_signal_spec_names_allowed_values():
    with pytest.raises(ValueError, match="dimension must be one of"):
        SignalSpec("stability/x", "vibes")
    with pytest.raises(ValueError, match="transform must be one of"):
        SignalSpec("stability/x", "data", transform="sqrt")


def test_configurable_from_yaml_like_lightning_cli():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(EarlyWarning, "ew")
    cfg = parser.parse_string(
        "ew:\n  deviation:\n    watch_threshold: 7.0\n  edge:\n    margin: 0.4\n"
        "  warn_level: critical\n  signals:\n"
        "    - pattern: stability/loss/value\n      dimension: learning_signal\n"
        "      transform: identity\n      trend: true\n"
    )
    ew = parser.instantiate(cfg).ew
    assert ew.monitor.watch_threshold == 7.0
    assert ew.monitor.rules.eos_margin == 0.4
    assert ew.warn_level == Level.CRITICAL
    assert ew.monitor.meta.signals == (
        SignalSpec("stability/loss/value", "learning_signal", "identity", trend=True),
    )


def test_a_warning_that_persists_never_escalates():
    """Time at a level never raises it: WARNING evidence held for 500 steps gives the
    WARNING and its repeats, never CRITICAL; a hard rule still raises CRITICAL at once."""
    tracker = LevelTracker(repeat_every=25)
    issued = [(s, tracker.update(s, Level.WARNING, Level.WARNING)) for s in range(500)]
    issued = [(s, lv) for s, lv in issued if lv is not None]
    assert issued[0] == (1, Level.WARNING)  # patience 2
    assert issued == [(s, Level.WARNING) for s in range(1, 500, 25)]
    assert tracker.level == Level.WARNING
    # the same when a rule demands it on every step (entered at once, no patience)
    ruled = LevelTracker(repeat_every=None)
    levels = [
        ruled.update(s, Level.WARNING, Level.WARNING, ruled=Level.WARNING) for s in range(500)
    ]
    assert levels[0] == Level.WARNING and levels[1:] == [None] * 499
    assert ruled.level == Level.WARNING
    assert ruled.update(500, Level.WARNING, Level.WARNING, hard=True) == Level.CRITICAL


def test_a_ruled_level_is_entered_at_once_and_held_like_any_other():
    t = LevelTracker(patience=3, min_dwell=5, cooldown=10, repeat_every=None)
    assert t.update(0, Level.OK, Level.OK, ruled=Level.WATCH) == Level.WATCH
    assert t.update(1, Level.WARNING, Level.WARNING, ruled=Level.WARNING) == Level.WARNING
    assert t.update(2, Level.WARNING, Level.WARNING, ruled=Level.WARNING) is None
    # without the rule the level is held for min_dwell, then falls to hold
    assert [t.update(s, Level.OK, Level.OK) for s in range(3, 6)] == [None] * 3
    assert t.update(6, Level.OK, Level.OK) == Level.OK
    # a rule is not held back by the cooldown of a level left by score
    assert t.update(7, Level.OK, Level.OK, ruled=Level.WARNING) == Level.WARNING
    # the same proposal without the rule would need patience
    u = LevelTracker(patience=3)
    assert [u.update(s, Level.WARNING, Level.WARNING) for s in range(3)] == [
        None,
        None,
        Level.WARNING,
    ]


@pytest.mark.parametrize(
    "kwargs",
    [dict(escalate_after=5), dict(warning_threshold=1.0), dict(critical_threshold=2.0)],
)
def test_removed_arguments_warn_as_deprecated_and_change_nothing(kwargs):
    (name,) = kwargs
    with pytest.deprecated_call(match=name):
        old = EarlyWarning(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = EarlyWarning()  # no deprecation warning without them
    assert not hasattr(old.tracker, "escalate_after")
    assert not hasattr(old.monitor, "thresholds")
    # the same readings give the same events: a shift of the gradient norm (about 10
    # robust sd: above watch_threshold=8, far above the thresholds passed),
    # an edge ratio above the margin on every reading from step 150 (a WARNING that
    # persists far longer than escalate_after), and a non-finite reading at 280
    rng = random.Random(0)
    norms = [math.exp(0.05 * rng.gauss(0, 1) + (0.5 if t >= 100 else 0.0)) for t in range(300)]
    norms[280] = float("nan")
    streams = []
    for ew in (old, new):
        events = []
        for step, v in enumerate(norms):
            readings = {"stability/grad/norm": Reading(v, step)}
            ratio = 1.5 if step >= 150 else 0.5
            readings["stability/sharpness/eos_ratio"] = Reading(ratio, step - step % 5)
            a = ew.monitor.assess(readings, step, ew.level)
            level = ew.tracker.update(step, a.proposed, a.hold, a.hard, a.ruled)
            if level is not None:
                events.append((step, level))
        streams.append(events)
    assert streams[0] == streams[1]
    levels = dict(streams[0])
    assert levels[101] == Level.WATCH  # the shift, after patience=2
    assert max(lv for s, lv in streams[0] if s < 160) == Level.WATCH
    assert levels[160] == Level.WARNING  # the third reading above 1.25 (eos_sustain=3)
    assert max(lv for s, lv in streams[0] if s < 280) == Level.WARNING
    assert levels[280] == Level.CRITICAL


def test_a_warning_is_repeated_only_while_its_evidence_grows():
    """LRBackoff cuts on every WARNING event: a run that recovers after the first cut gets
    no second one, a run that keeps getting worse does."""
    warn, watch = Level.WARNING, Level.WATCH

    def issued(worse: bool) -> list[int]:
        tracker = LevelTracker(repeat_every=25)
        out = []
        for step in range(200):
            ruled = warn if step == 10 else Level.OK
            new = tracker.update(step, watch, warn, ruled=ruled, worse=worse)
            if new == warn:
                out.append(step)
        return out

    assert issued(worse=False) == [10]
    assert issued(worse=True) == [10, 35, 60, 85, 110, 135, 160, 185]


@pytest.mark.parametrize("kind", ["ties", "gauss", "decades"])
def test_median_abs_deviation_by_merging_equals_sorting_the_deviations(kind):
    """Bit for bit, including ties, centers equal to a value, even and odd lengths."""
    rng = random.Random(kind)
    for _ in range(3000):
        n = rng.randint(1, 70)
        if kind == "ties":
            values = [rng.choice([0.1, 0.2, 0.3, 0.5]) for _ in range(n)]
        elif kind == "gauss":
            values = [rng.gauss(0.0, 1.0) for _ in range(n)]
        else:
            values = [10 ** rng.uniform(-8, 3) for _ in range(n)]
        ordered = sorted(values)
        center = rng.choice(ordered) if rng.random() < 0.3 else median(values)
        expected = median([abs(v - center) for v in ordered])
        assert median_abs_deviation_of_sorted(ordered, center) == expected
    assert math.isnan(median_abs_deviation_of_sorted([], 0.0))
