"""StagedTraining: a ladder of progressively safer training settings."""

from __future__ import annotations

import copy
import fnmatch
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_stability.actions.base import (
    StabilityAction,
    check_nonnegative_int,
    check_positive_int,
    schedulers,
)
from lightning_stability.actions.lr_scaling import scale_learning_rates, schedulers_of
from lightning_stability.actions.optimizer_repair import DEFAULT_REPAIR, AdamRepair, RepairRung
from lightning_stability.vocabulary import ACTION_STAGE
from lightning_stability.warning.events import Level

__all__ = ["DEFAULT_STAGES", "STAGE_KEYS", "StagedTraining"]

STAGE_KEY = ACTION_STAGE

STAGE_KEYS = ("lr_scale", "gradient_clip_val", "accumulate_grad_batches", "freeze", "warmup_steps")
"""The knobs a stage may set. Missing knobs mean: ``lr_scale`` 1.0, the Trainer's own
``gradient_clip_val`` and ``accumulate_grad_batches``, nothing frozen, no warm-up."""

DEFAULT_STAGES: list[dict[str, Any]] = [
    {"warmup_steps": 100},
    {"lr_scale": 0.5, "gradient_clip_val": 1.0, "warmup_steps": 50},
    {"lr_scale": 0.25, "gradient_clip_val": 0.5, "accumulate_grad_batches": 2, "warmup_steps": 50},
    {"lr_scale": 0.1, "gradient_clip_val": 0.25, "accumulate_grad_batches": 4, "warmup_steps": 50},
]
"""Stage 0 is the run as configured; each later stage lowers the learning rate, clips
gradient norms harder and, from stage 2, averages gradients over more batches (less
gradient noise per update). Nothing is frozen by default: which modules are safe to
freeze depends on the model."""


def _positive_finite(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value > 0
    )


def _validate_stages(stages: Any) -> list[dict[str, Any]]:
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError(f"stages must be a non-empty list of dicts, got {stages!r}")
    out = []
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise ValueError(f"{where} must be a dict with keys from {STAGE_KEYS}, got {stage!r}")
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown:
            raise ValueError(
                f"stages: unknown stage key(s) {unknown} in {where}; allowed keys: {list(STAGE_KEYS)}"
            )
        lr_scale = stage.get("lr_scale", 1.0)
        if not _positive_finite(lr_scale):
            raise ValueError(
                f"stages: {where}['lr_scale'] must be a finite number > 0, got {lr_scale!r}"
            )
        clip = stage.get("gradient_clip_val")
        if clip is not None and not _positive_finite(clip):
            raise ValueError(
                f"stages: {where}['gradient_clip_val'] must be a finite number > 0 or None, "
                f"got {clip!r}"
            )
        check_positive_int(
            stage.get("accumulate_grad_batches"),
            f"stages: {where}['accumulate_grad_batches']",
            allow_none=True,
        )
        check_nonnegative_int(stage.get("warmup_steps", 0), f"stages: {where}['warmup_steps']")
        freeze = stage.get("freeze", [])
        if isinstance(freeze, str) or not all(isinstance(p, str) for p in freeze):
            raise ValueError(
                f"stages: {where}['freeze'] must be a list of module-name patterns, got {freeze!r}"
            )
        out.append(
            {
                "lr_scale": float(lr_scale),
                "gradient_clip_val": None if clip is None else float(clip),
                "accumulate_grad_batches": stage.get("accumulate_grad_batches"),
                "freeze": list(freeze),
                "warmup_steps": int(stage.get("warmup_steps", 0)),
            }
        )
    return out


class StagedTraining(StabilityAction):
    """Move up a declared ladder of safer training stages on events at or above
    ``level``, and back down after a calm period.

    A stage is a dict with any of :data:`STAGE_KEYS`:

    * ``lr_scale``: learning-rate multiplier relative to the run's own schedule (kept
      through schedulers, see :mod:`~lightning_stability.actions.lr_scaling`);
    * ``gradient_clip_val``: sets ``trainer.gradient_clip_val`` (algorithm: the
      Trainer's, ``"norm"`` when unset);
    * ``accumulate_grad_batches``: sets ``trainer.accumulate_grad_batches``. Lightning
      counts micro-batches from the start of the epoch, so the first window after a
      change mid-epoch may be shorter;
    * ``freeze``: ``fnmatch`` patterns over ``named_modules()`` names; matching modules
      are frozen with ``BaseFinetuning.freeze(train_bn=True)`` and their ``.grad`` set to
      ``None``, so that every optimizer (momentum and weight decay included) skips them
      while they stay in their param groups. Under DDP this needs
      ``strategy="ddp_find_unused_parameters_true"``;
    * ``warmup_steps``: when a stage change raises the learning rate (de-escalation), it
      is ramped geometrically over this many steps; cuts take effect at once.

    Args:
        stages: the ladder, safest last; ``None`` uses :data:`DEFAULT_STAGES`.
        level: lowest event level that escalates. Default ``"warning"``.
        calm_steps: steps with the sources' level below ``level`` (an event marks a
            change of level, so a level held high counts as not calm) before stepping
            one stage down;
            ``None`` never de-escalates. Default 200.
        cooldown: steps after a stage change during which events do not escalate
            again. Default 0.
        optimizer_repair: the rung below the ladder: on the first event at or above
            ``level`` (or a rollback's escalation) while an Adam-family param group has
            ``beta2 <= beta1**2`` (an unbounded update, which no learning-rate cut
            bounds), that group's ``beta2`` (and ``eps``, if asked) is moved to the
            :class:`~lightning_stability.actions.AdamRepair`'s safe values instead of
            climbing a stage; kept through rollbacks and resumes, undone by
            :meth:`undo_optimizer_repair`. ``None`` disables it. Default ``AdamRepair()``.

    Changes take effect at a step boundary, identically on every rank. The stage is
    saved in checkpoints and re-applied on resume. Logs ``stability/action/stage``.
    """

    source_name = "staged_training"

    def __init__(
        self,
        stages: list[dict[str, Any]] | None = None,
        level: str = "warning",
        calm_steps: int | None = 200,
        cooldown: int = 0,
        optimizer_repair: AdamRepair | None = DEFAULT_REPAIR,
    ) -> None:
        super().__init__(level)
        self.repair = RepairRung(optimizer_repair)
        self.stages = _validate_stages(copy.deepcopy(DEFAULT_STAGES) if stages is None else stages)
        check_positive_int(calm_steps, "calm_steps", allow_none=True)
        check_nonnegative_int(cooldown, "cooldown")
        self.calm_steps = calm_steps
        self.cooldown = cooldown
        self.stage = 0
        self._applied_scale = 1.0  # lr multiplier currently in the optimizers
        self._started = False
        self._last_change_step = -(10**12)
        self._calm = 0
        self._ramp: dict[str, float] | None = None  # from, to, done, steps
        self._user_clip: float | None = None
        self._user_accumulate = 1
        self._user_requires_grad: dict[str, bool] = {}

    @property
    def lr_scale(self) -> float:
        """The learning-rate factor the ladder applies now (1.0 at stage 0; during a
        de-escalation warm-up, the value the ramp has reached)."""
        return self._applied_scale

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        names = [n for n, _ in pl_module.named_modules() if n]
        for i, st in enumerate(self.stages):
            for pattern in st["freeze"]:
                if not fnmatch.filter(names, pattern):
                    raise ValueError(
                        f"stages: stages[{i}]['freeze'] pattern {pattern!r} matches no module; "
                        f"module names: {names}"
                    )
        freezes = any(st["freeze"] for st in self.stages)
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
        if (
            freezes
            and trainer.world_size > 1
            and ddp_kwargs is not None
            and not ddp_kwargs.get("find_unused_parameters", False)
        ):
            raise ValueError(
                "stages: freezing modules under DDP needs "
                "strategy='ddp_find_unused_parameters_true' (DDP otherwise waits for "
                "gradients of the frozen parameters)"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._user_clip = trainer.gradient_clip_val
        self._user_accumulate = trainer.accumulate_grad_batches
        knobs = ("gradient_clip_val", "accumulate_grad_batches")
        if not pl_module.automatic_optimization and any(
            st[k] is not None for st in self.stages for k in knobs
        ):
            rank_zero_warn(
                "StagedTraining: the module uses manual optimization, where Lightning applies "
                "neither gradient_clip_val nor accumulate_grad_batches, so the stages' clipping "
                "and accumulation do nothing; their learning-rate scales still apply (clip in "
                "training_step with self.clip_gradients to follow trainer.gradient_clip_val)"
            )
        self._user_requires_grad = {n: p.requires_grad for n, p in pl_module.named_parameters()}
        if not self._started:
            # A resumed run's optimizers already carry the stage's learning rate.
            self._set_scale(trainer, self.stages[self.stage]["lr_scale"])
            self._started = True
        self.repair.reapply(trainer.optimizers)
        self._apply_knobs(trainer, pl_module)

    def on_step_boundary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: Level | None
    ) -> None:
        step = int(trainer.global_step)
        if level is not None and level >= self.level:
            self._calm = 0
            if step - self._last_change_step > self.cooldown and not self._repair(
                trainer, level, f"{level.name} event"
            ):
                self._move(trainer, pl_module, +1, f"{level.name} event", level)
        elif self.source_level >= self.level:
            self._calm = 0  # the level is still high, though no event says so again
        else:
            self._calm += 1
            if self.calm_steps is not None and self._calm >= self.calm_steps and self.stage > 0:
                self._move(trainer, pl_module, -1, f"{self._calm} calm steps", Level.OK)
        self._advance_ramp(trainer)
        self.log_value(pl_module, STAGE_KEY, self.stage)

    def escalate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> bool:
        self._calm = 0
        if self.repair.step == int(trainer.global_step):
            return True  # this step's event was answered by the repair
        return self._repair(trainer, Level.CRITICAL, reason) or self._move(
            trainer, pl_module, +1, reason, Level.CRITICAL
        )

    def undo_optimizer_repair(self, trainer: pl.Trainer) -> None:
        """Give the optimizers the ``beta2``/``eps`` values the user configured back."""
        self.repair.undo(trainer.optimizers)

    def restored(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, before: dict[str, Any]
    ) -> None:
        """The weights go back to the snapshot; the stage does not. A rollback never loosens
        the ladder: it keeps the stricter of the snapshot's stage and the one the run had
        climbed to before this step, and the lower learning-rate scale (the rollback's own
        escalation then climbs one stage from there)."""
        kept = int(before.get("stage", self.stage))
        if int(before.get("last_change_step", -1)) == int(trainer.global_step):
            # that climb answered the event being rolled back for; the rollback's own
            # escalation answers it now, once
            kept -= 1
        if kept > self.stage:
            self.stage = kept
            self._ramp = None
            scale = min(self.stages[kept]["lr_scale"], float(before["applied_scale"]))
            self._set_scale(trainer, scale)
        self.repair.restored(trainer.optimizers, before.get("repair") or {})
        self._apply_knobs(trainer, pl_module)

    def data_at_fault(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]
    ) -> str | None:
        """The stages climbed since the restored weights were saved answered trouble in
        the data: back to that state's stage and learning-rate scale (a repair of the
        optimizer stays: it answered the optimizer's configuration, not the data)."""
        stage = int(state["stage"])
        if stage >= self.stage:
            return None
        self.stage = stage
        self._ramp = None
        self._set_scale(trainer, float(state["applied_scale"]))
        self._apply_knobs(trainer, pl_module)
        return f"back to stage {stage}"

    def _repair(self, trainer: pl.Trainer, level: Level, reason: str) -> bool:
        if not self.repair.answer(self, trainer, level, reason):
            return False
        self._last_change_step = self.repair.step  # a change of the run, for the cooldown
        return True

    # ------------------------------------------------------------- mechanics
    def _set_scale(self, trainer: pl.Trainer, scale: float) -> None:
        factor = scale / self._applied_scale
        if factor != 1.0:
            all_schedulers = schedulers(trainer)
            for opt in trainer.optimizers:
                scale_learning_rates(opt, factor, schedulers_of(opt, all_schedulers))
        self._applied_scale = scale

    def _move(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        direction: int,
        reason: str,
        level: Level,
    ) -> bool:
        target = self.stage + direction
        if not 0 <= target < len(self.stages):
            return False
        previous, self.stage = self.stage, target
        self._last_change_step = int(trainer.global_step)
        self._calm = 0
        stage = self.stages[target]
        if stage["lr_scale"] <= self._applied_scale or stage["warmup_steps"] == 0:
            self._ramp = None
            self._set_scale(trainer, stage["lr_scale"])
        else:
            self._ramp = {
                "from": self._applied_scale,
                "to": stage["lr_scale"],
                "done": 0,
                "steps": stage["warmup_steps"],
            }
        self._apply_knobs(trainer, pl_module)
        self.record(
            trainer,
            level,
            f"stage {previous} -> {target} ({reason})",
            signals=(STAGE_KEY,),
            details={"stage": float(target), "lr_scale": stage["lr_scale"]},
        )
        return True

    def _advance_ramp(self, trainer: pl.Trainer) -> None:
        if self._ramp is None:
            return
        r = self._ramp
        r["done"] += 1
        fraction = min(1.0, r["done"] / r["steps"])
        scale = r["to"] if fraction >= 1.0 else r["from"] * (r["to"] / r["from"]) ** fraction
        self._set_scale(trainer, scale)
        if fraction >= 1.0:
            self._ramp = None

    def _apply_knobs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self.stages[self.stage]
        clip = stage["gradient_clip_val"]
        trainer.gradient_clip_val = self._user_clip if clip is None else clip
        if clip is not None and trainer.gradient_clip_algorithm is None:
            from lightning.pytorch.utilities import GradClipAlgorithmType

            trainer.gradient_clip_algorithm = GradClipAlgorithmType.NORM
        accumulate = stage["accumulate_grad_batches"]
        trainer.accumulate_grad_batches = (
            self._user_accumulate if accumulate is None else accumulate
        )
        self._apply_freeze(pl_module, stage["freeze"])

    def _apply_freeze(self, pl_module: pl.LightningModule, patterns: list[str]) -> None:
        # Give back what earlier stages froze, as the user had it.
        for name, param in pl_module.named_parameters():
            if name in self._user_requires_grad:
                param.requires_grad = self._user_requires_grad[name]
        if not patterns:
            return
        modules = [
            m
            for n, m in pl_module.named_modules()
            if n and any(fnmatch.fnmatch(n, p) for p in patterns)
        ]
        BaseFinetuning.freeze(modules, train_bn=True)
        for module in modules:
            for param in module.parameters():
                if not param.requires_grad:
                    param.grad = None

    # ---------------------------------------------------------------- resume
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(level=self.level.name.lower(), calm_steps=self.calm_steps)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "applied_scale": self._applied_scale,
            "started": self._started,
            "last_change_step": self._last_change_step,
            "calm": self._calm,
            "source_level": int(self.source_level),
            "ramp": None if self._ramp is None else dict(self._ramp),
            "repair": self.repair.state_dict(),
            "events": self._events_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stage = int(state_dict["stage"])
        if not 0 <= stage < len(self.stages):
            raise ValueError(
                f"stages: the checkpoint is in stage {stage} but the ladder has "
                f"{len(self.stages)} stages"
            )
        self.stage = stage
        self._applied_scale = float(state_dict["applied_scale"])
        self._started = bool(state_dict["started"])
        self._last_change_step = int(state_dict["last_change_step"])
        self._calm = int(state_dict["calm"])
        self.source_level = Level(int(state_dict.get("source_level", Level.OK)))
        ramp = state_dict.get("ramp")
        self._ramp = None if ramp is None else {k: float(v) for k, v in ramp.items()}
        self.repair.load_state_dict(state_dict.get("repair"))
        self._load_events(state_dict.get("events", []))
