"""Turning a noisy per-step assessment into a level that does not flicker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_stability.warning.events import Level

__all__ = ["LevelTracker"]

_NEVER = -(10**12)


class LevelTracker:
    """Hysteresis for the run's level.

    Each optimizer step supplies three levels: ``proposed`` (what the evidence says,
    judged with the enter thresholds), ``hold`` (judged with the lower exit thresholds)
    and whether a hard rule demands CRITICAL.

    - Up: the level rises once ``proposed`` has exceeded it on ``patience`` consecutive
      steps, to the lowest level proposed during that streak. A rule (evidence rather
      than a statistic) raises its level at once; a hard rule raises CRITICAL at once.
    - Down: the level falls to ``hold`` once it has been held ``min_dwell`` steps.
    - Cooldown: a level that was left is not re-entered by score for ``cooldown`` steps,
      and CRITICAL from a hard rule that keeps firing is repeated at most every
      ``cooldown`` steps.
    - Repeat: while the level is WARNING, the evidence still holds it (``hold`` at
      WARNING or above) and it is stronger than when WARNING was last issued (``worse``),
      WARNING is issued again every ``repeat_every`` steps, so that actions which respond
      to events (a learning-rate backoff) act again on a run that is still getting worse
      after their first response, and not on one that is recovering from it. CRITICAL is
      not repeated this way: it triggers rollbacks, which return to the same snapshot
      each time; a hard rule that keeps firing repeats it after ``cooldown``.
    Time spent at a level never raises it: CRITICAL comes only from evidence of damage
    (a hard rule), never from a WARNING that persists.

    Args:
        patience: consecutive steps of evidence before rising (default 2).
        min_dwell: minimum steps at a level before falling (default 10).
        cooldown: steps (default 50), see above.
        repeat_every: steps between repeats of a persisting WARNING (default 25; ``None``:
            never repeat).
    """

    def __init__(
        self,
        patience: int = 2,
        min_dwell: int = 10,
        cooldown: int = 50,
        repeat_every: int | None = 25,
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience!r}")
        if min_dwell < 0:
            raise ValueError(f"min_dwell must be >= 0, got {min_dwell!r}")
        if cooldown < 0:
            raise ValueError(f"cooldown must be >= 0, got {cooldown!r}")
        if repeat_every is not None and repeat_every < 1:
            raise ValueError(f"repeat_every must be >= 1 or None, got {repeat_every!r}")
        self.repeat_every = repeat_every
        self.patience = patience
        self.min_dwell = min_dwell
        self.cooldown = cooldown
        self.level = Level.OK
        self.since = 0
        self.streak = 0
        self.streak_min = Level.CRITICAL
        self.left_at: dict[int, int] = {}
        self.last_hard = _NEVER
        self.last_issued = _NEVER

    def update(
        self,
        step: int,
        proposed: Level,
        hold: Level,
        hard: bool = False,
        ruled: Level = Level.OK,
        worse: bool = True,
    ) -> Level | None:
        """Advance to ``step``; the new level when an event is due, else None. ``ruled`` is
        a level that a rule demands now: it is entered at once, without ``patience``.
        ``worse`` says whether the evidence is stronger than when the level was last issued;
        a WARNING is repeated only then."""
        if ruled > self.level and not hard:
            self._move(ruled, step)
            self.last_issued = step
            return self.level
        if hard:
            self.streak = 0
            if self.level < Level.CRITICAL or step - self.last_hard >= self.cooldown:
                self.last_hard = step
                self._move(Level.CRITICAL, step)
                self.last_issued = step
                return Level.CRITICAL
            return None
        if proposed > self.level:
            self.streak_min = proposed if self.streak == 0 else min(self.streak_min, proposed)
            self.streak += 1
            if self.streak >= self.patience:
                target = self.streak_min
                while target > self.level and step - self.left_at.get(target, _NEVER) < (
                    self.cooldown
                ):
                    target = Level(target - 1)
                if target > self.level:
                    self._move(target, step)
                    self.last_issued = step
                    return target
            return self._repeat(step, hold, worse)
        self.streak = 0
        if hold < self.level and step - self.since >= self.min_dwell:
            self._move(hold, step)
            self.last_issued = step
            return hold
        return self._repeat(step, hold, worse)

    def reset(self, step: int) -> None:
        """Back to OK at ``step`` with every level free to be entered again at once (the
        run returned to an earlier, good state; what follows is new evidence)."""
        self.level = Level.OK
        self.since = step
        self.streak = 0
        self.left_at = {}
        self.last_hard = _NEVER

    def _repeat(self, step: int, hold: Level, worse: bool = True) -> Level | None:
        if (
            worse
            and self.repeat_every is not None
            and self.level == Level.WARNING
            and hold >= self.level
            and step - self.last_issued >= self.repeat_every
        ):
            self.last_issued = step
            return self.level
        return None

    def _move(self, level: Level, step: int) -> None:
        for left in range(level + 1, self.level + 1):
            self.left_at[left] = step
        self.level = Level(level)
        self.since = step
        self.streak = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": int(self.level),
            "since": self.since,
            "streak": self.streak,
            "streak_min": int(self.streak_min),
            "left_at": {str(k): v for k, v in self.left_at.items()},
            "last_hard": self.last_hard,
            "last_issued": self.last_issued,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.level = Level(int(state["level"]))
        self.since = int(state["since"])
        self.streak = int(state["streak"])
        self.streak_min = Level(int(state["streak_min"]))
        self.left_at = {int(k): int(v) for k, v in state["left_at"].items()}
        self.last_hard = int(state["last_hard"])
        self.last_issued = int(state.get("last_issued", self.since))
