"""The band a training loss moves in, and the evidence that it is leaving it.

A healthy loss is not stationary: it falls, then sits at a noise floor where its relative
spread is large (tiny batches, heavy-tailed per-batch losses). A z-score of the raw loss
against a rolling baseline mistakes that noise, or a slow drift of the floor, for trouble.
The band instead describes where the loss has been: its floor (the rolling median) and the
top of its ordinary noise (a high rolling quantile). A loss *leaves* the band when its
short trailing median is well above the top, by a multiple of the band's own width, and
by a factor of the floor; both conditions are needed, because near zero a width alone is
tiny and far from zero a factor alone is noise.

Three pieces of evidence come out of it, in increasing severity:

* ``shock``: one batch's loss far outside the band (a corrupted batch, a learning-rate
  jump that already hit);
* ``leaving``: the trailing median above the band for ``confirm`` consecutive steps;
* ``single``: one loss above the band, which is evidence only where something already
  explains it (the rules use it in the steps after a learning-rate jump);
* ``damage``: the trailing median back near the loss the run started from, after it had
  learned, or the trailing median ``damage_factor`` times the floor and ``damage_width``
  widths above the top for ``sustain`` consecutive steps, without recovering (the rule by
  which a run is said to diverge: far above its recent floor for several steps).

Until the window has rolled over once, it may still hold the fast fall of early training,
whose quantile measures the fall rather than the noise; over those steps the reference is
instead the lowest band drawn about a lagged local level
(:attr:`~lightning_stability.warning.config.BandShape.lag`), so that a run which turns
unstable as soon as it has fallen is judged against the noise it had, not against its fall.

A change of data is not a change of the run: when the first batch of an epoch jumps above
a band that was calm until then (a curriculum that moves to harder data, a new shard), the
band starts again from the new level. A shift that begins anywhere else is judged as usual.

The band learns only while the caller says so (not while the run is being warned about,
so that it does not learn the instability) and never from non-finite losses.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_stability.configuration import regroup
from lightning_stability.warning.baseline import SortedWindow, median, median_of_sorted
from lightning_stability.warning.config import (
    BAND_FLAT_ALIASES,
    BandDamage,
    BandLeaving,
    BandShape,
)

__all__ = ["BandEvidence", "LossBand"]


@dataclass(frozen=True)
class BandEvidence:
    """What the band says about the latest loss.

    Attributes:
        excess: how many band widths the trailing median lies above the band's top
            (negative inside the band; NaN until the band is ready).
        ratio: trailing median over the floor (NaN until ready).
        shock: one loss far outside the band.
        leaving: the trailing median has stayed above the band for ``confirm`` steps.
        outside: the trailing median is above the band now (the hold condition).
        single: this one loss is above the band (by ``width`` widths and ``factor``
            times the floor).
        far: the trailing median is far above the floor now (the hold condition of
            ``damage``).
        damage: far above the floor for ``sustain`` steps without recovering.
        forgotten: the trailing median is back near the loss the run started from, after
            it had fallen well below it (counts as far).
    """

    excess: float = math.nan
    ratio: float = math.nan
    shock: bool = False
    leaving: bool = False
    outside: bool = False
    single: bool = False
    far: bool = False
    damage: bool = False
    forgotten: bool = False


class LossBand:
    """Rolling band of a loss stream (see the module docstring).

    Args:
        shape: how the band is drawn (window, quantile, smoothing, memory;
            :class:`~lightning_stability.warning.config.BandShape`).
        leaving: when the loss leaves the band or one loss is a shock
            (:class:`~lightning_stability.warning.config.BandLeaving`).
        damage: when the loss shows damage
            (:class:`~lightning_stability.warning.config.BandDamage`).
        **deprecated: the flat keywords of the previous release (``window=64``, ...),
            folded into their group with a ``DeprecationWarning``.

    Example::

        from lightning_stability.warning import BandLeaving, EarlyWarning, LossBand

        EarlyWarning(loss_band=LossBand(leaving=BandLeaving(confirm=3)))
    """

    def __init__(
        self,
        shape: BandShape | None = None,
        leaving: BandLeaving | None = None,
        damage: BandDamage | None = None,
        **deprecated: Any,
    ) -> None:
        groups = regroup(
            "LossBand",
            deprecated,
            BAND_FLAT_ALIASES,
            {
                "shape": (BandShape, shape),
                "leaving": (BandLeaving, leaving),
                "damage": (BandDamage, damage),
            },
        )
        shape, leaving, damage = groups["shape"], groups["leaving"], groups["damage"]
        self.shape, self.leaving, self.damage = shape, leaving, damage
        # the fields as attributes of their own: update() reads them at every step
        self.window = shape.window
        self.warmup = shape.warmup
        self.quantile = shape.quantile
        self.smooth = shape.smooth
        self.rel_width = shape.rel_width
        self.memory = shape.memory
        self.lag = min(shape.lag, shape.window)
        self.scale_frac = shape.scale_frac
        self.width = leaving.width
        self.factor = leaving.factor
        self.confirm = leaving.confirm
        self.shock_width = leaving.shock_width
        self.shock_factor = leaving.shock_factor
        self.damage_width = damage.damage_width
        self.damage_factor = damage.damage_factor
        self.sustain = damage.sustain
        self.recovered = damage.recovered
        self.forget_low = damage.forget_low
        self.forget_high = damage.forget_high
        self.scale = 0.0
        self.bands: deque[tuple[float, float, float]] = deque(maxlen=self.memory)
        # candidates for min(self.bands) as the bands roll: (arrival number, band), bands
        # increasing from the front, so that the minimum is the front's
        self._lowest: deque[tuple[int, tuple[float, float, float]]] = deque()
        self._arrivals = 0
        self._window = SortedWindow(self.window)
        self.values: deque[float] = self._window.values
        self.recent: deque[float] = deque(maxlen=self.smooth)
        self.trail: deque[float] = deque(maxlen=max(self.confirm, self.sustain))
        self.outside_streak = 0
        self.damage_streak = 0
        self.floor = math.nan
        self.top = math.nan
        self.spread = math.nan
        self.ref_floor = self.ref_top = self.ref_spread = math.nan
        self.data_changes = 0
        self._boundary = False
        self._epoch_steps = 0
        self._first: list[float] = []
        self.learned = False
        # losses learned since the band began, and the lowest lagged band of the start
        self._count = 0
        self._start_band: tuple[float, float, float] | None = None

    @property
    def ready(self) -> bool:
        return len(self.values) >= self.warmup

    @property
    def start(self) -> float:
        """The loss the run started from: the median of its first three losses (NaN before
        any)."""
        return median(self._first[:3]) if self._first else math.nan

    def _band_of(self, ordered: list[float]) -> tuple[float, float, float]:
        """``(top, floor, spread)`` of sorted losses: the median, the ``quantile`` (linear
        interpolation) and their distance, never below ``rel_width`` of the floor."""
        n = len(ordered)
        floor = median_of_sorted(ordered)
        pos = self.quantile * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        top = ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])
        return top, floor, max(top - floor, self.rel_width * abs(floor), 1e-12)

    def _refresh(self) -> None:
        self.top, self.floor, self.spread = self._band_of(self._window.ordered())
        self._add_band((self.top, self.floor, self.spread))
        if self._in_start():
            lagged = self._lagged_band(list(self.values))
            if self._start_band is None or lagged < self._start_band:
                self._start_band = lagged
        self._set_reference()

    def _in_start(self) -> bool:
        """Whether the window may still hold the first losses since the band began."""
        return bool(self.lag) and self._count < 2 * self.window

    @property
    def _window_top(self) -> float:
        """The top of the lowest of the window's own bands in memory (NaN before any)."""
        return self._lowest[0][1][0] if self._lowest else math.nan

    def _set_reference(self) -> None:
        """The band losses are judged against: the start band while the window may still
        hold the fall of early training, else the lowest of the window's own bands."""
        reference = self._lowest[0][1]
        if self._in_start() and self._start_band is not None:
            reference = self._start_band
        self.ref_top, self.ref_floor, self.ref_spread = reference

    def _lagged_band(self, values: list[float]) -> tuple[float, float, float]:
        """``(top, floor, spread)`` of the window with the fall of its local level taken
        out: each loss moved by the change of the local level (the median of the last
        ``lag`` losses) between its step and now, then the band drawn as usual. On a
        loss at its noise floor the local level does not move and the band is the
        window's own; during a fall the early, higher losses are brought down to where
        the level is now (see :attr:`~lightning_stability.warning.config.BandShape.lag`)."""
        lag = self.lag
        levels = [median(values[max(0, i - lag + 1) : i + 1]) for i in range(len(values))]
        now = levels[-1]
        return self._band_of(sorted(v - level + now for v, level in zip(values, levels)))

    def _add_band(self, band: tuple[float, float, float]) -> None:
        """Append ``band`` to :attr:`bands` and keep ``min(self.bands)`` at the front of
        ``_lowest`` (a sliding-window minimum: O(1) amortised instead of a scan)."""
        self.bands.append(band)
        lowest = self._lowest
        while lowest and lowest[-1][1] >= band:
            lowest.pop()
        lowest.append((self._arrivals, band))
        self._arrivals += 1
        while lowest[0][0] < self._arrivals - self.memory:
            lowest.popleft()

    def _clear_bands(self) -> None:
        self.bands.clear()
        self._lowest.clear()

    def _above(self, value: float, width: float, factor: float) -> bool:
        floor = max(self.ref_floor, self.scale_frac * self.scale)
        return value >= self.ref_top + width * self.ref_spread and value >= factor * floor

    def new_epoch(self) -> None:
        """The next loss is the first of a new epoch (the data may change there)."""
        # An epoch shorter than the trailing median (full-batch training: one step) shows
        # no change of data at its first batch: every batch is a first one.
        self._boundary = self._epoch_steps >= self.smooth
        self._epoch_steps = 0

    def update(self, loss: float, learn: bool = True) -> BandEvidence:
        """Add one step's loss; ``learn=False`` keeps it out of the band itself."""
        if not math.isfinite(loss):
            return BandEvidence()
        boundary, self._boundary = self._boundary, False
        self._epoch_steps += 1
        # calm: until this batch the trailing loss sat inside the band's ordinary noise
        # (the window's own band: the start band is for judging instability, not data)
        calm = bool(self.trail) and self.trail[-1] <= self._window_top
        if boundary and calm and self.ready and self._above(loss, self.width, self.factor):
            # The first batch of an epoch jumps above a calm band: the data changed
            # (a curriculum, a new shard), not the run. The band starts again from the
            # new level instead of judging it against the old one.
            self._window.clear()
            self._clear_bands()
            self.recent.clear()
            self.trail.clear()
            self.outside_streak = self.damage_streak = 0
            self.data_changes += 1
            self._count, self._start_band = 0, None
        self.recent.append(loss)
        trailing = median(list(self.recent))
        self.trail.append(trailing)
        out = BandEvidence()
        if self.ready:
            shock = self._above(loss, self.shock_width, self.shock_factor)
            outside = self._above(trailing, self.width, self.factor)
            single = self._above(loss, self.width, self.factor)
            self.outside_streak = self.outside_streak + 1 if outside else 0
            leaving = self.outside_streak >= self.confirm
            # back where it started after it had learned: what training built is gone
            start = self.start
            if start > 0 and self.floor <= self.forget_low * start and self.top <= start:
                # the run learned: its floor fell to a fraction of where it started, and the
                # start lies above the noise it then settled into (a stream that starts at
                # its noise floor, as a fine-tuning run may, never qualifies by chance)
                self.learned = True
            forgotten = self.learned and trailing >= self.forget_high * start
            far = forgotten or self._above(trailing, self.damage_width, self.damage_factor)
            self.damage_streak = self.damage_streak + 1 if far else 0
            first = self.trail[-min(self.damage_streak, len(self.trail))]
            damage = self.damage_streak >= self.sustain and trailing >= self.recovered * first
            ratio = trailing / self.ref_floor if self.ref_floor > 0 else math.nan
            out = BandEvidence(
                excess=((max(trailing, loss) if shock else trailing) - self.ref_top)
                / self.ref_spread,
                ratio=ratio,
                shock=shock,
                leaving=leaving,
                outside=outside,
                single=single,
                far=far,
                damage=damage,
                forgotten=forgotten,
            )
        if learn:
            if len(self._first) < self.warmup:
                self._first.append(loss)
                self.scale = median(self._first)
            self._window.append(loss)
            self._count += 1
            if self.ready:
                self._refresh()
        return out

    def restart(self) -> None:
        """Forget the streaks and the trailing losses (the run went back to an earlier
        state); the band itself, learned before the trouble, is kept."""
        self.recent.clear()
        self.trail.clear()
        self.outside_streak = 0
        self.damage_streak = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": list(self.values),
            "recent": list(self.recent),
            "trail": list(self.trail),
            "outside_streak": self.outside_streak,
            "damage_streak": self.damage_streak,
            "data_changes": self.data_changes,
            "bands": [list(b) for b in self.bands],
            "first": list(self._first),
            "learned": self.learned,
            "count": self._count,
            "epoch_steps": self._epoch_steps,
            "start_band": None if self._start_band is None else list(self._start_band),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._window.clear()
        self._window.extend(float(v) for v in state["values"])
        self.recent.clear()
        self.recent.extend(float(v) for v in state["recent"])
        self.trail.clear()
        self.trail.extend(float(v) for v in state["trail"])
        self.outside_streak = int(state["outside_streak"])
        self.damage_streak = int(state["damage_streak"])
        self.data_changes = int(state.get("data_changes", 0))
        self._first = [float(v) for v in state.get("first", [])]
        self.scale = median(self._first) if self._first else 0.0
        self.learned = bool(state.get("learned", False))
        saved = [tuple(float(x) for x in b) for b in state.get("bands", [])]
        # a state saved before the start band existed: its run is past the start
        self._count = int(state.get("count", 2 * self.window))
        self._epoch_steps = int(state.get("epoch_steps", 0))
        start = state.get("start_band")
        if self.ready:
            self._refresh()
        self._start_band = None if start is None else tuple(float(x) for x in start)
        # the history as it was saved (the refresh above appended its band once more)
        self._clear_bands()
        for band in saved:
            self._add_band(band)
        if self.bands:
            self._set_reference()
