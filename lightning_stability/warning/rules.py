"""Hard rules that need no baseline: non-finite values, and a step past the edge of
stability.

Under gradient descent with step size eta, the quadratic model diverges along any
direction whose curvature exceeds 2/eta (Cohen et al. 2021, "Gradient descent on neural
networks typically occurs at the edge of stability"); the sharpness probe publishes this
as ``eos_ratio`` (1.0 = the edge). Training hovers near 1 at the edge of stability, so
only a ratio sustained above ``1 + margin`` is a warning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from lightning_stability.warning.events import Level
from lightning_stability.warning.metastate import Observation

__all__ = ["EOS_KEY", "HardRules", "RuleHit"]

EOS_KEY = "stability/sharpness/eos_ratio"
_NONFINITE_SUFFIX = "/nonfinite"


class RuleHit(NamedTuple):
    """A rule that fired: its level, the reading that triggered it, and why."""

    level: Level
    signal: str
    message: str


class HardRules:
    """Non-finite loss or gradients -> CRITICAL at once; ``eos_ratio`` above ``1 + margin``
    on ``sustain`` consecutive sharpness readings -> WARNING.

    Args:
        eos_margin: how far above the edge (1.0) the ratio must be (default 0.25).
        eos_sustain: consecutive readings above it needed (default 2).
    """

    def __init__(self, eos_margin: float = 0.25, eos_sustain: int = 2) -> None:
        if not eos_margin >= 0:
            raise ValueError(f"eos_margin must be >= 0, got {eos_margin!r}")
        if eos_sustain < 1:
            raise ValueError(f"eos_sustain must be >= 1, got {eos_sustain!r}")
        self.eos_margin = eos_margin
        self.eos_sustain = eos_sustain
        self.eos_streak = 0
        self.nonfinite_seen: dict[str, int] = {}

    def check(
        self, observations: Iterable[Observation], readings: Mapping[str, Any]
    ) -> list[RuleHit]:
        """The rules that fire given this step's observations and all raw readings
        (``*/nonfinite`` counts are read from the latter, whatever the signal table)."""
        hits: list[RuleHit] = []
        for key, reading in readings.items():
            if not key.endswith(_NONFINITE_SUFFIX):
                continue
            # a count is acted on once, when it is published, not while it is carried
            if self.nonfinite_seen.get(key) == int(reading.step):
                continue
            self.nonfinite_seen[key] = int(reading.step)
            value = float(reading.value)
            if value != 0:
                hits.append(RuleHit(Level.CRITICAL, key, f"{key} = {value:g}: non-finite values"))
        for obs in observations:
            if not math.isfinite(obs.raw) and obs.fresh:
                hits.append(RuleHit(Level.CRITICAL, obs.key, f"{obs.key} is {obs.raw}: non-finite"))
            elif obs.key == EOS_KEY and obs.fresh:
                self.eos_streak = self.eos_streak + 1 if obs.raw > 1 + self.eos_margin else 0
        eos = next((o for o in observations if o.key == EOS_KEY), None)
        if eos is not None and self.eos_streak >= self.eos_sustain:
            hits.append(
                RuleHit(
                    Level.WARNING,
                    EOS_KEY,
                    f"edge-of-stability ratio {eos.raw:.2f} above {1 + self.eos_margin:.2f} "
                    f"on {self.eos_streak} consecutive readings",
                )
            )
        return hits

    def state_dict(self) -> dict[str, Any]:
        return {"eos_streak": self.eos_streak, "nonfinite_seen": dict(self.nonfinite_seen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.eos_streak = int(state.get("eos_streak", 0))
        self.nonfinite_seen = {str(k): int(v) for k, v in state.get("nonfinite_seen", {}).items()}
