"""Hard rules that need no baseline: non-finite values, and a step past the edge of
stability.

Under gradient descent with step size eta, the quadratic model diverges along any
direction whose curvature exceeds 2/eta (Cohen et al. 2021, "Gradient descent on neural
networks typically occurs at the edge of stability"); the sharpness probe publishes this
as ``eos_ratio`` (1.0 = the edge; Lanczos, sparse) and, cheaper and more often, as
``directional_ratio`` (curvature along the gradient over the same edge). Training hovers
near 1 at the edge of stability, so only a ratio sustained above ``1 + margin`` is a
warning; each reading keeps its own streak, so the dense one need not wait for the sparse
one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from lightning_stability.warning.events import Level
from lightning_stability.warning.metastate import Observation

__all__ = ["EOS_KEY", "EOS_KEYS", "HardRules", "RuleHit"]

EOS_KEY = "stability/sharpness/eos_ratio"
EOS_KEYS = (EOS_KEY, "stability/sharpness/directional_ratio")
"""Readings on the edge-of-stability scale (1.0 = the edge) that the rule watches."""
_NONFINITE_SUFFIX = "/nonfinite"


class RuleHit(NamedTuple):
    """A rule that fired: its level, the reading that triggered it, and why."""

    level: Level
    signal: str
    message: str


class HardRules:
    """Non-finite loss or gradients -> CRITICAL at once; ``eos_ratio`` or
    ``directional_ratio`` above ``1 + margin`` on ``sustain`` consecutive readings of that
    key -> WARNING.

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
        self.eos_streaks: dict[str, int] = {}
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
            elif obs.key in EOS_KEYS and obs.fresh:
                above = obs.raw > 1 + self.eos_margin
                self.eos_streaks[obs.key] = self.eos_streaks.get(obs.key, 0) + 1 if above else 0
        for obs in observations:
            streak = self.eos_streaks.get(obs.key, 0)
            if obs.key in EOS_KEYS and streak >= self.eos_sustain:
                name = "ratio" if obs.key == EOS_KEY else "directional ratio"
                hits.append(
                    RuleHit(
                        Level.WARNING,
                        obs.key,
                        f"edge-of-stability {name} {obs.raw:.2f} above "
                        f"{1 + self.eos_margin:.2f} on {streak} consecutive readings",
                    )
                )
                break
        return hits

    @property
    def eos_streak(self) -> int:
        """The longest current streak above the edge among the watched readings."""
        return max(self.eos_streaks.values(), default=0)

    def state_dict(self) -> dict[str, Any]:
        return {"eos_streaks": dict(self.eos_streaks), "nonfinite_seen": dict(self.nonfinite_seen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        streaks = state.get("eos_streaks", {EOS_KEY: state.get("eos_streak", 0)})
        self.eos_streaks = {str(k): int(v) for k, v in streaks.items()}
        self.nonfinite_seen = {str(k): int(v) for k, v in state.get("nonfinite_seen", {}).items()}
