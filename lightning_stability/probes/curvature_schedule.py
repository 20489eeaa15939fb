"""When :class:`~lightning_stability.probes.sharpness.SharpnessMonitor` measures: the steps
of the next Lanczos check and of the next directional reading, the adaptive cadence that
tightens them while the run is near the edge or on closer watch, and the extra reading
that follows a move of the learning rate."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning.pytorch as pl

from lightning_stability.probes.config import SharpnessCadence
from lightning_stability.probes.edge import LR_JUMP

__all__ = ["CurvatureSchedule", "closer_watch_requested"]

RECHECK_GAP = 10
"""Fewest optimizer steps between two extra readings asked for by the learning rate."""


def closer_watch_requested(trainer: pl.Trainer) -> bool:
    """Whether a callback of ``trainer`` (one with a ``request_closer_watch`` flag, such as
    the early warning at its watch level) asks for closer measurement; under DDP, whether
    any rank's does, so every rank keeps the same cadence."""
    watchers = [cb for cb in trainer.callbacks if hasattr(cb, "request_closer_watch")]
    if not watchers:
        return False
    flag = any(bool(getattr(cb, "request_closer_watch", False)) for cb in watchers)
    if trainer.world_size > 1:
        flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
    return flag


class CurvatureSchedule:
    """The steps (``trainer.global_step``) at which the next Lanczos check and the next
    directional reading are due, and how they move.

    After each check the next one is ``interval`` steps on; ``interval`` is
    ``every_n_steps``, or ``every_n_steps // adaptive_factor`` (at least 1) while the last
    ratio was above ``ratio_threshold`` or closer watch is asked for (``adaptive``). The
    directional readings follow the same rule with ``directional_every_n_steps`` (at most
    ``every_n_steps``). A one-step jump of the learning rate by ``recheck_jump`` or more,
    or a stale prediction of the edge, moves the next reading to the coming step, at most
    once every ``recheck_gap`` steps.

    Args:
        cadence: the intervals and the adaptive rule
            (:class:`~lightning_stability.probes.config.SharpnessCadence`).
    """

    def __init__(self, cadence: SharpnessCadence) -> None:
        every_n_steps = cadence.every_n_steps
        self.every_n_steps = every_n_steps
        self.directional_every_n_steps = min(
            cadence.directional_every_n_steps or every_n_steps, every_n_steps
        )
        self.adaptive = cadence.adaptive
        self.ratio_threshold = cadence.ratio_threshold
        self.adaptive_factor = cadence.adaptive_factor
        self.recheck_jump = LR_JUMP
        self.recheck_gap = RECHECK_GAP
        self.interval = every_n_steps
        self.directional_interval = self.directional_every_n_steps
        self.next_check = every_n_steps
        self.next_directional = self.directional_every_n_steps
        self.recheck_after = -1

    def due(self, step: int) -> tuple[bool, bool]:
        """Whether a Lanczos check and whether a directional reading are due at ``step``."""
        return step >= self.next_check, step >= self.next_directional

    def tighten(self, step: int) -> None:
        """Shorten both intervals by ``adaptive_factor`` and bring the next readings within
        them."""
        self.interval = max(1, self.every_n_steps // self.adaptive_factor)
        self.directional_interval = max(1, self.directional_every_n_steps // self.adaptive_factor)
        self.next_check = min(self.next_check, step + self.interval)
        self.next_directional = min(self.next_directional, step + self.directional_interval)

    def measured(
        self,
        step: int,
        check: bool,
        directional: bool,
        ratio: float | None,
        watch_requested: Callable[[], bool],
    ) -> None:
        """Schedule the next readings after those taken at ``step``: a check with a ratio
        above ``ratio_threshold`` tightens the cadence, one without relaxes it unless
        ``watch_requested()`` (asked only then)."""
        if check and self.adaptive:
            if ratio is not None and ratio > self.ratio_threshold:
                self.tighten(step)
            elif not watch_requested():
                self.interval = self.every_n_steps
                self.directional_interval = self.directional_every_n_steps
        if check:
            self.next_check = step + self.interval
        if directional:
            self.next_directional = step + self.directional_interval

    def edge_moved(self, step: int, change: float, stale: Callable[[], bool]) -> bool:
        """Whether the learning rate moved the edge enough at ``step`` to need a reading:
        a one-step change by ``recheck_jump`` or more, or (at most every ``recheck_gap``
        steps) a prediction that ``stale()`` says is out of date."""
        jumped = math.isfinite(change) and change >= self.recheck_jump
        drifted = step >= self.recheck_after and stale()
        return jumped or drifted

    def recheck(self, step: int, directional: bool) -> None:
        """Bring the next directional reading (or, without directional readings, the next
        check) to the step after ``step``."""
        self.recheck_after = step + self.recheck_gap
        if directional:
            self.next_directional = min(self.next_directional, step + 1)
        else:
            self.next_check = min(self.next_check, step + 1)
