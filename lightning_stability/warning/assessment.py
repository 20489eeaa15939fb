"""One step's assessment of the meta-state: deviation from baseline, trend indicators
and hard rules combined into proposed levels. Pure Python, no Lightning."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_stability.configuration import regroup
from lightning_stability.vocabulary import DIMENSIONS, META_DEVIATION
from lightning_stability.warning.baseline import RobustBaseline
from lightning_stability.warning.config import (
    WARNING_FLAT_ALIASES,
    Baselines,
    DeviationThresholds,
    EdgeRule,
    TrendTest,
)
from lightning_stability.warning.cusum import Cusum
from lightning_stability.warning.events import Level
from lightning_stability.warning.indicators import TrendIndicator
from lightning_stability.warning.loss_band import BandEvidence, LossBand
from lightning_stability.warning.metastate import MetaState, SignalSpec
from lightning_stability.warning.rules import LOSS_KEY, HardRules, RuleHit

__all__ = ["Assessment", "MetaStateMonitor"]

# Scores are capped so that one absurd reading cannot make the deviation overflow.
_Z_CAP = 1e3


@dataclass
class Assessment:
    """What the evidence at one optimizer step says.

    Attributes:
        proposed: level by the enter thresholds, trend indicators and rules.
        hold: level by the exit thresholds (lower), indicators and rules.
        hard: a hard rule demands CRITICAL now.
        ruled: the highest level a rule demands now (rules are evidence: no patience).
        worse: the evidence is stronger than when the level was last issued (an edge rule
            fires, or the trailing loss is higher), so a repeat of it is warranted.
        deviation: combined deviation score (dimensionless, robust z units).
        dimensions: per-dimension score (largest upward z among its signals).
        drivers: ``(key, strength, reason)`` of what drove the level, strongest first.
    """

    proposed: Level = Level.OK
    hold: Level = Level.OK
    hard: bool = False
    ruled: Level = Level.OK
    worse: bool = False
    deviation: float = 0.0
    dimensions: dict[str, float] = field(default_factory=dict)
    drivers: list[tuple[str, float, str]] = field(default_factory=list)

    def message(self, level: Level, step: int, limit: int = 3) -> str:
        """One sentence naming the level, the step and the strongest drivers."""
        head = f"{level.name.lower()} at step {step} (deviation {self.deviation:.1f})"
        if not self.drivers:
            return head
        return head + ": " + "; ".join(reason for _, _, reason in self.drivers[:limit])


class MetaStateMonitor:
    """Readings in, :class:`Assessment` out, one optimizer step at a time.

    Each consumed signal has its own :class:`RobustBaseline` (and a
    :class:`TrendIndicator` if its spec asks for one). The deviation is the Euclidean
    norm of the four dimension scores, each the largest upward robust z-score among
    that dimension's signals: a Mahalanobis-type distance with a robust diagonal
    scale, in which only the direction of instability counts. A one-sided CUSUM of the
    deviation (:class:`~lightning_stability.warning.cusum.Cusum`) proposes WARNING when a
    moderate deviation persists. Baselines are frozen
    while the level is WARNING or worse (so they do not learn the instability), for
    at most ``freeze_limit`` steps (after which the run's new regime is accepted).

    Args are those of :class:`~lightning_stability.warning.early_warning.EarlyWarning`
    of the same names; ``**deprecated`` takes the flat keywords of the previous release
    (``watch_threshold=8.0``, ``trend_tau=0.6``, ...), folded into their group with a
    ``DeprecationWarning``.
    """

    def __init__(
        self,
        signals: Iterable[SignalSpec] | None = None,
        deviation: DeviationThresholds | None = None,
        baselines: Baselines | None = None,
        trend: TrendTest | None = None,
        edge: EdgeRule | None = None,
        loss_band: LossBand | None = None,
        **deprecated: Any,
    ) -> None:
        groups = regroup(
            "MetaStateMonitor",
            deprecated,
            WARNING_FLAT_ALIASES,
            {
                "deviation": (DeviationThresholds, deviation),
                "baselines": (Baselines, baselines),
                "trend": (TrendTest, trend),
                "edge": (EdgeRule, edge),
            },
        )
        deviation, baselines = groups["deviation"], groups["baselines"]
        trend, edge = groups["trend"], groups["edge"]
        self.deviation_config, self.baselines_config = deviation, baselines
        self.trend_config, self.edge_config = trend, edge
        self.meta = MetaState(signals, max_age=baselines.max_age)
        self.watch_threshold = deviation.watch_threshold
        self.exit_ratio = deviation.exit_ratio
        self.window = baselines.window
        self.warmup = baselines.warmup
        self.freeze_limit = baselines.freeze_limit
        self.trend_args = trend.as_args()
        self.rules = HardRules(edge.margin, edge.sustain, edge.critical, edge.lr_jump)
        self.band = LossBand() if loss_band is None else loss_band
        self.cusum = (
            None
            if deviation.cusum_threshold is None
            else Cusum(deviation.cusum_drift, deviation.cusum_threshold)
        )
        self.baselines: dict[str, RobustBaseline] = {}
        self.trends: dict[str, TrendIndicator] = {}
        self.frozen_since: int | None = None
        self.paused_until = -1
        self._band_step = -1
        self._band_last = BandEvidence()
        self._issued_trailing = -math.inf

    def _baseline(self, key: str, spec: SignalSpec) -> RobustBaseline:
        if key not in self.baselines:
            self.baselines[key] = RobustBaseline(self.window, self.warmup, spec.min_scale)
        return self.baselines[key]

    def _level_of(self, deviation: float, scale: float) -> Level:
        # soft evidence asks for closer measurement, never more
        return Level.WATCH if deviation >= self.watch_threshold * scale else Level.OK

    def assess(self, readings: Mapping[str, Any], step: int, level: Level = Level.OK) -> Assessment:
        """Assess ``readings`` (key -> object with ``value`` and ``step``) at ``step``,
        given the run's current ``level`` (which decides whether baselines learn)."""
        if level >= Level.WARNING:
            if self.frozen_since is None:
                self.frozen_since = step
        else:
            self.frozen_since = None
        learn = step >= self.paused_until and (
            self.frozen_since is None or step - self.frozen_since >= self.freeze_limit
        )

        observations = self.meta.observe(readings, step)
        out = Assessment()
        dims: dict[str, float] = {}
        trend_level = Level.OK
        for obs in observations:
            if not math.isfinite(obs.value):
                continue
            baseline = self._baseline(obs.key, obs.spec)
            z = baseline.score(obs.value)
            if z is not None:
                z = min(max(z, 0.0), _Z_CAP)
                dims[obs.dimension] = max(dims.get(obs.dimension, 0.0), z)
                if z > 0:
                    out.drivers.append(
                        (
                            obs.key,
                            z,
                            f"{obs.key} = {obs.raw:.4g} is {z:.1f} robust sd above baseline",
                        )
                    )
            if obs.fresh and learn:
                baseline.update(obs.value)
            if obs.spec.trend:
                trend = self.trends.get(obs.key)
                if trend is None:
                    trend = self.trends[obs.key] = TrendIndicator(*self.trend_args)
                reading = trend.update(obs.value) if obs.fresh and learn else trend.last
                # critical slowing down is rising variance AND rising autocorrelation
                # (Scheffer et al. 2009); a variance that grows alone is not evidence
                if reading is not None and reading.level >= Level.WARNING:
                    trend_level = Level.WATCH
                    out.drivers.append(
                        (
                            obs.key,
                            _Z_CAP + float(reading.level),
                            f"variance and lag-1 autocorrelation of {obs.key} rising (Kendall "
                            f"tau of the variance {reading.tau_var:.2f}, of the autocorrelation "
                            f"{reading.tau_ac1:.2f}; variance x{reading.var_ratio:.1f})",
                        )
                    )
        out.dimensions = {d: dims[d] for d in DIMENSIONS if d in dims}
        out.deviation = math.sqrt(sum(s * s for s in out.dimensions.values()))
        out.proposed = max(self._level_of(out.deviation, 1.0), trend_level)
        out.hold = max(self._level_of(out.deviation, self.exit_ratio), trend_level)
        if self.cusum is not None:
            # readings of skipped updates describe data the weights never saw
            s = self.cusum.update(out.deviation if step >= self.paused_until else 0.0)
            if s >= self.exit_ratio * self.cusum.threshold:
                out.hold = max(out.hold, Level.WATCH)
            if self.cusum.alarm:
                # named first only when it, not this step's deviation, is the reason
                reason = out.proposed < Level.WATCH
                out.proposed = max(out.proposed, Level.WATCH)
                out.drivers.append(
                    (
                        META_DEVIATION,
                        _Z_CAP if reason else 0.0,
                        f"deviation above {self.cusum.drift:g} sustained (CUSUM {s:.1f} >= "
                        f"{self.cusum.threshold:g})",
                    )
                )

        band = self._band(readings, step, learn)
        hits: list[RuleHit] = self.rules.check(observations, readings, band)
        rule_drivers = []
        for hit in hits:
            if hit.level >= Level.CRITICAL:
                out.hard = True
            out.ruled = max(out.ruled, hit.level)
            out.proposed = max(out.proposed, hit.level)
            out.hold = max(out.hold, hit.level)
            rule_drivers.append((hit.signal, math.inf, hit.message))
        # worse: a rule other than the loss's own fires (the physics still says unsafe),
        # or the trailing loss is above where it was when the level was last issued
        physics = any(h.level >= Level.WARNING and h.signal != LOSS_KEY for h in hits)
        trailing = self.band.trail[-1] if self.band.trail else math.nan
        out.worse = physics or trailing > self._issued_trailing
        if band.outside:
            # a WARNING is held while the loss is still above its band, and a CRITICAL
            # while it is still far above its floor
            out.hold = max(out.hold, Level.CRITICAL if band.far else Level.WARNING)
        out.drivers.sort(key=lambda d: -d[1])
        out.drivers = rule_drivers + out.drivers
        return out

    def _band(self, readings: Mapping[str, Any], step: int, learn: bool) -> BandEvidence:
        """The loss band's evidence for this step's loss (once per fresh loss reading)."""
        reading = readings.get(LOSS_KEY)
        if reading is None or int(reading.step) == self._band_step:
            return self._band_last
        self._band_step = int(reading.step)
        self._band_last = self.band.update(float(reading.value), learn=learn)
        return self._band_last

    def issued(self) -> None:
        """A level was just issued: later repeats need stronger evidence than this step's."""
        self._issued_trailing = self.band.trail[-1] if self.band.trail else -math.inf

    def restart(self, step: int, pause: int = 0) -> None:
        """The run went back to an earlier state at ``step``: forget the trend windows and
        the CUSUM (they describe the abandoned trajectory), keep the baselines (learned
        before the trouble, while they were frozen), and learn nothing for ``pause``
        steps (readings of updates that are being skipped describe no training)."""
        self.trends = {}
        if self.cusum is not None:
            self.cusum.reset()
        self.band.restart()
        self._band_last = BandEvidence()
        self.frozen_since = None
        self.paused_until = step + pause

    def state_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta.state_dict(),
            "rules": self.rules.state_dict(),
            "baselines": {k: b.state_dict() for k, b in self.baselines.items()},
            "trends": {k: t.state_dict() for k, t in self.trends.items()},
            "frozen_since": -1 if self.frozen_since is None else self.frozen_since,
            "cusum": None if self.cusum is None else self.cusum.state_dict(),
            "paused_until": self.paused_until,
            "band": self.band.state_dict(),
            "band_step": self._band_step,
            "issued_trailing": self._issued_trailing,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.meta.load_state_dict(state["meta"])
        self.rules.load_state_dict(state["rules"])
        self.baselines = {}
        for key, sub in state["baselines"].items():
            spec = self.meta.spec_for(key)
            if spec is not None:
                self._baseline(key, spec).load_state_dict(sub)
        self.trends = {}
        for key, sub in state["trends"].items():
            self.trends[key] = TrendIndicator(*self.trend_args)
            self.trends[key].load_state_dict(sub)
        if self.cusum is not None and state.get("cusum") is not None:
            self.cusum.load_state_dict(state["cusum"])
        self.paused_until = int(state.get("paused_until", -1))
        if state.get("band") is not None:
            self.band.load_state_dict(state["band"])
        self._band_step = int(state.get("band_step", -1))
        self._issued_trailing = float(state.get("issued_trailing", -math.inf))
        frozen = int(state["frozen_since"])
        self.frozen_since = None if frozen < 0 else frozen
