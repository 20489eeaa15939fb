"""The WARNING and CRITICAL rules on hand-made readings: the learning-rate jump rule, a
loss above its band after a jump, band evidence, the edge ratio with and without the loss
outside its band; and the same rules through EarlyWarning's monitor and level tracker."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_stability.probes.base import Reading
from lightning_stability.warning import EarlyWarning, Level
from lightning_stability.warning.loss_band import BandEvidence
from lightning_stability.warning.metastate import MetaState
from lightning_stability.warning.rules import (
    EOS_KEY,
    LOSS_KEY,
    PREDICTED_KEY,
    HardRules,
)

LR_CHANGE = "stability/sharpness/lr_change"
DIRECTIONAL = "stability/sharpness/directional_ratio"


class Driver:
    """Feeds one step of readings (and band evidence) to a HardRules at a time."""

    def __init__(self, rules: HardRules | None = None) -> None:
        self.rules = rules or HardRules()
        self.meta = MetaState()

    def step(self, step: int, band: BandEvidence | None = None, **values: tuple[float, int]):
        keys = {"predicted": PREDICTED_KEY, "change": LR_CHANGE, "eos": EOS_KEY}
        keys["directional"] = DIRECTIONAL
        readings = {keys[k]: Reading(v, s) for k, (v, s) in values.items()}
        hits = self.rules.check(self.meta.observe(readings, step), readings, band)
        return [(h.level, h.signal) for h in hits]


def lr_steps(driver: Driver, changes, predicted, band_at=None, start=0):
    """One (lr_change, predicted_ratio) reading per step from ``start``; ``band_at``: the
    band evidence by step. The hits by step."""
    band_at = band_at or {}
    return {
        start + i: driver.step(
            start + i,
            band_at.get(start + i),
            change=(c, start + i),
            predicted=(p, start + i),
        )
        for i, (c, p) in enumerate(zip(changes, predicted))
    }


# ------------------------------------------------------------------ learning-rate jump
@pytest.mark.parametrize(
    ("factor", "ratio", "fires"),
    [
        (2.0, 1.3, True),
        (1.5, 1.26, True),  # a jump is >= lr_jump; the edge is > 1 + eos_margin
        (2.0, 1.25, False),  # at 1 + eos_margin: not above it
        (2.0, 0.9, False),  # a jump that stays below the edge
        (1.49, 3.0, False),  # far beyond the edge, but not a jump
    ],
)
def test_lr_jump_rule_fires_at_the_jump_only_when_the_predicted_ratio_is_beyond_the_edge(
    factor, ratio, fires
):
    d = Driver()
    hits = lr_steps(d, [1.0] * 10 + [factor, 1.0, 1.0], [0.5] * 10 + [ratio] * 3)
    expected = {s: [] for s in hits}
    if fires:
        expected[10] = [(Level.WARNING, PREDICTED_KEY)]
    assert hits == expected
    # the same readings, carried to the next step (no new reading): no second hit
    assert d.step(13, change=(factor, 12), predicted=(ratio, 12)) == []


def test_lr_jump_rule_ignores_a_ramp_of_two_percent_a_step():
    """A warm-up that multiplies the learning rate by 1.02 every step takes the predicted
    ratio from 0.5 to 3.6 in 100 steps: the curvature follows a slow ramp, no jump."""
    d = Driver()
    predicted = [0.5 * 1.02**k for k in range(100)]
    hits = lr_steps(d, [1.02] * 100, predicted)
    assert all(h == [] for h in hits.values())
    # and no single loss above the band is explained by it
    assert d.step(100, BandEvidence(single=True), change=(1.02, 100), predicted=(3.6, 100)) == []


def test_lr_jump_rule_needs_both_readings_of_the_same_step():
    d = Driver()
    assert d.step(5, change=(2.0, 5), predicted=(1.5, 4)) == []
    assert d.step(6, change=(2.0, 6)) == []
    assert d.step(7, predicted=(1.5, 7)) == []


def test_a_loss_above_its_band_within_the_window_after_a_jump_warns():
    rules = HardRules(jump_window=50)
    single = BandEvidence(single=True)
    # a jump at step 10 that stays below the edge: no warning at the jump itself
    d = Driver(rules)
    hits = lr_steps(
        d, [1.0] * 10 + [2.0] + [1.0] * 60, [0.4] * 10 + [0.8] * 61, {60: single, 61: single}
    )
    assert {s: h for s, h in hits.items() if h} == {60: [(Level.WARNING, LOSS_KEY)]}
    assert rules.last_jump == 10
    # without a jump the same batch is no evidence
    d = Driver()
    hits = lr_steps(d, [1.0] * 71, [0.4] * 71, {60: single})
    assert all(h == [] for h in hits.values())


# ----------------------------------------------------------------------- band evidence
@pytest.mark.parametrize(
    ("band", "expected"),
    [
        (BandEvidence(shock=True, single=True), [(Level.WARNING, LOSS_KEY)]),
        (BandEvidence(leaving=True, outside=True), [(Level.WARNING, LOSS_KEY)]),
        (
            BandEvidence(leaving=True, outside=True, far=True, damage=True),
            [(Level.CRITICAL, LOSS_KEY), (Level.WARNING, LOSS_KEY)],
        ),
        (BandEvidence(outside=True, far=True), []),  # hold conditions, not evidence
        (BandEvidence(single=True), []),  # one batch, unexplained
        (BandEvidence(), []),
    ],
    ids=["shock", "leaving", "damage", "outside", "single", "none"],
)
def test_band_evidence_levels(band, expected):
    assert Driver().step(1, band) == expected


# -------------------------------------------------------------------- edge ratio
@pytest.mark.parametrize("key", ["eos", "directional"])
def test_an_edge_ratio_beyond_eos_critical_is_critical_only_while_the_loss_is_outside(key):
    signal = EOS_KEY if key == "eos" else DIRECTIONAL
    outside = BandEvidence(outside=True)
    # with the loss above its band: CRITICAL at the first reading above 2 (no streak)
    d = Driver()
    assert d.step(4, outside, **{key: (2.5, 4)}) == [(Level.CRITICAL, signal)]
    # 1.8 is beyond the edge but not beyond eos_critical: only the streak rule, at the
    # eos_sustain-th (default 3rd) consecutive reading
    d = Driver()
    assert d.step(4, outside, **{key: (1.8, 4)}) == []
    assert d.step(8, outside, **{key: (1.8, 8)}) == []
    assert d.step(12, outside, **{key: (1.8, 12)}) == [(Level.WARNING, signal)]
    # without the loss outside: 2.5 is only the WARNING streak rule, never CRITICAL
    d = Driver()
    assert d.step(4, None, **{key: (2.5, 4)}) == []
    assert d.step(8, None, **{key: (2.5, 8)}) == []
    assert d.step(12, None, **{key: (2.5, 12)}) == [(Level.WARNING, signal)]
    assert d.step(16, BandEvidence(), **{key: (2.5, 16)}) == [(Level.WARNING, signal)]
    # eos_sustain is the length of that streak: with 2, the 2nd reading warns
    d = Driver(HardRules(eos_sustain=2))
    assert d.step(4, None, **{key: (2.5, 4)}) == []
    assert d.step(8, None, **{key: (2.5, 8)}) == [(Level.WARNING, signal)]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(eos_margin=0.25, eos_critical=1.25), "eos_critical"),
        (dict(lr_jump=1.0), "lr_jump"),
        (dict(eos_margin=-0.1), "eos_margin"),
        (dict(eos_sustain=0), "eos_sustain"),
    ],
)
def test_bad_rule_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HardRules(**kwargs)


def test_jump_state_survives_a_weights_only_round_trip(tmp_path):
    rules = HardRules()
    d = Driver(rules)
    lr_steps(d, [1.0] * 5 + [3.0] + [1.0] * 5, [0.3] * 11)
    torch.save(rules.state_dict(), tmp_path / "rules.pt")
    restored = HardRules()
    restored.load_state_dict(torch.load(tmp_path / "rules.pt", weights_only=True))
    assert (restored.jump_seen, restored.last_jump) == (10, 5)
    d2 = Driver(restored)
    hits = lr_steps(d2, [1.0] * 3, [0.3] * 3, {12: BandEvidence(single=True)}, start=11)
    assert hits == {11: [], 12: [(Level.WARNING, LOSS_KEY)], 13: []}


# ---------------------------------------------- through EarlyWarning's monitor/tracker
def replay(ew: EarlyWarning, losses, extra=lambda step: {}):
    events = []
    for step, loss in enumerate(losses):
        readings = {LOSS_KEY: Reading(loss, step), **extra(step)}
        a = ew.monitor.assess(readings, step, ew.level)
        new = ew.tracker.update(step, a.proposed, a.hold, a.hard, a.ruled)
        if new is not None:
            events.append((step, new))
    return events


def _losses(n, seed=0):
    rng = random.Random(seed)
    return [0.5 * math.exp(0.1 * rng.gauss(0, 1)) for _ in range(n)]


def test_a_batch_above_the_band_after_a_jump_warns_at_once_and_not_without_the_jump():
    losses = _losses(300)
    losses[210] = 1.5  # 3x the floor: above the band, not a shock

    def lr(jump_at):
        def extra(step):
            change = 2.0 if step == jump_at else 1.0
            return {
                LR_CHANGE: Reading(change, step),
                PREDICTED_KEY: Reading(0.8 if step >= 200 else 0.4, step),
            }

        return extra

    jumped = replay(EarlyWarning(), losses, lr(200))
    assert [(s, lv) for s, lv in jumped if lv >= Level.WARNING] == [(210, Level.WARNING)]
    calm = replay(EarlyWarning(), losses, lr(None))
    assert all(lv < Level.WARNING for _, lv in calm), calm


def test_a_sustained_loss_shift_climbs_watch_warning_critical_on_evidence():
    """x5 from step 200: the deviation proposes WATCH (patience 2), the band's leaving
    raises WARNING at once at 203, its damage CRITICAL from 211 (far for sustain=10
    steps, once the noisy trailing median is not lower than where the streak began);
    nothing before 200."""
    losses = _losses(200, seed=1) + [5 * v for v in _losses(30, seed=2)]
    events = replay(EarlyWarning(), losses)
    assert events[0] == (201, Level.WATCH)
    (warning, warned), (critical, crit) = [e for e in events if e[1] >= Level.WARNING]
    assert (warning, warned) == (203, Level.WARNING)
    assert crit == Level.CRITICAL and 211 <= critical <= 225
