"""LRBackoff: cut the learning rate when the run is warned about, ramp back when calm."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
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
from lightning_stability.probes.base import step_loss
from lightning_stability.probes.edge import LR_JUMP
from lightning_stability.vocabulary import ACTION_LR_SCALE
from lightning_stability.warning.events import Level

__all__ = ["LRBackoff"]

LR_SCALE_KEY = ACTION_LR_SCALE
LOSS_WINDOW = 20
"""Training steps whose median loss stands for the loss at a cut."""


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
    one step below where it failed. Each probe that trouble follows doubles the calm
    wait before the next one (``calm_steps * 2**failed_probes``, as TCP backs off its
    retransmission timer, Karn and Partridge, 1987), so a rate that keeps failing is tried
    a logarithmic number of times in a long run, not every few hundred steps; a probe
    that holds resets the count.

    Trouble that follows a rise of the learning rate is put down to that rise: when the
    rate a group's schedule sets (before this callback's cut) is more than ``LR_JUMP``
    (1.5x) the lowest it set in the last ``lr_memory`` steps (a schedule's jump, a warm-up
    overshooting, a ramp), the cut goes back to that lowest rate, where the run was calm,
    if that is lower than one ``factor`` (but not below ``factor**4`` in one cut, so a
    warm-up that starts near zero is not sent back there), and the rate is held there
    however the schedule
    moves: returning to the rate that caused the trouble would only repeat it. Later
    probes above it follow the ceiling rule, raising the held rate by ``1 / factor`` each,
    ``calm_steps`` calm steps apart also when a rising schedule meets the held rate before
    the ramp's ``recovery_steps`` are over. The hold is dropped once the schedule is below
    it and not rising (a decay has passed it), not while a schedule climbs towards it (a
    warm-up that a rollback restarted).
    A :class:`Rollback` in the Trainer also takes the weights back to before the rise.

    Cuts that do not work are not repeated: a step size that is too large shows in the
    loss within a few steps of a cut (the unstable directions stop growing), so when the
    median training loss of the last 20 steps is no lower than it was
    ``ineffective_cuts`` WARNING cuts ago, the learning rate is not what drives the loss
    (the data moves, labels are noisy) and further WARNING events are recorded without a
    cut until the run has been calm for ``calm_steps`` steps (or 100). Critical events
    still cut. A rollback
    (:class:`Rollback`) restores this callback's state with the weights, but keeps the
    lower of the restored and the pre-rollback scale and ceiling: the weights go back,
    what the run learned about its learning rate does not, unless the rollback later finds
    the data at fault (the restored weights, frozen, meet damage on the skipped batches):
    then the scale, ceiling and caps return to those saved with the restored weights.

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
            towards the ceiling, and between probes above it (doubled after each probe
            that trouble followed); ``None`` (default) never ramps back.
        recovery_steps: length in steps of the ramp back, which is geometric and never
            exceeds the ceiling (at most the original learning rate). Default 100.
        optimizer_repair: tried before a cut: on an event while an Adam-family param
            group has ``beta2 <= beta1**2`` (an unbounded update, which a cut does not
            bound), that group's ``beta2`` (and ``eps``, if asked) is moved to the
            :class:`~lightning_stability.actions.AdamRepair`'s safe values instead of
            cutting; kept through rollbacks and resumes. ``None`` disables it. Default
            ``AdamRepair()``.
        lr_memory: steps of applied learning rates remembered to tell trouble that
            follows a rise of the rate (see above); ``None`` disables it. Default 50.
        ineffective_cuts: WARNING cuts in a row that left the loss where it was, after
            which WARNING events no longer cut (see above); ``None`` disables it.
            Default 2.
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
        lr_memory: int | None = 50,
        ineffective_cuts: int | None = 2,
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
        check_positive_int(lr_memory, "lr_memory", allow_none=True)
        check_positive_int(ineffective_cuts, "ineffective_cuts", allow_none=True)
        self.factor = float(factor)
        self.min_lr = float(min_lr)
        self.cooldown = cooldown
        self.max_backoffs = max_backoffs
        self.calm_steps = calm_steps
        self.recovery_steps = recovery_steps
        self.lr_memory = lr_memory
        self.ineffective_cuts = ineffective_cuts
        self._losses: deque[torch.Tensor] = deque(maxlen=LOSS_WINDOW)
        # median training loss at each WARNING cut since the run was last calm
        self._cut_losses: list[float] = []
        self._declined = False  # a WARNING was left uncut since the last calm stretch
        # scheduled learning rate of every group (flattened over optimizers), latest last
        self._recent_lrs: deque[list[float]] = deque(maxlen=lr_memory or 1)
        self.scales: list[list[float]] = []  # per optimizer, per param group
        self.ceiling: list[list[float]] = []
        # absolute learning rate each group is held at after trouble that followed a rise
        # of its rate (inf: not held), so a schedule still rising cannot undo the cut
        self.caps: list[list[float]] = []
        self._raised = False  # a ramp raised the scales since the last cut
        self.failed_probes = 0  # ramps in a row that trouble followed
        self.backoffs = 0
        self.rise_step = -1  # step of the latest cut that answered a rise of the rate
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
        if [len(s) for s in self.caps] != shape:
            self.caps = [[math.inf] * n for n in shape]
        self.repair.reapply(trainer.optimizers)
        if not any(s for s in self.scales):
            rank_zero_warn(
                "LRBackoff: the module has no optimizer with parameters (configure_optimizers "
                "returned none), so there is no learning rate to back off; it does nothing"
            )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.ineffective_cuts is not None:
            loss = step_loss(trainer, pl_module, outputs)
            if loss is not None:
                self._losses.append(loss)  # kept on the device: read only at a cut
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_step_boundary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: Level | None
    ) -> None:
        step = int(trainer.global_step)
        if self.lr_memory is not None:
            self._recent_lrs.append(self._schedule_rates(trainer))
        if any(c < math.inf for row in self.caps for c in row):
            self._apply(trainer, self.scales)  # hold the capped rates as the schedule moves
        if level is not None and level >= self.level:
            self._calm = 0
            if step - self._last_backoff_step > self.cooldown and not self.repair.answer(
                self, trainer, level, f"{level.name} event"
            ):
                self._cut_unless_ineffective(trainer, level)
        elif self.source_level >= self.level:
            self._calm = 0  # the level is still high, though no event says so again
        else:
            self._calm += 1
            if self._calm >= (self.calm_steps or 100):
                self._cut_losses, self._declined = [], False
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
    def _recent_loss(self, trainer: pl.Trainer) -> float:
        """Median training loss of the last steps, averaged over ranks (every rank
        decides at the same step boundary, so every rank joins the reduction)."""
        local = torch.stack(list(self._losses)).median() if self._losses else torch.tensor(0.0)
        return float(trainer.strategy.reduce(local.float(), reduce_op="mean"))

    def _cut_unless_ineffective(self, trainer: pl.Trainer, level: Level) -> None:
        if self.ineffective_cuts is None or level >= Level.CRITICAL:
            self._backoff(trainer, level, f"{level.name} event")
            return
        loss = self._recent_loss(trainer)
        n = self.ineffective_cuts
        if len(self._cut_losses) >= n and not loss < self._cut_losses[-n]:
            if not self._declined:
                self._declined = True
                self.record(
                    trainer,
                    level,
                    f"learning rate not cut further ({level.name} event): the last {n} cuts "
                    f"left the loss where it was (median {self._cut_losses[-n]:.4g} then, "
                    f"{loss:.4g} now), so the learning rate is not what drives it",
                    signals=(LR_SCALE_KEY,),
                    details={"lr_scale": self.scales[0][0] if self.scales else 1.0},
                )
            return
        if self._backoff(trainer, level, f"{level.name} event"):
            self._cut_losses.append(loss)

    def _apply(self, trainer: pl.Trainer, new_scales: list[list[float]]) -> None:
        """Move every group to its new scale, never above its cap."""
        all_schedulers = schedulers(trainer)
        new_scales = [
            [self._capped(g, o, n, c) for g, o, n, c in zip(opt.param_groups, *rows)]
            for opt, *rows in zip(trainer.optimizers, self.scales, new_scales, self.caps)
        ]
        for opt, old, new in zip(trainer.optimizers, self.scales, new_scales):
            factors = [n / o if o > 0 else 1.0 for o, n in zip(old, new)]
            if any(f != 1.0 for f in factors):
                scale_learning_rates(opt, factors, schedulers_of(opt, all_schedulers))
        self.scales = [list(s) for s in new_scales]

    @staticmethod
    def _capped(group: dict[str, Any], old: float, new: float, cap: float) -> float:
        """``new`` lowered so that the group's rate, ``lr * new / old``, stays within ``cap``."""
        lr = float(group["lr"])
        if old <= 0 or lr <= 0 or lr * new / old <= cap:
            return new
        return old * cap / lr

    def _backoff(self, trainer: pl.Trainer, level: Level, reason: str) -> bool:
        if self.max_backoffs is not None and self.backoffs >= self.max_backoffs:
            return False
        new_scales = []
        calm = self._calm_rates()
        after_rise = False
        index = 0
        for opt, scales, caps in zip(trainer.optimizers, self.scales, self.caps):
            row = []
            for i, (group, s) in enumerate(zip(opt.param_groups, scales)):
                original = _reference_lr(group) / s if s > 0 else 0.0
                floor = self.min_lr / original if original > 0 else 0.0
                target = s * self.factor
                lr = float(group["lr"])
                scheduled = lr / s if s > 0 else 0.0
                risen = calm is not None and scheduled > LR_JUMP * calm[index] > 0
                if risen:
                    # at most factor**4 in one cut: a warm-up that starts near zero
                    # must not be sent back there by one event
                    back = max(calm[index] / scheduled, self.factor**4)
                    target = min(target, s * back)
                new = min(s, max(target, floor))
                if risen:
                    after_rise = True
                    caps[i] = min(caps[i], lr * new / s)
                row.append(new)
                index += 1
            new_scales.append(row)
        if new_scales == self.scales:
            return False  # every group already sits at min_lr
        self._apply(trainer, new_scales)
        if self._raised:
            self.failed_probes += 1
        if self._raised or after_rise or level >= Level.CRITICAL:
            self.ceiling = [
                [min(c, s) for c, s in zip(*rows)] for rows in zip(self.ceiling, new_scales)
            ]
            self._raised = False
        self.backoffs += 1
        self._last_backoff_step = int(trainer.global_step)
        if after_rise:
            self.rise_step = self._last_backoff_step
        self._ramp_from = None
        self._ramp_done = 0
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.record(
            trainer,
            level,
            f"learning rate backed off to {self.scales[0][0]:.4g}x ({reason}"
            + ("; back to its rate before a rise, held there" if after_rise else "")
            + f"); lr now {lr:.4g}",
            signals=(LR_SCALE_KEY,),
            details={"lr_scale": self.scales[0][0], "lr": lr, "backoffs": float(self.backoffs)},
        )
        return True

    def _schedule_rates(self, trainer: pl.Trainer) -> list[float]:
        """Each group's learning rate as its schedule sets it, before this callback's cut."""
        return [
            float(g["lr"]) / s if s > 0 else 0.0
            for opt, scales in zip(trainer.optimizers, self.scales)
            for g, s in zip(opt.param_groups, scales)
        ]

    def _schedule_rising(self) -> list[bool]:
        """Whether each group's scheduled rate (flattened over optimizers) rose at the
        latest step."""
        if len(self._recent_lrs) < 2:
            return [False] * sum(len(row) for row in self.scales)
        return [now > then for now, then in zip(self._recent_lrs[-1], self._recent_lrs[-2])]

    def _calm_rates(self) -> list[float] | None:
        """The lowest scheduled learning rate of each group over the remembered steps."""
        if not self._recent_lrs:
            return None
        return [min(rates) for rates in zip(*self._recent_lrs)]

    def _recover(self, trainer: pl.Trainer) -> None:
        limits = [
            [min(c, self._capped(g, s, c, cap)) for g, s, c, cap in zip(opt.param_groups, *rows)]
            for opt, *rows in zip(trainer.optimizers, self.scales, self.ceiling, self.caps)
        ]
        pairs = [zip(s, c) for s, c in zip(self.scales, limits)]
        if all(s >= c * (1 - 1e-9) for row in pairs for s, c in row):  # rounding of the cap
            if self._ramp_from is not None:
                # the ramp met its limit before its end (a cap that a rising schedule
                # reaches early): it is over, and the next probe waits `calm_steps` more
                self._ramp_from = None
                self._calm = 0
                return
            if self._raised:
                self.failed_probes = 0  # the rate the last ramp reached has held
            elif self._calm < self.calm_steps * 2**self.failed_probes:
                return  # each probe that failed doubles the wait before the next
            binding = [
                [self._capped(g, s, 1.0, cap) < 1.0 for g, s, cap in zip(opt.param_groups, *rows)]
                for opt, *rows in zip(trainer.optimizers, self.scales, self.caps)
            ]
            # a cap the schedule no longer reaches holds nothing: drop it, unless the
            # schedule is still rising towards it (a warm-up that a rollback restarted)
            rising = iter(self._schedule_rising())
            self.caps = [
                [cap if b or next(rising) else math.inf for cap, b in zip(*rows)]
                for rows in zip(self.caps, binding)
            ]
            held = any(b for row in binding for b in row)
            if not held and all(c >= 1.0 for row in self.ceiling for c in row):
                return
            # calm for `calm_steps` steps at the ceiling: probe one step (1/factor) higher
            self.ceiling = [[min(1.0, c / self.factor) for c in row] for row in self.ceiling]
            self.caps = [[c / self.factor for c in row] for row in self.caps]
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
        caps = before.get("caps") or self.caps
        self.caps = [[min(a, float(b)) for a, b in zip(*rows)] for rows in zip(self.caps, caps)]
        self._apply(trainer, lower)
        self.backoffs = max(self.backoffs, int(before["backoffs"]))
        self._last_backoff_step = max(self._last_backoff_step, int(before["last_backoff_step"]))
        self.rise_step = max(self.rise_step, int(before.get("rise_step", -1)))
        self.failed_probes = max(self.failed_probes, int(before.get("failed_probes", 0)))
        self._ramp_from = None
        self._ramp_done = 0
        self._raised = False
        self.repair.restored(trainer.optimizers, before.get("repair") or {})

    def data_at_fault(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]
    ) -> str | None:
        """The cuts since the restored weights were saved answered trouble in the data,
        not a learning rate too high for the weights: back to that state's scales,
        ceilings and caps (what was learned about the learning rate on the abandoned
        trajectory is void)."""
        scales = [[float(s) for s in row] for row in state["scales"]]
        if all(new <= old for a, b in zip(scales, self.scales) for new, old in zip(a, b)):
            return None
        self.ceiling = [[float(c) for c in row] for row in state["ceiling"]]
        self.caps = [[float(c) for c in row] for row in state["caps"]]
        self._apply(trainer, scales)
        self._cut_losses, self._declined = [], False
        self._ramp_from, self._ramp_done, self._raised = None, 0, False
        self.failed_probes = int(state.get("failed_probes", 0))
        return f"learning rate back to {self.scales[0][0]:.4g}x"

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
            "caps": [list(row) for row in self.caps],
            "raised": self._raised,
            "failed_probes": self.failed_probes,
            "backoffs": self.backoffs,
            "last_backoff_step": self._last_backoff_step,
            "rise_step": self.rise_step,
            "calm": self._calm,
            "source_level": int(self.source_level),
            "ramp_from": self._ramp_from,
            "ramp_done": self._ramp_done,
            "repair": self.repair.state_dict(),
            "recent_lrs": [list(rates) for rates in self._recent_lrs],
            "losses": [float(x) for x in self._losses],
            "cut_losses": list(self._cut_losses),
            "declined": self._declined,
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
        caps = state_dict.get("caps")
        self.caps = (
            [[math.inf] * len(r) for r in self.scales]
            if caps is None
            else [[float(c) for c in row] for row in caps]
        )
        self._raised = bool(state_dict.get("raised", False))
        self.failed_probes = int(state_dict.get("failed_probes", 0))
        self.backoffs = int(state_dict["backoffs"])
        self._last_backoff_step = int(state_dict["last_backoff_step"])
        self.rise_step = int(state_dict.get("rise_step", -1))
        self._calm = int(state_dict["calm"])
        self.source_level = Level(int(state_dict.get("source_level", Level.OK)))
        ramp = state_dict.get("ramp_from")
        self._ramp_from = None if ramp is None else [[float(s) for s in row] for row in ramp]
        self._ramp_done = int(state_dict.get("ramp_done", 0))
        self.repair.load_state_dict(state_dict.get("repair"))
        self._losses.clear()
        self._losses.extend(torch.tensor(float(x)) for x in state_dict.get("losses", []))
        self._cut_losses = [float(x) for x in state_dict.get("cut_losses", [])]
        self._declined = bool(state_dict.get("declined", False))
        self._recent_lrs.clear()
        self._recent_lrs.extend(
            [float(r) for r in rates] for rates in state_dict.get("recent_lrs", [])
        )
        self._load_events(state_dict.get("events", []))
