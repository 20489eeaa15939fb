"""The rules that raise WARNING and CRITICAL: evidence, not surprise.

WARNING means the physics says the next steps are unsafe, or the loss is leaving its band:

* the edge of stability: under gradient descent with step size eta the quadratic model
  diverges along any direction whose curvature exceeds 2/eta (Cohen et al. 2021, "Gradient
  descent on neural networks typically occurs at the edge of stability"); the sharpness
  probe publishes this as ``eos_ratio`` (1.0 = the edge; Lanczos) and ``directional_ratio``
  (curvature along the gradient over the same edge). Training hovers near 1 at the edge of
  stability, so only a ratio sustained above ``1 + margin`` on consecutive fresh readings
  is a warning, each reading keeping its own streak;
* the edge moves with the learning rate: ``predicted_ratio`` is the latest measured ratio
  rescaled to the learning rate about to be used. A learning rate that jumped by at least
  ``lr_jump`` in one step and takes the predicted ratio above ``1 + margin`` warns at that
  step, before the loss has moved (a warm-up or a schedule moves the learning rate by a
  few percent a step, and the curvature follows it);
* the loss leaving its band (:class:`~lightning_stability.warning.loss_band.LossBand`),
  except while the latest measured ratio is at the edge (within ``eos_margin`` of 1): there
  a loss excursion is what gradient descent at the edge of stability does before it
  corrects itself (the catapult, Lewkowycz et al. 2020; self-stabilisation, Damian et al.
  2023), so it is WATCH until it turns into damage;
  one batch far outside it, a trailing median that stays above it, or, within
  ``jump_window`` steps of a learning-rate jump, one batch above it (the jump explains it).

CRITICAL means the run is being damaged: non-finite loss or gradients; a loss far above its
recent floor, or back at the level the run started from after it had learned, for several
steps without recovering; an edge ratio above ``eos_critical``
while the loss is above its band.

Soft statistics (robust z-scores, trends, the CUSUM) never reach these levels, and time
spent at a level never raises it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from lightning_stability.probes.edge import LR_JUMP
from lightning_stability.vocabulary import (
    LOSS_VALUE,
    SHARPNESS_DIRECTIONAL_RATIO,
    SHARPNESS_EOS_RATIO,
    SHARPNESS_LR_CHANGE,
    SHARPNESS_PREDICTED_RATIO,
)
from lightning_stability.warning.events import Level
from lightning_stability.warning.loss_band import BandEvidence
from lightning_stability.warning.metastate import Observation

__all__ = ["EOS_KEY", "EOS_KEYS", "LOSS_KEY", "PREDICTED_KEY", "HardRules", "RuleHit"]

EOS_KEY = SHARPNESS_EOS_RATIO
EOS_KEYS = (EOS_KEY, SHARPNESS_DIRECTIONAL_RATIO)
"""Measured readings on the edge-of-stability scale (1.0 = the edge) that the rule watches."""
PREDICTED_KEY = SHARPNESS_PREDICTED_RATIO
LR_CHANGE_KEY = SHARPNESS_LR_CHANGE
LOSS_KEY = LOSS_VALUE
_NONFINITE_SUFFIX = "/nonfinite"


class RuleHit(NamedTuple):
    """A rule that fired: its level, the reading that triggered it, and why."""

    level: Level
    signal: str
    message: str


class HardRules:
    """The WARNING and CRITICAL rules of the module docstring.

    Args:
        eos_margin: how far above the edge (1.0) a ratio must be (default 0.25).
        eos_sustain: consecutive fresh readings above it needed (default 3).
        eos_critical: a measured ratio above this while the loss is above its band is
            CRITICAL (default 2.0: the top direction's error grows threefold a step under
            gradient descent).
        lr_jump: one-step growth of the learning rate that counts as a jump (default 1.5).
        jump_window: steps after a jump during which one batch above the loss band is a
            warning (default 50).
    """

    def __init__(
        self,
        eos_margin: float = 0.25,
        eos_sustain: int = 3,
        eos_critical: float = 2.0,
        lr_jump: float = LR_JUMP,
        jump_window: int = 50,
    ) -> None:
        if not eos_margin >= 0:
            raise ValueError(f"eos_margin must be >= 0, got {eos_margin!r}")
        if eos_sustain < 1:
            raise ValueError(f"eos_sustain must be >= 1, got {eos_sustain!r}")
        if not eos_critical > 1 + eos_margin:
            raise ValueError(
                f"eos_critical must be > 1 + eos_margin = {1 + eos_margin:g}, got {eos_critical!r}"
            )
        if not lr_jump > 1:
            raise ValueError(f"lr_jump must be > 1, got {lr_jump!r}")
        self.eos_margin = eos_margin
        self.eos_sustain = eos_sustain
        self.eos_critical = eos_critical
        self.lr_jump = lr_jump
        self.jump_window = jump_window
        self.last_jump = -(10**12)
        self.edge_ratio = math.nan
        self.eos_streaks: dict[str, int] = {}
        self.nonfinite_seen: dict[str, int] = {}
        self.jump_seen = -1

    def check(
        self,
        observations: Iterable[Observation],
        readings: Mapping[str, Any],
        band: BandEvidence | None = None,
    ) -> list[RuleHit]:
        """The rules that fire given this step's observations, all raw readings
        (``*/nonfinite`` counts and the predicted ratio are read from the latter, whatever
        the signal table) and the loss band's evidence."""
        band = band or BandEvidence()
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
        observations = list(observations)
        for obs in observations:
            if not math.isfinite(obs.raw) and obs.fresh:
                hits.append(RuleHit(Level.CRITICAL, obs.key, f"{obs.key} is {obs.raw}: non-finite"))
            elif obs.key in EOS_KEYS and obs.fresh:
                self.edge_ratio = obs.raw
                above = obs.raw > 1 + self.eos_margin
                self.eos_streaks[obs.key] = self.eos_streaks.get(obs.key, 0) + 1 if above else 0
        if band.damage:
            what = (
                "back at the level the run started from, after it had learned"
                if band.forgotten
                else f"{band.ratio:.1f}x its recent floor and {band.excess:.0f} band widths "
                "above its band"
            )
            hits.append(RuleHit(Level.CRITICAL, LOSS_KEY, f"loss {what}, not recovering"))
        for obs in observations:
            if obs.key in EOS_KEYS and band.outside and obs.raw > self.eos_critical:
                hits.append(
                    RuleHit(
                        Level.CRITICAL,
                        obs.key,
                        f"edge-of-stability ratio {obs.raw:.2f} above {self.eos_critical:g} "
                        "while the loss is above its band",
                    )
                )
                break
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
        hit = self._jump(readings)
        if hit is not None:
            hits.append(hit)
        if band.shock:
            hits.append(
                RuleHit(
                    Level.WARNING,
                    LOSS_KEY,
                    f"batch loss far outside its band ({band.excess:.0f} band widths above it)",
                )
            )
        elif band.single and self.jump_seen - self.last_jump <= self.jump_window:
            hits.append(
                RuleHit(
                    Level.WARNING,
                    LOSS_KEY,
                    f"batch loss above its band {self.jump_seen - self.last_jump} steps after "
                    "a learning-rate jump",
                )
            )
        elif band.leaving and self._at_edge():
            hits.append(
                RuleHit(
                    Level.WATCH,
                    LOSS_KEY,
                    f"loss above its band ({band.ratio:.2f}x the floor) with the edge-of-stability "
                    f"ratio at {self.edge_ratio:.2f}: an excursion at the edge, which gradient "
                    "descent usually corrects by itself (self-stabilisation)",
                )
            )
        elif band.leaving:
            hits.append(
                RuleHit(
                    Level.WARNING,
                    LOSS_KEY,
                    f"loss leaving its band: trailing median {band.ratio:.2f}x the floor, "
                    f"{band.excess:.1f} band widths above it",
                )
            )
        return hits

    def _at_edge(self) -> bool:
        """The latest measured ratio is at the edge, within ``eos_margin`` of 1."""
        return abs(self.edge_ratio - 1.0) <= self.eos_margin

    def _jump(self, readings: Mapping[str, Any]) -> RuleHit | None:
        predicted = readings.get(PREDICTED_KEY)
        change = readings.get(LR_CHANGE_KEY)
        if predicted is None or change is None or int(change.step) == self.jump_seen:
            return None
        if int(change.step) != int(predicted.step):
            return None
        self.jump_seen = int(change.step)
        ratio, factor = float(predicted.value), float(change.value)
        if factor >= self.lr_jump:
            self.last_jump = self.jump_seen
        if factor >= self.lr_jump and ratio > 1 + self.eos_margin:
            return RuleHit(
                Level.WARNING,
                PREDICTED_KEY,
                f"learning rate x{factor:.3g} in one step: predicted edge-of-stability ratio "
                f"{ratio:.2f} above {1 + self.eos_margin:.2f}",
            )
        return None

    @property
    def eos_streak(self) -> int:
        """The longest current streak above the edge among the watched readings."""
        return max(self.eos_streaks.values(), default=0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "eos_streaks": dict(self.eos_streaks),
            "nonfinite_seen": dict(self.nonfinite_seen),
            "jump_seen": self.jump_seen,
            "last_jump": self.last_jump,
            "edge_ratio": self.edge_ratio,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        streaks = state.get("eos_streaks", {EOS_KEY: state.get("eos_streak", 0)})
        self.eos_streaks = {str(k): int(v) for k, v in streaks.items()}
        self.nonfinite_seen = {str(k): int(v) for k, v in state.get("nonfinite_seen", {}).items()}
        self.jump_seen = int(state.get("jump_seen", -1))
        self.last_jump = int(state.get("last_jump", -(10**12)))
        self.edge_ratio = float(state.get("edge_ratio", math.nan))
