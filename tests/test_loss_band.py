"""LossBand on hand-made loss sequences with known ground truth: the floor, top, width
and reference band by hand; the band's top is the noise's 0.95 quantile and stationary
noise never leaves its band; a single huge batch is a shock; a loss creeping upwards
leaves the band it had and does not carry it; a sustained level shift leaves after
``confirm`` steps and is damage after ``sustain``, until ``memory`` steps later the
reference follows it; a jump that falls back, or recovers, is not damage; a jump at an
epoch boundary from a calm band is a change of data; ``learn=False``; state round trips.
Deterministic (seeded Python RNG)."""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch

from lightning_stability import BandDamage, BandLeaving, BandShape
from lightning_stability.warning.config import BAND_FLAT_ALIASES
from lightning_stability.warning.loss_band import BandEvidence, LossBand


def chi2(rng: random.Random, k: int) -> float:
    return sum(rng.gauss(0, 1) ** 2 for _ in range(k))


def feed(band: LossBand, values, learn: bool = True) -> list[BandEvidence]:
    return [band.update(v, learn=learn) for v in values]


def feed_bands(values) -> list[tuple[float, float, float]]:
    """The band (top, floor, width) after each loss, once it is ready."""
    band = LossBand()
    feed(band, values)
    return list(band.bands)


def first(evidence: list[BandEvidence], what: str) -> int | None:
    return next((i for i, e in enumerate(evidence) if getattr(e, what)), None)


def noise(n: int, seed: int, sigma: float = 0.1, floor: float = 1.0) -> list[float]:
    rng = random.Random(seed)
    return [floor * math.exp(sigma * rng.gauss(0, 1)) for _ in range(n)]


# ------------------------------------------------------------------------ by hand
def test_floor_top_and_width_by_hand_on_a_tiny_window():
    # the window's own band from the first steps (lag=0: no start band; see below)
    band = LossBand(shape=BandShape(window=5, warmup=3, smooth=3, lag=0))
    # not ready: no evidence at all
    assert feed(band, [1.0, 2.0, 3.0]) == [BandEvidence()] * 3
    # [1, 2, 3]: floor = median = 2; top = 0.95 quantile, linear interpolation at
    # position 0.95 * 2 = 1.9: 2 + 0.9 * (3 - 2) = 2.9; width = max(0.9, 0.05 * 2)
    assert band.ready
    assert (band.floor, band.top, band.spread) == pytest.approx((2.0, 2.9, 0.9))
    assert (band.ref_top, band.ref_floor, band.ref_spread) == pytest.approx((2.9, 2.0, 0.9))
    e = band.update(4.0)
    # trailing median of the last smooth=3 losses [2, 3, 4] = 3: 0.111 widths above the
    # top, 1.5 times the floor; 4 < 2.9 + 3 * 0.9 = 5.6, so not even a single
    assert e.excess == pytest.approx((3.0 - 2.9) / 0.9)
    assert e.ratio == pytest.approx(1.5)
    assert not (e.single or e.outside or e.leaving or e.shock or e.far or e.damage)
    # 4 enters unchanged (no winsorising)
    assert list(band.values) == [1.0, 2.0, 3.0, 4.0]
    # [1, 2, 3, 4]: floor 2.5; position 0.95 * 3 = 2.85: 3 + 0.85 * 1 = 3.85; width 1.35
    assert (band.floor, band.top, band.spread) == pytest.approx((2.5, 3.85, 1.35))
    # the reference is the band with the lowest top so far: still the first one
    assert (band.ref_top, band.ref_floor, band.ref_spread) == pytest.approx((2.9, 2.0, 0.9))
    e = band.update(100.0)
    # judged against the reference (top 2.9, floor 2, width 0.9): 100 >= 2.9 + 50 * 0.9
    # = 47.9 and >= 10 * 2: a shock (and a single); the trailing median of [3, 4, 100]
    # = 4 is inside (< 2.9 + 3 * 0.9 = 5.6), twice the reference floor
    assert e.shock and e.single and not e.outside and not e.leaving
    assert e.excess == pytest.approx((100.0 - 2.9) / 0.9)  # the shock's own excess
    assert e.ratio == pytest.approx(2.0)
    # 100 enters unchanged; the window is now full: [1, 2, 3, 4, 100], floor 3, position
    # 0.95 * 4 = 3.8: 4 + 0.8 * 96 = 80.8; width 77.8
    assert list(band.values) == [1.0, 2.0, 3.0, 4.0, 100.0]
    assert (band.floor, band.top, band.spread) == pytest.approx((3.0, 80.8, 77.8))
    assert band.ref_top == pytest.approx(2.9)
    # the window rolls: the oldest value (1.0) leaves; [2, 2, 3, 4, 100]: the same band
    e = band.update(2.0)
    assert list(band.values) == [2.0, 3.0, 4.0, 100.0, 2.0]
    assert (band.floor, band.top) == pytest.approx((3.0, 80.8))
    # trailing median of [4, 100, 2] = 4 against the reference: (4 - 2.9) / 0.9 widths
    assert e.excess == pytest.approx((4.0 - 2.9) / 0.9) and not e.single
    assert len(band.bands) == 4 and min(band.bands) == pytest.approx((2.9, 2.0, 0.9))


def _reference_by_hand(memory: int = 3) -> tuple[LossBand, list[BandEvidence]]:
    # the memory of the window's own bands (lag=0: no start band)
    band = LossBand(shape=BandShape(window=4, warmup=4, smooth=1, memory=memory, lag=0))
    return band, feed(band, [10.0, 1.0, 2.0, 3.0, 2.0, 6.0])


def test_the_reference_is_the_band_with_the_lowest_top_of_the_last_memory():
    band, evidence = _reference_by_hand()
    # smooth=1: the trailing median is the loss. Bands (top, floor, width) by hand:
    # A after [10, 1, 2, 3]: floor 2.5, top 3 + 0.85 * 7 = 8.95, width 6.45
    # B after [1, 2, 3, 2]: floor 2, top 2 + 0.85 * 1 = 2.85, width 0.85 (the top fell)
    # C after [2, 3, 2, 6]: floor 2.5, top 3 + 0.85 * 3 = 5.55, width 3.05 (it rose)
    a, b, c = (8.95, 2.5, 6.45), (2.85, 2.0, 0.85), (5.55, 2.5, 3.05)
    assert list(band.bands) == [pytest.approx(x) for x in (a, b, c)]
    # the reference keeps the lowest top, B, although the band now is C
    assert (band.top, band.floor, band.spread) == pytest.approx(c)
    assert (band.ref_top, band.ref_floor, band.ref_spread) == pytest.approx(b)
    # 6 was judged against B: 6 >= 2.85 + 3 * 0.85 = 5.4 and >= 2 * 2: a single and
    # outside (one step: not yet leaving), (6 - 2.85) / 0.85 widths, 3x the floor
    e = evidence[-1]
    assert e.single and e.outside and not e.leaving and not e.far
    assert (e.excess, e.ratio) == pytest.approx(((6 - 2.85) / 0.85, 3.0))
    # another 6, judged against B again: outside for confirm=2 steps, leaving (against C
    # it would be inside: 6 < 5.55 + 3 * 3.05)
    e = band.update(6.0)
    assert e.leaving and e.excess == pytest.approx((6 - 2.85) / 0.85)
    # D after [3, 2, 6, 6]: floor 4.5, top 6, width 1.5; memory=3 drops A: [B, C, D]
    d = (6.0, 4.5, 1.5)
    assert list(band.bands) == [pytest.approx(x) for x in (b, c, d)]
    assert band.ref_top == pytest.approx(2.85)
    # E after [2, 6, 6, 2]: floor 4, top 6, width 2; B leaves the memory: the reference
    # is now C, the lowest top of [C, D, E]
    e = band.update(2.0)
    assert not e.outside and e.excess == pytest.approx((2 - 2.85) / 0.85)
    assert list(band.bands) == [pytest.approx(x) for x in (c, d, (6.0, 4.0, 2.0))]
    assert (band.ref_top, band.ref_floor, band.ref_spread) == pytest.approx(c)
    # against C, 6 is no longer a single (6 < 5.55 + 3 * 3.05)
    e = band.update(6.0)
    assert not e.single and e.excess == pytest.approx((6 - 5.55) / 3.05)
    assert e.ratio == pytest.approx(6 / 2.5)


def test_width_never_narrower_than_a_fraction_of_the_floor_and_both_conditions_needed():
    band = LossBand(
        shape=BandShape(window=8, warmup=4, smooth=1)
    )  # smooth=1: the trailing median is the loss
    feed(band, [2.0] * 8)
    # a constant loss: top = floor, the width is 5% of the floor
    assert (band.floor, band.top, band.spread) == (2.0, 2.0, pytest.approx(0.1))
    # 2.35 is 3.5 widths above the top but not twice the floor: no evidence
    e = band.update(2.35)
    assert e.excess > 3 and not e.single
    # 4.0 is twice the floor and 20 widths above: a single (not a shock: < 10x floor)
    e = band.update(4.0)
    assert e.single and not e.shock


def test_nonfinite_losses_give_no_evidence_and_are_not_learned():
    band = LossBand()
    feed(band, noise(100, 0))
    state = band.state_dict()
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert band.update(bad) == BandEvidence()
    assert band.state_dict() == state


# ----------------------------------------------------------------- stationary noise
def _draws(kind: str, seed: int, n: int = 5000) -> tuple[list[float], float]:
    """``n`` draws of stationary noise at a floor, and the noise's true 0.95 quantile."""
    rng = random.Random(seed)
    if kind.startswith("lognormal"):  # sigma 0.3, 0.5, 1: q95 / median = e^(1.645 sigma)
        sigma = float(kind.split()[1])
        values = [0.3 * math.exp(sigma * rng.gauss(0, 1)) for _ in range(n)]
        return values, 0.3 * math.exp(1.6449 * sigma)
    if kind == "chi2/4":  # a chi-square with 4 degrees of freedom over 4 (mean 1) at 2.0
        return [2.0 * chi2(rng, 4) / 4 for _ in range(n)], 2.0 * 9.4877 / 4
    # a floor plus chi-square/4 noise: a loss near zero with a large relative spread
    return [0.01 + 0.02 * chi2(rng, 4) / 4 for _ in range(n)], 0.01 + 0.02 * 9.4877 / 4


KINDS = ["lognormal 0.3", "lognormal 0.5", "lognormal 1.0", "chi2/4", "offset chi2/4"]


@functools.cache
def _stationary(kind: str, seed: int) -> tuple[list[BandEvidence], list[float], list[float]]:
    """The evidence, the band's top and the reference top at each step of 5,000 draws."""
    values, _ = _draws(kind, seed)
    band = LossBand()
    evidence, tops, refs = [], [], []
    for v in values:
        evidence.append(band.update(v))
        tops.append(band.top)
        refs.append(band.ref_top)
    return evidence, tops, refs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_the_band_top_is_the_noise_quantile(kind, seed):
    """Every loss enters the window unchanged, so the band's top on stationary noise is
    the noise's 0.95 quantile: the estimate from 64 values scatters and sits a few percent
    low; its mean over the last 2,000 steps is within 6% (measured 0.95 to 0.99). The
    reference top, the lowest top of the last 200 bands, is below it, never above, and
    lower the heavier the noise (measured 0.86 of the quantile for lognormal sigma 0.3,
    0.62 for sigma 1), but never near the floor. (Over the first ``2 * window`` steps the
    reference is the start band, tested below.)"""
    _, q95 = _draws(kind, seed)
    _, tops, refs = _stationary(kind, seed)
    assert sum(tops[-2000:]) / 2000 == pytest.approx(q95, rel=0.06)
    start = 2 * BandShape().window
    assert all(r <= t for r, t in zip(refs[start:], tops[start:], strict=True))
    assert 0.55 * q95 <= sum(refs[-2000:]) / 2000 < 0.95 * q95


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stationary_noise_is_never_a_shock_nor_damage(kind, seed):
    """No shock and no damage (what raises WARNING and CRITICAL). ``far`` alone can be set
    by the forgetting rule when the first three draws happen to lie above the later noise's
    top (measured: lognormal 0.5 and 1.0, seed 1, on 297 and 117 of 5,000 steps, never for
    the ten consecutive steps damage needs); it is tested on its own below."""
    evidence, _, _ = _stationary(kind, seed)
    assert [i for i, e in enumerate(evidence) if e.shock or e.damage] == []
    assert [i for i, e in enumerate(evidence) if e.far and not e.forgotten] == []


def test_a_run_that_learned_and_went_back_to_its_start_is_damage():
    band = LossBand()
    losses = [2.3] * 3 + [2.3 * 0.97**k for k in range(1, 100)] + [0.1] * 100
    for loss in losses:
        assert not band.update(loss).far
    assert band.learned
    evidence = [band.update(2.2) for _ in range(14)]
    # the trailing median of 5 is back above 0.8 x 2.3 once three of its losses are
    forgotten = [i for i, e in enumerate(evidence) if e.forgotten]
    assert forgotten == list(range(2, 14))
    assert all(evidence[i].far for i in forgotten)
    assert next(i for i, e in enumerate(evidence) if e.damage) == 2 + band.sustain - 1


def test_a_stream_that_starts_at_its_floor_never_learned():
    band = LossBand()
    rng = torch.Generator().manual_seed(0)
    for loss in (0.1 + 0.01 * torch.randn(300, generator=rng)).tolist():
        band.update(loss)
    assert not band.learned
    assert not any(band.update(0.1 * 5).forgotten for _ in range(20))


_HEAVY = (
    "measured: lognormal noise with sigma 1 (q95 5.2x the median) is judged against the "
    "lowest band of the last 200, whose top is about 0.62 of the noise's 0.95 quantile, "
    "and leaves it by chance: 4 leaving episodes (5 steps) in 200,000 steps of 40 seeds "
    "(2e-5 a step; seeds 2, 7, 9, 28), none with memory=1 and none for sigma <= 0.7"
)


@pytest.mark.parametrize(
    "kind",
    [
        *KINDS[:2],
        pytest.param("lognormal 1.0", id="lognormal 1.0"),
        *KINDS[3:],
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stationary_noise_never_leaves_its_band(kind, seed, request):
    if kind == "lognormal 1.0" and seed == 2:
        request.applymarker(pytest.mark.xfail(strict=True, reason=_HEAVY))
    evidence, _, _ = _stationary(kind, seed)
    assert [i for i, e in enumerate(evidence) if e.outside or e.leaving] == []


SHIFT = 200


def _creep(memory: int = 200) -> tuple[LossBand, list[BandEvidence], list[float]]:
    """Noise at 1.0 until SHIFT, then growing 2% a step (x2 in 35 steps, x3 in 56)."""
    values = noise(SHIFT, 4) + [v * 1.02**k for k, v in enumerate(noise(100, 5))]
    band = LossBand(shape=BandShape(memory=memory))
    evidence, refs = [], []
    for v in values:
        evidence.append(band.update(v))
        refs.append(band.ref_top)
    return band, evidence, refs


def test_a_loss_creeping_up_leaves_its_band_it_does_not_carry_it():
    """Every loss enters the window, so the band itself rises with the creep; the
    reference (the lowest band of the last 200) stays where the loss was. Leaving needs
    the trailing median twice the reference floor (about 1.0): 1.02^35 = 2, so leaving
    comes from SHIFT + 35 (measured SHIFT + 41); damage needs three times it, 1.02^56 = 3
    (measured SHIFT + 66)."""
    band, evidence, refs = _creep()
    leaving, damage = first(evidence, "leaving"), first(evidence, "damage")
    assert SHIFT + 35 <= leaving <= SHIFT + 45
    assert SHIFT + 56 <= damage <= SHIFT + 75
    assert all(e.leaving for e in evidence[leaving:])
    # the reference did not follow: it stays a band from before the creep (within the
    # tops the band had while the loss was calm), while the band itself has followed the
    # loss up more than five times
    calm = max(top for top, _, _ in feed_bands(noise(SHIFT, 4)))
    assert max(refs[SHIFT:]) <= calm < 1.3
    assert band.top > 5 * calm and band.floor > 3 * band.ref_floor
    assert band.ref_floor == pytest.approx(1.0, abs=0.05)


def test_without_a_memory_the_creeping_loss_carries_its_band():
    """The same creep judged against the current band only (memory=1): the band rises
    with the loss and it never leaves. The memory is what finds a creep."""
    band, evidence, refs = _creep(memory=1)
    assert first(evidence, "outside") is None and first(evidence, "damage") is None
    assert refs[-1] == band.top > 5.0


def test_a_slowly_falling_loss_never_leaves_its_band():
    rng = random.Random(3)
    values = [
        (0.05 + 2.0 * math.exp(-t / 800)) * math.exp(0.3 * rng.gauss(0, 1)) for t in range(5000)
    ]
    evidence = feed(LossBand(), values)
    assert [i for i, e in enumerate(evidence) if e.shock or e.leaving or e.damage] == []


# --------------------------------------------------------------------- evidence
def test_a_single_huge_batch_is_a_shock_and_nothing_more():
    values = noise(200, 1)
    values[150] = 100.0
    values[170] = 5.0  # 5x the floor: above the band, but no shock
    evidence = feed(LossBand(), values)
    assert [i for i, e in enumerate(evidence) if e.shock] == [150]
    assert [i for i, e in enumerate(evidence) if e.single] == [150, 170]
    assert not any(e.outside or e.leaving or e.far or e.damage for e in evidence)


def test_a_sustained_shift_leaves_after_confirm_steps_and_damages_after_sustain():
    # x5 from step 200 on, exactly (so that the trailing median is the same every step)
    values = noise(SHIFT, 2) + [5.0] * 60
    band = LossBand()
    evidence = feed(band, values[:SHIFT])
    calm = max(top for top, _, _ in band.bands)
    evidence += feed(band, values[SHIFT:])
    # the trailing median of 5 is shifted once three of them are (step 202); leaving
    # after confirm=2 steps outside; far from 202 (5 >= 3 x floor and >= 10 widths);
    # damage after sustain=10 steps far, not lower than where the streak began
    assert first(evidence, "outside") == SHIFT + 2
    assert first(evidence, "leaving") == SHIFT + 2 + band.confirm - 1 == SHIFT + 3
    assert first(evidence, "far") == SHIFT + 2
    assert first(evidence, "damage") == SHIFT + 2 + band.sustain - 1 == SHIFT + 11
    assert all(e.leaving and e.damage for e in evidence[SHIFT + 11 :])
    # the band itself followed the shift (the last 60 of its 64 values are 5), its
    # reference did not: it is a band from before the shift
    assert band.floor == band.top == 5.0
    assert band.ref_top <= calm < 1.5 and band.ref_floor == pytest.approx(1.0, abs=0.1)
    assert evidence[-1].ratio == pytest.approx(5.0 / band.ref_floor)


def test_a_noisy_sustained_shift_is_found_at_the_same_steps():
    base = noise(SHIFT + 60, 3)
    values = base[:SHIFT] + [5.0 * v for v in base[SHIFT:]]
    evidence = feed(LossBand(), values)
    assert first(evidence, "leaving") == SHIFT + 3
    # damage needs the trailing median not lower than 9 steps before: with noise, at
    # SHIFT + 11 or within a few steps of it
    assert SHIFT + 11 <= first(evidence, "damage") <= SHIFT + 20


@pytest.mark.parametrize("memory", [50, 200])
def test_after_memory_steps_at_a_new_level_the_reference_follows_it(memory):
    """x5 from SHIFT on: the bands learned up to SHIFT + 2 still have the old top (three
    new losses are above the 0.95 quantile of 64); the last of them is in the history
    until step SHIFT + 2 + ``memory``, so the loss is outside from SHIFT + 2 to exactly
    then, and never after: the reference is now a band at the new level."""
    band = LossBand(shape=BandShape(memory=memory))
    evidence = feed(band, noise(SHIFT, 4) + noise(2 * memory + 100, 5, floor=5.0))
    outside = [i for i, e in enumerate(evidence) if e.outside]
    assert outside == list(range(SHIFT + 2, SHIFT + 2 + memory + 1))
    assert not any(e.leaving or e.damage for e in evidence[SHIFT + 3 + memory :])
    assert band.ref_floor == pytest.approx(5.0, rel=0.05)
    assert band.ref_top == min(top for top, _, _ in band.bands) > 5.0


@pytest.mark.parametrize(
    "after",
    [
        [5.0] * 6 + [2.5] * 100,  # falls back below 3x the floor: still outside, not far
        [5.0] * 8 + [1.0] * 100,  # back to the floor before sustain=10 steps
        # far for 11 steps (more than sustain=10), but falling 10% a step: the trailing
        # median halves within sustain steps (recovered=0.5), so it is recovering
        [8.0 * 0.9**k for k in range(20)] + [3.4] * 3,
    ],
    ids=["below-3x", "recovers", "falling"],
)
def test_a_jump_that_falls_back_is_not_damage(after):
    evidence = feed(LossBand(), noise(SHIFT, 6) + after)
    assert first(evidence, "leaving") == SHIFT + 3  # it did leave the band
    assert first(evidence, "damage") is None


def test_damage_needs_the_loss_not_to_have_recovered_by_half():
    """Far above the floor for more than sustain=10 steps, falling 5% a step: the trailing
    median at the end of the streak is about 0.6 of its value at its start, not yet half
    (``recovered=0.5``): damage. With ``recovered=0.7`` the same fall counts as recovering;
    with a fall of 10% a step (below half within the streak) it does at the default."""
    slow = [8.0 * 0.95**k for k in range(17)] + [3.4] * 3
    assert first(feed(LossBand(), noise(SHIFT, 6) + slow), "damage") == SHIFT + 11
    assert (
        first(feed(LossBand(damage=BandDamage(recovered=0.7)), noise(SHIFT, 6) + slow), "damage")
        is None
    )
    fast = [8.0 * 0.9**k for k in range(20)] + [3.4] * 3
    assert (
        first(feed(LossBand(damage=BandDamage(recovered=1e-9)), noise(SHIFT, 6) + fast), "damage")
        == SHIFT + 11
    )


def test_learn_false_leaves_the_band_unchanged_and_still_judges():
    band = LossBand()
    feed(band, noise(100, 7))
    before = (list(band.values), list(band.bands), band.floor, band.top, band.spread)
    reference = (band.ref_top, band.ref_floor, band.ref_spread)
    evidence = feed(band, [1.0] * 20 + [100.0] + [6.0] * 20, learn=False)
    assert (list(band.values), list(band.bands), band.floor, band.top, band.spread) == before
    assert (band.ref_top, band.ref_floor, band.ref_spread) == reference
    # the trailing median of five is above the band from 22 (the shock counts among its
    # high values), leaving at 23
    assert evidence[20].shock and first(evidence, "leaving") == 23
    band.update(1.0)
    assert list(band.values) != before[0]


def test_restart_forgets_the_streaks_and_keeps_the_band():
    band = LossBand()
    evidence = feed(band, noise(SHIFT, 8) + [5.0] * 5)
    assert evidence[-1].leaving
    kept = (list(band.values), list(band.bands), band.ref_top)
    band.restart()
    assert (list(band.values), list(band.bands), band.ref_top) == kept
    assert band.outside_streak == band.damage_streak == 0
    assert not band.update(1.0).outside


# ------------------------------------------------------------------ a change of data
def feed_epochs(band: LossBand, values, epochs=()) -> list[BandEvidence]:
    """Like ``feed``, with ``new_epoch()`` before the losses at the steps ``epochs``."""
    evidence = []
    for i, v in enumerate(values):
        if i in epochs:
            band.new_epoch()
        evidence.append(band.update(v))
    return evidence


def test_a_jump_at_an_epoch_boundary_from_a_calm_band_restarts_the_band():
    """x5 from the first batch of an epoch, the band calm until then: the data changed,
    not the run. The band forgets everything and starts again from the new level: no
    evidence for ``warmup`` losses, then a band at 5, inside which the loss stays."""
    values = noise(SHIFT, 4) + noise(200, 5, floor=5.0)
    band = LossBand()
    evidence = feed_epochs(band, values, epochs={SHIFT})
    assert band.data_changes == 1
    assert evidence[SHIFT : SHIFT + band.warmup] == [BandEvidence()] * band.warmup
    assert not math.isnan(evidence[SHIFT + band.warmup].excess)
    assert [i for i, e in enumerate(evidence) if e.single or e.outside or e.far] == []
    assert len(band.bands) == 200 - band.warmup + 1
    assert band.ref_floor == pytest.approx(5.0, rel=0.05)
    # the same jump without the boundary (or one batch into the epoch) leaves the band
    for epochs in (set(), {SHIFT - 1}):
        other = LossBand()
        evidence = feed_epochs(other, values, epochs)
        assert other.data_changes == 0
        assert first(evidence, "leaving") == SHIFT + 3
        assert first(evidence, "damage") is not None


def test_a_boundary_without_a_jump_changes_nothing():
    values = noise(400, 4)
    a, b = LossBand(), LossBand()
    assert feed_epochs(a, values, epochs={100, 200, 300}) == feed(b, values)
    # the band is the same; only the count of steps into the current epoch differs
    state_a, state_b = a.state_dict(), b.state_dict()
    assert (state_a.pop("epoch_steps"), state_b.pop("epoch_steps")) == (100, 400)
    assert a.data_changes == 0 and state_a == state_b


def test_a_jump_at_a_boundary_while_the_loss_was_already_rising_is_no_change_of_data():
    """The loss creeps up 2% a step from SHIFT; 30 steps on its trailing median is above
    the reference top (not yet leaving: it is 1.8x the floor). A jump at an epoch
    boundary then is not a change of data: the band is kept and the jump leaves it."""
    creep = noise(SHIFT, 4) + [v * 1.02**k for k, v in enumerate(noise(30, 5))]
    band = LossBand()
    evidence = feed_epochs(band, creep)
    assert band.trail[-1] > band.ref_top and not evidence[-1].outside
    bands = list(band.bands)
    evidence += feed_epochs(band, [5.0] * 20, epochs={0})
    assert band.data_changes == 0
    assert list(band.bands)[: len(bands) - 20] == bands[20:]  # the history went on
    assert SHIFT + 30 < first(evidence, "leaving") <= SHIFT + 30 + 3
    assert first(evidence, "damage") is not None
    # the same jump at the same boundary after a calm loss restarts the band
    calm = LossBand()
    evidence = feed_epochs(calm, noise(SHIFT + 30, 4) + [5.0] * 20, epochs={SHIFT + 30})
    assert calm.data_changes == 1 and first(evidence, "outside") is None


# ------------------------------------------------------------------------- state
def test_state_dict_round_trip_also_through_a_weights_only_file(tmp_path):
    # a change of data at 100 (the band restarts at 5), then x5 from 200
    values = noise(100, 9) + noise(100, 10, floor=5.0) + [25.0] * 30
    a = LossBand()
    feed_epochs(a, values[: SHIFT + 6], epochs={100})  # mid-streak: outside and far 4 steps
    assert a.data_changes == 1
    assert a.outside_streak == 4 and a.damage_streak == 4
    reference = (a.ref_top, a.ref_floor, a.ref_spread)
    # 106 losses since the band restarted, fewer than 2 x window: the start band
    assert reference != min(a.bands) and reference[1] == pytest.approx(5.0, rel=0.1)
    b = LossBand()
    b.load_state_dict(a.state_dict())
    torch.save(a.state_dict(), tmp_path / "band.pt")
    c = LossBand()
    c.load_state_dict(torch.load(tmp_path / "band.pt", weights_only=True))
    for x in (b, c):
        assert (x.ref_top, x.ref_floor, x.ref_spread) == reference
        assert (x.floor, x.top, x.spread) == (a.floor, a.top, a.spread)
        assert x.data_changes == 1
        assert (x.outside_streak, x.damage_streak) == (4, 4)
    rest = values[SHIFT + 6 :]
    expected = feed(a, rest)
    assert feed(b, rest) == expected
    assert feed(c, rest) == expected
    assert first(expected, "damage") == SHIFT + 11 - (SHIFT + 6)
    assert (c.ref_top, c.ref_floor, c.ref_spread) == (a.ref_top, a.ref_floor, a.ref_spread)


def test_a_loaded_band_has_the_saved_history_and_goes_on_like_it():
    band, _ = _reference_by_hand()  # memory=3, history [A, B, C], reference B
    loaded = LossBand(shape=BandShape(window=4, warmup=4, smooth=1, memory=3, lag=0))
    loaded.load_state_dict(band.state_dict())
    assert list(loaded.bands) == list(band.bands)
    # the first 6 is judged against B by both, and the history becomes [B, C, D]: the
    # second 6 is judged against B again (outside twice: leaving); then B leaves the
    # memory and the reference is C
    assert feed(loaded, [6.0, 6.0]) == feed(band, [6.0, 6.0])
    assert loaded.ref_top == band.ref_top == pytest.approx(5.55)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(window=0), "window"),
        (dict(window=True), "window"),
        (dict(window=2.5), "window"),
        (dict(smooth=0), "smooth"),
        (dict(confirm=0), "confirm"),
        (dict(sustain=0), "sustain"),
        (dict(warmup=0), "warmup"),
        (dict(warmup=65), "warmup"),
        (dict(quantile=0.5), "quantile"),
        (dict(quantile=1.0), "quantile"),
        (dict(width=0.0), "width"),
        (dict(shock_width=-1.0), "shock_width"),
        (dict(damage_width=0.0), "damage_width"),
        (dict(rel_width=0.0), "rel_width"),
        (dict(factor=0.5), "factor"),
        (dict(shock_factor=0.99), "shock_factor"),
        (dict(damage_factor=float("nan")), "damage_factor"),
        (dict(memory=0), "memory"),
        (dict(memory=-1), "memory"),
        (dict(memory=True), "memory"),
        (dict(memory=1.5), "memory"),
        (dict(scale_frac=-0.1), "scale_frac"),
        (dict(scale_frac=1.0), "scale_frac"),
        (dict(recovered=0.0), "recovered"),
        (dict(recovered=1.5), "recovered"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    (field,) = kwargs
    group, _ = BAND_FLAT_ALIASES[field]
    config = {"shape": BandShape, "leaving": BandLeaving, "damage": BandDamage}[group]
    with pytest.raises(ValueError, match=f"band {name} must"):
        LossBand(**{group: config(**kwargs)})


# ------------------------------------------------------------------ the start band
@pytest.mark.parametrize("lag", [1, -1, True, 2.5])
def test_bad_lag_names_itself(lag):
    with pytest.raises(ValueError, match="band lag must be 0 or an integer >= 2"):
        BandShape(lag=lag)


def test_lag_has_no_flat_keyword():
    assert "lag" not in BAND_FLAT_ALIASES
    with pytest.raises(TypeError):
        LossBand(lag=16)


def test_start_band_by_hand_on_a_tiny_window():
    """Over the first 2 x window losses the reference is the lowest band of the window
    with the fall of its local level taken out (lag 16; at most the window of 5 is used).
    After [1, 2, 3]: local levels (medians of the losses so far) 1, 1.5, 2; now 2; each
    loss moved by now - its level: 2, 2.5, 3; floor 2.5, top at position 0.95 * 2:
    2.5 + 0.9 * 0.5 = 2.95, width 0.45. The window's own band (floor 2, top 2.9) is
    unchanged."""
    band = LossBand(shape=BandShape(window=5, warmup=3, smooth=3))
    feed(band, [1.0, 2.0, 3.0])
    assert (band.floor, band.top, band.spread) == pytest.approx((2.0, 2.9, 0.9))
    assert (band.ref_top, band.ref_floor, band.ref_spread) == pytest.approx((2.95, 2.5, 0.45))
    # the trailing median of [2, 3, 4] = 3 is judged against it
    e = band.update(4.0)
    assert e.excess == pytest.approx((3.0 - 2.95) / 0.45) and e.ratio == pytest.approx(1.2)
    # [1, 2, 3, 4]: levels 1, 1.5, 2, 2.5; moved: 2.5, 3, 3, 4; floor 3, top 3 + 0.85 = 3.85:
    # higher, so the reference stays the first start band
    assert (band.ref_top, band.ref_floor, band.ref_spread) == pytest.approx((2.95, 2.5, 0.45))
    # 100 >= 2.95 + 50 * 0.45 = 25.45 and >= 10 * 2.5: a shock
    e = band.update(100.0)
    assert e.shock and e.excess == pytest.approx((100.0 - 2.95) / 0.45)
    # after 2 x window = 10 losses the reference is the window's own lowest band again
    feed(band, [2.0] * 6)
    assert (band.ref_top, band.ref_floor, band.ref_spread) == min(band.bands)


def _fall_then(after: list[float], seed: int = 0, sigma: float = 0.1) -> list[float]:
    """A loss falling from 2.3 to 0.3 in 18 steps (lognormal noise ``sigma``), then
    ``after``."""
    rng = random.Random(seed)
    fall = [2.3 * (0.3 / 2.3) ** (i / 17) * math.exp(sigma * rng.gauss(0, 1)) for i in range(18)]
    return fall + after


@pytest.mark.parametrize("seed", range(3))
def test_a_run_that_turns_unstable_as_soon_as_it_has_fallen_leaves_its_start_band(seed):
    """The fall fills the window's quantile: judged against the window's own band
    (lag=0) a loss that sits at the floor of 0.3 it reached for 10 steps, then bounces
    between 2x and 10x it, never leaves it; against the start band it leaves within a few
    steps of turning."""
    rng = random.Random(100 + seed)
    bouncing = [0.3 * math.exp(rng.uniform(0.7, 2.3)) for _ in range(60)]
    values = _fall_then(noise(10, seed, floor=0.3) + bouncing, seed)  # turns at step 28
    start = feed(LossBand(), values)
    own = feed(LossBand(shape=BandShape(lag=0)), values)
    assert first(own, "leaving") is None
    assert 28 <= first(start, "leaving") <= 28 + 10


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize(("fall", "after"), [(0.1, 0.1), (0.1, 0.5), (0.3, 0.6), (0.5, 1.0)])
def test_a_fall_that_settles_into_noise_never_leaves_its_start_band(seed, fall, after):
    """A healthy start: the same fall, then lognormal noise at the floor it reached, up to
    a tiny batch's spread and up to five times the fall's: no shock, no leaving, no
    damage."""
    rng = random.Random(200 + seed)
    rest = [0.3 * math.exp(after * rng.gauss(0, 1)) for _ in range(300)]
    evidence = feed(LossBand(), _fall_then(rest, seed, fall))
    assert [i for i, e in enumerate(evidence) if e.shock or e.leaving or e.damage] == []


def test_the_start_band_on_a_loss_already_at_its_floor_is_the_window_band():
    """Without a fall the local level only wanders with the noise, so the start band is
    close to the window's own band: the lowest of them sits a little lower, since the
    level of the last ``lag`` losses that each is drawn about scatters (measured: floor
    8% and top 6% below, sigma 0.1)."""
    a = LossBand()
    feed(a, noise(100, 7))
    own = a._lowest[0][1]
    assert 0.85 * own[0] <= a.ref_top <= own[0]
    assert 0.85 * own[1] <= a.ref_floor <= own[1]


def test_one_step_epochs_show_no_change_of_data():
    """Full-batch training starts an epoch at every step, so every batch is the first of
    one: a jump there is judged as a jump, not taken for new data. Epochs of at least
    ``smooth`` steps still show a change of data at their first batch."""
    values = noise(SHIFT, 4) + noise(50, 5, floor=5.0)
    full_batch = LossBand()
    evidence = feed_epochs(full_batch, values, epochs=set(range(len(values))))
    assert full_batch.data_changes == 0
    assert first(evidence, "leaving") == SHIFT + 3
    five = LossBand()
    feed_epochs(five, values, epochs=set(range(0, len(values), 5)))
    assert five.data_changes == 1


def test_a_band_saved_in_its_start_goes_on_like_the_original():
    values = _fall_then([0.3 * math.exp(0.2 * g) for g in noise(150, 3, sigma=1.0)])
    a = LossBand()
    feed(a, values[:60])
    b = LossBand()
    b.load_state_dict(a.state_dict())
    assert (b.ref_top, b.ref_floor, b.ref_spread) == (a.ref_top, a.ref_floor, a.ref_spread)
    assert feed(b, values[60:]) == feed(a, values[60:])
