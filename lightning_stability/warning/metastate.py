"""Which readings feed the meta-state, on what scale, and which way is "worse".

The meta-state groups the probes' readings along the four dimensions of training
stability (Zhang et al. 2026, "Training instability in deep learning follows
low-dimensional dynamical principles"): optimisation, learning signal, parametric and
data/environment. Each reading is mapped onto a scale where a robust baseline is
meaningful (log for positive quantities, so that deviations are relative) and oriented
so that larger means less stable; only upward deviations count.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from lightning_stability.vocabulary import (
    ACTIVATION_DEAD_FRACTION,
    CKA_MIN,
    DIMENSIONS,
    GRAD_CLIP_RATE,
    GRAD_NORM,
    GRAD_UPDATE_RATIO,
    LOSS_SPREAD,
    LOSS_TAIL_MAX,
    LOSS_TAIL_Q,
    LOSS_VALUE,
    SHARPNESS_DIRECTIONAL_RATIO,
    SHARPNESS_EOS_RATIO,
    SHARPNESS_SHIFT,
)

__all__ = [
    "DEFAULT_SIGNALS",
    "DIMENSIONS",
    "MetaState",
    "Observation",
    "SignalSpec",
    "transform",
]

Dimension = Literal["optimization", "learning_signal", "parametric", "data"]
Transform = Literal["log", "identity", "log1m"]

TRANSFORMS: tuple[str, ...] = ("log", "identity", "log1m")

# Smallest value the log transforms see: keeps an exact zero finite without letting it
# dominate the baseline's spread.
_LOG_FLOOR = 1e-8


@dataclass(frozen=True)
class SignalSpec:
    """How one reading (or a family of readings) enters the meta-state.

    Args:
        pattern: a reading key or a shell-style pattern (``"stability/act/*/dead_fraction"``).
        dimension: one of ``"optimization"``, ``"learning_signal"``, ``"parametric"``, ``"data"``.
        transform: ``"log"`` for positive quantities (deviation in relative terms),
            ``"identity"`` for bounded or signed ones, ``"log1m"`` (``log(1 - x)``) for
            similarities near 1 such as CKA, whose fall is what matters.
        direction: ``+1`` when a rise (on the transformed scale) is bad, ``-1`` when a fall is.
        min_scale: floor of the baseline's spread on the transformed scale, so that an
            almost constant reading does not turn tiny changes into large scores.
        trend: also watch this reading with the critical-slowing-down indicators (rising
            variance and lag-1 autocorrelation). Best for readings taken every step.
    """

    pattern: str
    dimension: str
    transform: str = "log"
    direction: int = 1
    min_scale: float = 0.02
    trend: bool = False

    def __post_init__(self) -> None:
        if self.dimension not in DIMENSIONS:
            raise ValueError(
                f"dimension must be one of {DIMENSIONS}, got {self.dimension!r} "
                f"(signal {self.pattern!r})"
            )
        if self.transform not in TRANSFORMS:
            raise ValueError(
                f"transform must be one of {TRANSFORMS}, got {self.transform!r} "
                f"(signal {self.pattern!r})"
            )
        if self.direction not in (1, -1):
            raise ValueError(f"direction must be 1 or -1, got {self.direction!r}")
        if not self.min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {self.min_scale!r}")

    def matches(self, key: str) -> bool:
        return key == self.pattern or fnmatch.fnmatchcase(key, self.pattern)


DEFAULT_SIGNALS: tuple[SignalSpec, ...] = (
    # optimisation: how close the step is to the edge of stability, and how big it is
    SignalSpec(SHARPNESS_EOS_RATIO, "optimization", "log", min_scale=0.05),
    SignalSpec(SHARPNESS_DIRECTIONAL_RATIO, "optimization", "identity", min_scale=0.1),
    SignalSpec(SHARPNESS_SHIFT, "optimization", "identity", min_scale=0.1),
    SignalSpec(GRAD_UPDATE_RATIO, "optimization", "log", min_scale=0.05),
    SignalSpec(GRAD_NORM, "optimization", "log", min_scale=0.05, trend=True),
    # learning signal: loss level and trend, how often the gradient is clipped
    # identity, not log: a minibatch loss near zero has a large relative spread, in
    # which a spike to many times the typical loss would hide
    SignalSpec(LOSS_VALUE, "learning_signal", "identity", min_scale=1e-4, trend=True),
    SignalSpec(GRAD_CLIP_RATE, "learning_signal", "identity", min_scale=0.05),
    # parametric: representations drifting away, units dying. The weight norm is left out:
    # it grows on healthy runs, and its rate of change is the update ratio above
    SignalSpec(CKA_MIN, "parametric", "log1m", min_scale=0.1),
    SignalSpec(ACTIVATION_DEAD_FRACTION, "parametric", "identity", min_scale=0.02),
    # data / environment: the tail of the batch losses
    SignalSpec(LOSS_TAIL_Q, "data", "log", min_scale=0.05),
    SignalSpec(LOSS_TAIL_MAX, "data", "log", min_scale=0.05),
    SignalSpec(LOSS_SPREAD, "data", "log", min_scale=0.05),
)
"""The readings of the probe contract that enter the meta-state by default."""


def transform(value: float, kind: str) -> float:
    """``value`` on the scale named by ``kind`` (see :class:`SignalSpec`)."""
    if kind == "log":
        return math.log(max(value, _LOG_FLOOR))
    if kind == "log1m":
        return math.log(max(1.0 - value, _LOG_FLOOR))
    return value


class Observation(NamedTuple):
    """One reading as the meta-state sees it at an optimizer step.

    ``value`` is transformed and oriented (larger = worse); ``raw`` is the published
    value; ``age`` is how many optimizer steps old it is; ``fresh`` is True the first
    time this reading is seen (baselines and indicators learn only from fresh readings).
    """

    key: str
    dimension: str
    value: float
    raw: float
    age: int
    fresh: bool
    spec: SignalSpec


class MetaState:
    """Carries the latest value of every consumed reading with its age.

    Args:
        signals: the readings to consume (default :data:`DEFAULT_SIGNALS`); the first
            spec matching a key wins.
        max_age: a reading older than this many optimizer steps is stale and its
            signal is left out until a new one arrives.
    """

    def __init__(self, signals: Iterable[SignalSpec] | None = None, max_age: int = 250) -> None:
        if max_age < 1:
            raise ValueError(f"max_age must be a positive number of steps, got {max_age!r}")
        self.signals = tuple(DEFAULT_SIGNALS if signals is None else signals)
        self.max_age = max_age
        self._spec_of: dict[str, SignalSpec | None] = {}
        self.last_seen: dict[str, int] = {}

    def spec_for(self, key: str) -> SignalSpec | None:
        if key not in self._spec_of:
            self._spec_of[key] = next((s for s in self.signals if s.matches(key)), None)
        return self._spec_of[key]

    def observe(self, readings: Mapping[str, Any], step: int) -> list[Observation]:
        """The consumed, non-stale readings at ``step``.

        ``readings`` maps keys to objects with ``value`` and ``step`` (a probe's
        :class:`~lightning_stability.probes.base.Reading`). Non-finite values are
        passed through untransformed, for the hard rules to see.
        """
        out: list[Observation] = []
        for key, reading in readings.items():
            spec = self.spec_for(key)
            if spec is None:
                continue
            seen = int(reading.step)
            age = step - seen
            if age > self.max_age:
                continue
            fresh = self.last_seen.get(key) != seen
            self.last_seen[key] = seen
            raw = float(reading.value)
            value = spec.direction * transform(raw, spec.transform) if math.isfinite(raw) else raw
            out.append(Observation(key, spec.dimension, value, raw, age, fresh, spec))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"last_seen": dict(self.last_seen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_seen = {str(k): int(v) for k, v in state.get("last_seen", {}).items()}
