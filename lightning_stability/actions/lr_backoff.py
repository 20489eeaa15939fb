"""LRBackoff: cut the learning rate when the run is warned about, ramp back when calm."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_warn
from typing_extensions import override

from lightning_stability.actions.base import (
    StabilityAction,
    check_factor,
    check_nonnegative_int,
    check_positive_int,
    schedulers,
)
from lightning_stability.actions.lr_scaling import scale_learning_rates, schedulers_of
from lightning_stability.actions.optimizer_repair import DEFAULT_REPAIR, AdamRepair, RepairRung
from lightning_stability.warning.events import Level

__all__ = ["LRBackoff"]

LR_SCALE_KEY = "stability/action/lr_scale"


def _reference_lr(group: dict[str, Any]) -> float:
    """The learning rate a group's schedule is built around (its peak for OneCycleLR)."""
    for key in ("max_lr", "initial_lr", "lr"):
        if group.get(key) is not None:
            return float(group[key])
    return 0.0


class LRBackoff(StabilityAction):
    """Multiply every param group's learning rate by ``factor`` on an event at or above
    ``level``, keeping the cut through any learning-rate scheduler.

    :class:`~lightning_stability.warning.EarlyWarning` repeats a WARNING that its evidence
    still holds every ``repeat_every`` steps, so a run that stays unstable after a cut is
    cut again (bounded by ``max_backoffs`` and ``min_lr``); ``cooldown`` spaces the cuts
    when several events arrive close together.

    The ramp back follows TCP congestion control in spirit (multiplicative decrease,
    cautious increase; Chiu and Jain, 1989; Jacobson, 1988): it climbs towards a ceiling,
    1.0 at first. A critical event, or trouble that returns after a ramp raised the
    learning rate, shows that the level reached was too high, so the ceiling becomes the
    cut taken then and the next ramp stops there. After ``calm_steps`` further calm steps
    at the ceiling it is raised by ``1 / factor`` (never above 1.0) and the run ramps up
    to it, so a transient incident costs a slow, staged return rather than the rest of
    the run's learning rate, and a learning rate that is really too high is found again
    one step below where it failed. A rollback
    (:class:`Rollback`) restores this callback's state with the weights, but keeps the
    lower of the restored and the pre-rollback scale and ceiling: the weights go back,
    what the run learned about its learning rate does not.

    Args:
        level: lowest event level that triggers a backoff (``"watch"``, ``"warning"``,
            ``"critical"``). Default ``"warning"``.
        factor: multiplier per backoff, in (0, 1). Default 0.5.
        min_lr: floor: a cut never takes a group's reference learning rate (its
            schedule's peak: ``max_lr``, ``initial_lr`` or ``lr``) below this. Default 0.
        cooldown: steps after a backoff during which further events are ignored.
            Default 0.
        max_backoffs: most backoffs in the whole run (``None``: unbounded). Default 10.
        calm_steps: calm steps (the sources' level below ``level``: an event marks a
            change of level, so a level held high is not calm) before ramping back
            towards the ceiling, and between probes above it; ``None`` (default) never
            ramps back.
        recovery_steps: length in steps of the ramp back, which is geometric and never
            exceeds the ceiling (at most the original learning rate). Default 100.
        optimizer_repair: tried before a cut: on an event while an Adam-family param
            group has ``beta2 <= beta1**2`` (an unbounded update, which a cut does not
            bound), that group's ``beta2`` (and ``eps``, if asked) is moved to the
            :class:`~lightning_stability.actions.AdamRepair`'s safe values instead of
            cutting; kept through rollbacks and resumes. ``None`` disables it. Default
            ``AdamRepair()``.
        **deprecated: ``patience``, the previous name of ``calm_steps``, accepted with a
            ``DeprecationWarning``.

    Logs ``stability/action/lr_scale`` (current scale of the first param group, 1.0 =
    no cut) on the steps Lightning writes step metrics and records each backoff in :attr:`events`; :attr:`ceiling` holds
    the per-group ceilings of the ramp.
    """

    source_name = "lr_backoff"

    def __init__(
        self,
        level: str = "warning",
        factor: float = 0.5,
        min_lr: float = 0.0,
        cooldown: int = 0,
        max_backoffs: int | None = 10,
        calm_steps: int | None = None,
        recovery_steps: int = 100,
        optimizer_repair: AdamRepair | None = DEFAULT_REPAIR,
        **deprecated: Any,
    ) -> None:
        super().__init__(level)
        if "patience" in deprecated:
            calm_steps = deprecated.pop("patience")
            rank_zero_deprecation(
                "LRBackoff(patience=...) is deprecated and will be removed in the next "
                f"release: pass calm_steps={calm_steps!r}",
                stacklevel=6,
            )
        if deprecated:
            raise TypeError(
                f"LRBackoff() got an unexpected keyword argument {next(iter(deprecated))!r}"
            )
        self.repair = RepairRung(optimizer_repair)
        check_factor(factor, "factor")
        if (
            isinstance(min_lr, bool)
            or not isinstance(min_lr, (int, float))
            or not math.isfinite(min_lr)
            or min_lr < 0
        ):
            raise ValueError(f"min_lr must be a finite number >= 0, got {min_lr!r}")
        check_nonnegative_int(cooldown, "cooldown")
        check_nonnegative_int(max_backoffs, "max_backoffs", allow_none=True)
        check_positive_int(calm_steps, "calm_steps", allow_none=True)
        check_positive_int(recovery_steps, "recovery_steps")
        self.factor = float(factor)
        self.min_lr = float(min_lr)
        self.cooldown = cooldown
        self.max_backoffs = max_backoffs
        self.calm_steps = calm_steps
        self.recovery_steps = recovery_steps
        self.scales: list[list[float]] = []  # per optimizer, per param group
        self.ceiling: list[list[float]] = []
        self._raised = False  # a ramp raised the scales since the last cut
        self.backoffs = 0
        self._last_backoff_step = -(10**12)
        self._calm = 0
        self._ramp_from: list[list[float]] | None = None
        self._ramp_done = 0

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        shape = [len(o.param_groups) for o in trainer.optimizers]
        if [len(s) for s in self.scales] != shape:
            self.scales = [[1.0] * n for n in shape]
        if [len(s) for s in self.ceiling] != shape:
            self.ceiling = [[1.0] * n for n in shape]
        self.repair.reapply(trainer.optimizers)
        if not any(s for s in self.scales):
            rank_zero_warn(
                "LRBackoff: the module has no optimizer with parameters (configure_optimizers "
                "returned none), so there is no learning rate to back off; it does nothing"
            )

    def on_step_boundary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: Level | None
    ) -> None:
        step = int(trainer.global_step)
        if level is not None and level >= self.level:
            self._calm = 0
            if step - self._last_backoff_step > self.cooldown and not self.repair.answer(
                self, trainer, level, f"{level.name} event"
            ):
                self._backoff(trainer, level, f"{level.name} event")
        elif self.source_level >= self.level:
            self._calm = 0  # the level is still high, though no event says so again
        else:
            self._calm += 1
            if self.calm_steps is not None and self._calm >= self.calm_steps:
                self._recover(trainer)
        if self.scales and self.scales[0]:
            self.log_value(pl_module, LR_SCALE_KEY, self.scales[0][0])

    def escalate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> bool:
        self._calm = 0
        step = int(trainer.global_step)
        if step in (self._last_backoff_step, self.repair.step):
            return True  # this step's event was already answered: one answer per step
        return self.repair.answer(self, trainer, Level.CRITICAL, reason) or self._backoff(
            trainer, Level.CRITICAL, reason
        )

    # ------------------------------------------------------------- mechanics
    def _apply(self, trainer: pl.Trainer, new_scales: list[list[float]]) -> None:
        all_schedulers = schedulers(trainer)
        for opt, old, new in zip(trainer.optimizers, self.scales, new_scales):
            factors = [n / o if o > 0 else 1.0 for o, n in zip(old, new)]
            if any(f != 1.0 for f in factors):
                scale_learning_rates(opt, factors, schedulers_of(opt, all_schedulers))
        self.scales = [list(s) for s in new_scales]

    def _backoff(self, trainer: pl.Trainer, level: Level, reason: str) -> bool:
        if self.max_backoffs is not None and self.backoffs >= self.max_backoffs:
            return False
        new_scales = []
        for opt, scales in zip(trainer.optimizers, self.scales):
            row = []
            for group, s in zip(opt.param_groups, scales):
                original = _reference_lr(group) / s if s > 0 else 0.0
                floor = self.min_lr / original if original > 0 else 0.0
                row.append(min(s, max(s * self.factor, floor)))
            new_scales.append(row)
        if new_scales == self.scales:
            return False  # every group already sits at min_lr
        self._apply(trainer, new_scales)
        if self._raised or level >= Level.CRITICAL:
            self.ceiling = [
                [min(c, s) for c, s in zip(*rows)] for rows in zip(self.ceiling, new_scales)
            ]
            self._raised = False
        self.backoffs += 1
        self._last_backoff_step = int(trainer.global_step)
        self._ramp_from = None
        self._ramp_done = 0
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.record(
            trainer,
            level,
            f"learning rate backed off to {self.scales[0][0]:.4g}x ({reason}); lr now {lr:.4g}",
            signals=(LR_SCALE_KEY,),
            details={"lr_scale": self.scales[0][0], "lr": lr, "backoffs": float(self.backoffs)},
        )
        return True

    def _recover(self, trainer: pl.Trainer) -> None:
        pairs = [zip(s, c) for s, c in zip(self.scales, self.ceiling)]
        if all(s >= c for row in pairs for s, c in row):
            self._ramp_from = None
            if all(c >= 1.0 for row in self.ceiling for c in row):
                return
            # calm for `calm_steps` steps at the ceiling: probe one step (1/factor) higher
            self.ceiling = [[min(1.0, c / self.factor) for c in row] for row in self.ceiling]
        if self._ramp_from is None:
            self._ramp_from = [list(row) for row in self.scales]
            self._ramp_done = 0
        self._ramp_done = min(self._ramp_done + 1, self.recovery_steps)
        done = self._ramp_done / self.recovery_steps
        # Geometric: equal multiplicative steps from the cut up to the ceiling, never above.
        new_scales = [
            [max(s, min(c, s ** (1.0 - done) * c**done)) for s, c in zip(row, ceil)]
            for row, ceil in zip(self._ramp_from, self.ceiling)
        ]
        self._apply(trainer, new_scales)
        self._raised = True
        if self._ramp_done == self.recovery_steps:
            self._ramp_from = None
            self._calm = 0  # the next probe higher waits another `calm_steps` calm steps
            target = self.ceiling[0][0]
            self.record(
                trainer,
                Level.OK,
                "learning rate ramped back to its original value"
                if target >= 1.0
                else f"learning rate ramped back to its ceiling, {target:.4g}x",
            )

    def restored(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, before: dict[str, Any]
    ) -> None:
        lower = [
            [min(a, float(b)) for a, b in zip(*rows)] for rows in zip(self.scales, before["scales"])
        ]
        ceiling = before.get("ceiling") or self.ceiling
        self.ceiling = [
            [min(a, float(b)) for a, b in zip(*rows)] for rows in zip(self.ceiling, ceiling)
        ]
        self._apply(trainer, lower)
        self.backoffs = max(self.backoffs, int(before["backoffs"]))
        self._last_backoff_step = max(self._last_backoff_step, int(before["last_backoff_step"]))
        self._ramp_from = None
        self._ramp_done = 0
        self._raised = False
        self.repair.restored(trainer.optimizers, before.get("repair") or {})

    # ---------------------------------------------------------------- resume
    @property
    def patience(self) -> int | None:
        """Deprecated alias of :attr:`calm_steps`."""
        return self.calm_steps

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            level=self.level.name.lower(), factor=self.factor, min_lr=self.min_lr
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "scales": [list(row) for row in self.scales],
            "ceiling": [list(row) for row in self.ceiling],
            "raised": self._raised,
            "backoffs": self.backoffs,
            "last_backoff_step": self._last_backoff_step,
            "calm": self._calm,
            "source_level": int(self.source_level),
            "ramp_from": self._ramp_from,
            "ramp_done": self._ramp_done,
            "repair": self.repair.state_dict(),
            "events": self._events_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scales = [[float(s) for s in row] for row in state_dict["scales"]]
        ceiling = state_dict.get("ceiling")
        self.ceiling = (
            [[1.0] * len(r) for r in self.scales]
            if ceiling is None
            else [[float(c) for c in row] for row in ceiling]
        )
        self._raised = bool(state_dict.get("raised", False))
        self.backoffs = int(state_dict["backoffs"])
        self._last_backoff_step = int(state_dict["last_backoff_step"])
        self._calm = int(state_dict["calm"])
        self.source_level = Level(int(state_dict.get("source_level", Level.OK)))
        ramp = state_dict.get("ramp_from")
        self._ramp_from = None if ramp is None else [[float(s) for s in row] for row in ramp]
        self._ramp_done = int(state_dict.get("ramp_done", 0))
        self.repair.load_state_dict(state_dict.get("repair"))
        self._load_events(state_dict.get("events", []))
