"""Rollback: return to the last known-good state on a critical event and carry on."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_stability.actions.base import (
    StabilityAction,
    action_callbacks,
    check_factor,
    check_nonnegative_int,
    check_positive_int,
    schedulers,
)
from lightning_stability.actions.lr_backoff import LRBackoff
from lightning_stability.actions.lr_scaling import scale_learning_rates, schedulers_of
from lightning_stability.actions.optimizer_repair import repaired_at
from lightning_stability.actions.snapshot import TrainingSnapshot
from lightning_stability.actions.staged_training import StagedTraining
from lightning_stability.estimators.sharding import all_finite
from lightning_stability.vocabulary import ACTION_ROLLBACKS, ACTION_SKIPPED_STEPS
from lightning_stability.warning.events import Level

__all__ = ["Rollback"]

ROLLBACKS_KEY = ACTION_ROLLBACKS
_VIEW = "view:"
"""Prefix of a snapshot's entries that hold a judging callback's ``rollback_state``."""
SKIPPED_KEY = ACTION_SKIPPED_STEPS


class Rollback(StabilityAction):
    """Keep a proven-good training state in memory and return to it on a critical event,
    then make training safer and continue the run instead of failing.

    A state is trusted only after the run stayed calm for a whole interval after it, as
    in large-scale practice (PaLM restarted from a checkpoint about 100 steps before a
    loss spike, Chowdhery et al., 2022): damage such as a corrupted batch often shows up
    a few steps after the update that did it, so the latest snapshot may already hold it.
    Two :class:`~lightning_stability.actions.snapshot.TrainingSnapshot` are kept (module
    state, optimizer and scheduler states, AMP scaler, and the state of the other action
    callbacks):

    * ``pending``: taken every ``every`` steps while the latest level is below
      ``calm_below`` and the weights are finite;
    * ``good``: at the next snapshot time, ``pending`` is promoted to ``good`` if the
      level stayed below ``calm_below`` at every step since it was taken and the weights
      are still finite; otherwise it is dropped. The state training starts from is
      ``good`` from the start.

    On an event at or above ``level`` (and, with ``nonfinite_loss``, on a non-finite
    training loss on any rank) ``good`` is restored, so the run goes back between
    ``every`` and ``2 * every`` steps before the trouble. ``pending`` is used only when
    there is no ``good`` state (the starting weights were not finite); it was taken while
    calm, before the trouble was reported. Then training is made safer: the next stage of
    a :class:`StagedTraining` in ``trainer.callbacks`` if there is one, else a backoff of
    an :class:`LRBackoff`, else the learning rates are multiplied by ``backoff_factor``.
    The data loader is not rewound: the batches seen since the snapshot, the offending
    ones among them, are not replayed, and ``trainer.global_step`` keeps counting. The
    next ``skip_steps`` batches are skipped too (their gradients are dropped before the
    optimizer step, so neither the weights nor the optimizer's moments change; with a
    gradient scaler or clipping by value they are zeroed instead, so momentum still
    moves the weights), since a
    bad stretch of data often outlasts the batch that raised the alarm (PaLM skipped 200
    to 500 batches after restarting, Chowdhery et al., 2022). The loss band of an
    :class:`EarlyWarning` goes back with the weights (each snapshot keeps the
    ``rollback_state`` of the callbacks that judge the run, and a rollback hands it to
    their ``restore_view``): a band learned on later, lower losses would call the restored
    weights' own loss damage. A critical event while skipping therefore cannot come from
    the restored weights' updates nor from the weights themselves: the batches are at
    fault. It extends the skip instead of rolling back again, for at most
    ``5 * skip_steps`` steps after the rollback, and the other actions undo what they
    changed since the restored weights were saved (``data_at_fault``: an
    :class:`LRBackoff` returns to that state's learning rate, a :class:`StagedTraining` to
    its stage), since a learning rate or stage that answered bad data says nothing about
    the run; this happens only on that evidence, never at the rollback itself. This holds
    unless the skipped batches' loss has grown past ``skip_growth`` times its
    value at the first of them. With the weights frozen, a loss that keeps growing means
    the data moves with the model (a feedback loop) or away from it: waiting does not end
    the trouble, and the restored state is no refuge, since restoring it again would give
    the same weights. The skip then ends and training resumes at the reduced learning
    rate, from the weights the rollback left (kept for the skip's length) if their
    training loss at the rollback was lower than the restored weights' loss now (they fit
    the data as it is now better), else from the restored ones; later critical events that would return to that same
    state make training safer without restoring it (they are not counted as rollbacks),
    until a newer good state replaces it. An event below ``level`` that an
    :class:`LRBackoff` answered as the damage of a rise of the learning rate (a schedule's
    jump or ramp; see there) also rolls back: the updates taken at the risen rate are
    what hurt the weights, and going back before them costs only the steps since. So
    does one that an optimizer repair answered (an Adam-family group with
    ``beta2 <= beta1**2``, whose update ``m/sqrt(v)`` is unbounded; see
    :class:`~lightning_stability.actions.AdamRepair`): the trouble is what those updates
    did, and the repaired optimizer goes on from the weights before it. Every
    callback with a ``rearm`` method (:class:`EarlyWarning`, the probes' rolling
    windows) is re-armed at a rollback, so that renewed trouble is reported at once, and
    the other actions ignore the events of the skipped steps. After
    ``max_rollbacks`` rollbacks it rolls back no more: the next critical event is recorded
    with a warning (once), the run goes on, and the other actions respond to critical
    events as they would without a rollback. The same holds when there is no known-good
    state to return to. Ending the run is the user's choice (``EarlyStopping``,
    ``max_steps``), never this callback's.

    Memory: two snapshots, i.e. about twice the weights plus the optimizer state (about
    6x the parameters for Adam, 4x for SGD with momentum), and a third, the state a
    rollback left, while its skip lasts (with ``skip_growth``); ``offload`` keeps them in host
    (CPU) memory instead of on the accelerator. Under sharding (FSDP2, ``DTensor``
    parameters) the module and optimizer state dicts hold each rank's local shards, so
    each rank keeps and restores its own part; whether the weights are finite (a
    snapshot is taken only then) is decided over all shards, so every rank agrees.

    Args:
        every: snapshot interval in optimizer steps. Default 50.
        level: event level that triggers a rollback. Default ``"critical"``.
        calm_below: snapshots are taken, and promoted to good, only while the level is
            below this. Default ``"warning"``.
        max_rollbacks: rollbacks in a run; after them, critical events are left to the
            other actions. Default 3.
        offload: keep the snapshots on the CPU. Default False.
        backoff_factor: learning-rate multiplier after a rollback when no other action
            is attached, in (0, 1). Default 0.5.
        nonfinite_loss: treat a non-finite training loss (``outputs["loss"]``) as
            critical even if no source reports it. Default True.
        skip_steps: batches skipped after a rollback (their updates are not applied).
            Default 10; 0 skips none.
        skip_growth: a critical event while skipping ends the skip, instead of
            extending it, once the mean training loss (over ranks) of the latest skipped
            batch exceeds this multiple of the first one's; see above. Must be > 1;
            ``None`` always extends. Default 2.0.
        dirpath: no longer used (the run is never stopped, so there is no stop
            checkpoint); accepted so that existing configurations still load.

    Resume: both snapshots go into the checkpoint with the rest of the state (so a
    checkpoint grows by up to two copies of the weights and optimizer state), and a run
    resumed from it keeps them: it rolls back to the same state as the uninterrupted run
    would, even when the checkpoint was taken while the level was WARNING and the resumed
    weights were not yet proven good. From a checkpoint without snapshots, the resumed
    weights are taken as good only if the saved level was below ``calm_below``.
    """

    source_name = "rollback"

    def __init__(
        self,
        every: int = 50,
        level: str = "critical",
        calm_below: str = "warning",
        max_rollbacks: int = 3,
        offload: bool = False,
        backoff_factor: float = 0.5,
        nonfinite_loss: bool = True,
        dirpath: str | None = None,
        skip_steps: int = 10,
        skip_growth: float | None = 2.0,
    ) -> None:
        super().__init__(level)
        check_positive_int(every, "every")
        self.calm_below = Level.parse(calm_below, "calm_below")
        check_nonnegative_int(max_rollbacks, "max_rollbacks")
        check_factor(backoff_factor, "backoff_factor")
        check_nonnegative_int(skip_steps, "skip_steps")
        if skip_growth is not None and (
            isinstance(skip_growth, bool)
            or not isinstance(skip_growth, (int, float))
            or not skip_growth > 1.0
        ):
            raise ValueError(f"skip_growth must be a number > 1 or None, got {skip_growth!r}")
        self.skip_growth = None if skip_growth is None else float(skip_growth)
        self._skip_losses: list[float] = []  # first and latest skipped batch's loss
        self._no_refuge_step = -1  # step of a snapshot whose weights failed on fresh data
        self.skip_steps = skip_steps
        self.skipped = 0
        self._skip_from = -1
        self._skip_until = -1
        self.every = every
        self.max_rollbacks = max_rollbacks
        self.offload = bool(offload)
        self.backoff_factor = float(backoff_factor)
        self.nonfinite_loss = bool(nonfinite_loss)
        self.dirpath = dirpath
        self.rollbacks = 0
        self.good: TrainingSnapshot | None = None
        self.pending: TrainingSnapshot | None = None
        # the state a rollback left, kept while skipping: if the restored weights prove no
        # refuge from the data, training goes back to it
        self.abandoned: TrainingSnapshot | None = None
        self._abandoned_loss = math.nan  # its training loss at the rollback, over ranks
        self._latest_loss: torch.Tensor | None = None
        self._calm_since_pending = False
        self._declined: list[str] = []  # why critical events were left to the others
        self._loaded_snapshots = False

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded_snapshots:
            self._loaded_snapshots = False  # the checkpoint's good and pending states stand
            return
        taken = self._take(trainer, pl_module)
        if self.source_level < self.calm_below:
            self.good, self.pending = taken, None
        else:
            # Resumed while the run was unsettled: these weights are not proven good, but
            # they were reached before the trouble a later critical event will report.
            self.good, self.pending = None, taken
        self._calm_since_pending = False

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            loss = None
        self._latest_loss = None if loss is None else loss.detach()
        if loss is not None and self.skip_growth is not None and self._skipping(trainer):
            # every rank skips the same steps, so every rank joins this reduction
            mean = float(trainer.strategy.reduce(loss.detach().float(), reduce_op="mean"))
            self._skip_losses = [*self._skip_losses[:1], mean]
        if self.nonfinite_loss and loss is not None and not bool(torch.isfinite(loss).all()):
            self.note_level(Level.CRITICAL)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_step_boundary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: Level | None
    ) -> None:
        if self.source_level >= self.calm_below:
            self._calm_since_pending = False
        step = int(trainer.global_step)
        if self.abandoned is not None and step > self._skip_until:
            self.abandoned = None  # the skip ended without proving the restored state wrong
        cause = None
        if level is not None and level < self.level:
            cause = self._damage_explained(trainer, step)
        if level is not None and (level >= self.level or cause is not None):
            # a batch that was skipped left the restored weights as they were
            skipped = step <= self._skip_until
            bounded = step + self.skip_steps <= self._skip_from + 5 * self.skip_steps
            if skipped and self._skipped_loss_grew():
                self._resume(trainer, pl_module, level, step)
            elif skipped and bounded:
                self._extend_skip(trainer, pl_module, level, step)
            elif self.snapshot is not None and self.snapshot.step == self._no_refuge_step:
                self._make_safer_in_place(trainer, pl_module, level)
            elif self.rollbacks >= self.max_rollbacks:
                self._decline(trainer, level, f"max_rollbacks={self.max_rollbacks} reached")
            elif self.snapshot is None:
                self._decline(trainer, level, "no known-good state to return to")
            else:
                self._roll_back(trainer, pl_module, level, cause)
        elif step % self.every == 0:
            self._advance(trainer, pl_module)
        self.log_value(pl_module, ROLLBACKS_KEY, self.rollbacks)
        self.log_value(pl_module, SKIPPED_KEY, self.skipped)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if int(trainer.global_step) >= self._skip_until:
            return
        self.skipped += 1
        # A gradient scaler asserts that it saw gradients, and clipping by value fails on
        # a model without any: give them zeros, not None (the optimizer's momentum then
        # still moves the weights; without either, nothing changes).
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        by_value = bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm == "value"
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if scaler is None and not by_value:
                    p.grad = None
                else:
                    p.grad.zero_()

    def _skipping(self, trainer: pl.Trainer) -> bool:
        # at batch end the step counter has already moved past the skipped update
        return self._skip_from < int(trainer.global_step) <= self._skip_until

    def _skipped_loss_grew(self) -> bool:
        if self.skip_growth is None or len(self._skip_losses) < 2:
            return False
        first, latest = self._skip_losses
        # a non-finite loss is bad data, which skipping is for
        return math.isfinite(first) and math.isfinite(latest) and latest > self.skip_growth * first

    @property
    def snapshot(self) -> TrainingSnapshot | None:
        """The state a rollback would return to now."""
        return self.good if self.good is not None else self.pending

    # ------------------------------------------------------------- mechanics
    def _others(self, trainer: pl.Trainer) -> dict[str, StabilityAction]:
        return {cb.state_key: cb for cb in action_callbacks(trainer) if cb is not self}

    def _take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TrainingSnapshot | None:
        # Weights are identical on every rank under DDP, so this check agrees everywhere.
        if not all_finite(pl_module.parameters()):
            return None
        return self._snapshot(trainer, pl_module, self._others(trainer))

    def _snapshot(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        others: dict[str, StabilityAction],
    ) -> TrainingSnapshot:
        snapshot = TrainingSnapshot.take(trainer, pl_module, others, offload=self.offload)
        # the views of the run that describe these weights (the loss band) go back with them
        for cb in trainer.callbacks:
            if cb is not self and callable(getattr(cb, "rollback_state", None)):
                snapshot.callbacks[_VIEW + cb.state_key] = cb.rollback_state()
        return snapshot

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Snapshot time: promote ``pending`` if the interval since it was calm, then take
        a new ``pending`` if the run is calm now."""
        fresh = self._take(trainer, pl_module) if self.source_level < self.calm_below else None
        finite_now = fresh is not None or all_finite(pl_module.parameters())
        if self.pending is not None and self._calm_since_pending and finite_now:
            self.good = self.pending
        self.pending = fresh
        self._calm_since_pending = fresh is not None

    def _damage_explained(self, trainer: pl.Trainer, step: int) -> str | None:
        """What hurt the weights, when another action answered this step's event by naming
        it: an :class:`LRBackoff` put it down to a rise of the learning rate, or an
        optimizer repair found the optimizer's update unbounded. The updates taken under
        that cause are what the weights must lose. ``None`` otherwise."""
        for action in action_callbacks(trainer):
            if isinstance(action, LRBackoff) and action.rise_step == step:
                return "that followed a rise of the learning rate"
            if repaired_at(action, step):
                return "that the optimizer repair answered (its update was unbounded)"
        return None

    def _roll_back(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        level: Level,
        cause: str | None = None,
    ) -> None:
        step = int(trainer.global_step)
        others = self._others(trainer)
        for action in others.values():
            action.mark_handled(step)
        target = self.snapshot
        assert target is not None
        # The trajectory after the restored state is abandoned, and an unproven pending
        # state from it must not be promoted later.
        if target is self.good:
            self.pending = None
        self._calm_since_pending = False
        if self.skip_growth is not None and self.skip_steps > 0:
            self.abandoned = self._snapshot(trainer, pl_module, others)
            latest = self._latest_loss
            local = latest.float().mean() if latest is not None else torch.tensor(math.nan)
            # every rank rolls back at this boundary, so every rank joins the reduction
            self._abandoned_loss = float(trainer.strategy.reduce(local, reduce_op="mean"))
        self._restore(target, trainer, pl_module, others)
        self.sources_rearmed()
        self._skip_from, self._skip_until = step, step + self.skip_steps
        self._skip_losses = []
        self._rearm(trainer, step, target)
        self.rollbacks += 1
        safer = self._make_safer(trainer, pl_module, others, f"rollback {self.rollbacks}")
        self.record(
            trainer,
            level,
            f"rolled back to step {target.step} after a {level.name} event"
            + (f" {cause}" if cause else "")
            + f"; {safer}",
            signals=(ROLLBACKS_KEY,),
            details={"to_step": float(target.step), "rollbacks": float(self.rollbacks)},
        )

    @staticmethod
    def _restore(
        snapshot: TrainingSnapshot,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        others: dict[str, StabilityAction],
    ) -> None:
        """Load ``snapshot``; each other action then keeps what it learned since (its
        ``restored`` sees its state from before the restore)."""
        before = {key: action.state_dict() for key, action in others.items()}
        snapshot.restore(trainer, pl_module, others)
        for key, action in others.items():
            action.restored(trainer, pl_module, before[key])

    def _restore_views(self, trainer: pl.Trainer, snapshot: TrainingSnapshot) -> None:
        """The weights of ``snapshot`` are back: so are the views of the run saved with
        them (each judging callback's ``rollback_state``, loaded by its ``restore_view``)."""
        for cb in trainer.callbacks:
            view = snapshot.callbacks.get(_VIEW + cb.state_key)
            restore = getattr(cb, "restore_view", None)
            if cb is not self and view is not None and callable(restore):
                restore(copy.deepcopy(view))

    def _rearm(
        self, trainer: pl.Trainer, step: int, restored: TrainingSnapshot | None = None
    ) -> None:
        """Re-arm every callback that judges the run; ``restored``: the snapshot just
        loaded, whose saved views go back with its weights."""
        if restored is not None:
            self._restore_views(trainer, restored)
        for cb in trainer.callbacks:
            rearm = getattr(cb, "rearm", None)
            if cb is not self and callable(rearm):
                rearm(step, self.skip_steps)
        # Events while skipping come from data the weights never saw: no other action
        # should respond to them.
        for action in self._others(trainer).values():
            action.sources_rearmed()
            action.mark_handled(step, until=self._skip_until)

    def _resume(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: Level, step: int
    ) -> None:
        """End the skip: the restored weights meet growing trouble on fresh data, so they
        are no refuge. When the weights the rollback left had a lower (finite) training
        loss then than the restored ones have now, they fit the data as it is now better:
        go back to those."""
        snapshot = self.snapshot
        self._no_refuge_step = snapshot.step if snapshot is not None else -1
        first, latest = self._skip_losses
        self._skip_until = step
        others = self._others(trainer)
        for action in others.values():
            action.mark_handled(step)  # the next events are theirs again
        back = ""
        if self.abandoned is not None and self._abandoned_loss < latest:
            self._restore(self.abandoned, trainer, pl_module, others)
            self._restore_views(trainer, self.abandoned)
            back = f" from the weights of step {self.abandoned.step}, before the rollback"
            self.abandoned = None
        self.record(
            trainer,
            level,
            f"{level.name} event while skipping, and the skipped batches' loss grew from "
            f"{first:.4g} to {latest:.4g} on the restored weights: the state of step "
            f"{self._no_refuge_step} is no refuge from this data; training resumes{back}",
            signals=(SKIPPED_KEY,),
            details={"first_loss": first, "latest_loss": latest},
        )

    def _make_safer_in_place(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: Level
    ) -> None:
        others = self._others(trainer)
        for action in others.values():
            action.mark_handled(int(trainer.global_step))
        safer = self._make_safer(trainer, pl_module, others, f"{level.name} event, no refuge")
        self.record(
            trainer,
            level,
            f"{level.name} event; not rolled back (the state of step {self._no_refuge_step} "
            f"is no refuge); {safer}",
            signals=(ROLLBACKS_KEY,),
        )

    def _extend_skip(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: Level, step: int
    ) -> None:
        self._skip_until = step + self.skip_steps
        self.sources_rearmed()
        self._rearm(trainer, step)
        undone = self._data_at_fault(trainer, pl_module)
        self.record(
            trainer,
            level,
            f"{level.name} event while skipping batches after a rollback: skipping "
            f"{self.skip_steps} more"
            + (f"; the data is at fault, not the run: {undone}" if undone else ""),
            signals=(SKIPPED_KEY,),
            details={"skip_until": float(self._skip_until)},
        )

    def _data_at_fault(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """The restored weights, unchanged since the rollback and judged against their own
        loss band, meet damage: the batches are what is wrong. The other actions undo what
        they changed since those weights were saved."""
        target = self.snapshot
        if target is None:
            return ""
        said = []
        for key, action in self._others(trainer).items():
            if key in target.callbacks:
                what = action.data_at_fault(trainer, pl_module, target.callbacks[key])
                if what:
                    said.append(what)
        return "; ".join(said)

    def _make_safer(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        others: dict[str, StabilityAction],
        reason: str,
    ) -> str:
        for kind, name in ((StagedTraining, "next stage"), (LRBackoff, "learning rate backed off")):
            for action in others.values():
                if isinstance(action, kind):
                    if not action.escalate(trainer, pl_module, reason):
                        return f"no {name}"
                    if repaired_at(action, int(trainer.global_step)):
                        return "optimizer repaired"  # the event's answer; nothing more
                    return name
        all_schedulers = schedulers(trainer)
        for opt in trainer.optimizers:
            scale_learning_rates(opt, self.backoff_factor, schedulers_of(opt, all_schedulers))
        return f"learning rate x{self.backoff_factor:g}"

    def _decline(self, trainer: pl.Trainer, level: Level, why: str) -> None:
        """Leave a critical event to the other actions (not marked handled, so they
        respond to it) and let the run go on; say so once."""
        if why in self._declined:
            return
        self._declined.append(why)
        message = (
            f"{level.name} event not rolled back: {why}. Training goes on; the other "
            "actions still respond to critical events. To allow more rollbacks, raise "
            "max_rollbacks; to end such a run, add EarlyStopping."
        )
        self.record(trainer, level, message, signals=(ROLLBACKS_KEY,))
        rank_zero_warn(f"Rollback: {message}")

    # ---------------------------------------------------------------- resume
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(level=self.level.name.lower(), every=self.every)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "rollbacks": self.rollbacks,
            "current_level": int(self.source_level),
            "skipped": self.skipped,
            "skip_from": self._skip_from,
            "skip_until": self._skip_until,
            "skip_losses": list(self._skip_losses),
            "no_refuge_step": self._no_refuge_step,
            "declined": list(self._declined),
            "events": self._events_state(),
            "good": _snapshot_state(self.good),
            "pending": _snapshot_state(self.pending),
            "abandoned": _snapshot_state(self.abandoned),
            "abandoned_loss": self._abandoned_loss,
            "calm_since_pending": self._calm_since_pending,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollbacks = int(state_dict["rollbacks"])
        self.source_level = Level(int(state_dict["current_level"]))
        self.skipped = int(state_dict.get("skipped", 0))
        self._skip_from = int(state_dict.get("skip_from", -1))
        self._skip_until = int(state_dict.get("skip_until", -1))
        self._skip_losses = [float(v) for v in state_dict.get("skip_losses", [])]
        self._no_refuge_step = int(state_dict.get("no_refuge_step", -1))
        self._declined = [str(w) for w in state_dict.get("declined", [])]
        self._load_events(state_dict.get("events", []))
        if "good" in state_dict:
            self.good = _snapshot_from(state_dict["good"])
            self.pending = _snapshot_from(state_dict.get("pending"))
            self.abandoned = _snapshot_from(state_dict.get("abandoned"))
            self._abandoned_loss = float(state_dict.get("abandoned_loss", math.nan))
            self._calm_since_pending = bool(state_dict.get("calm_since_pending", False))
            self._loaded_snapshots = True


def _snapshot_state(snapshot: TrainingSnapshot | None) -> dict[str, Any] | None:
    """A snapshot as tensors, numbers, strings, lists and dicts (checkpoint-safe)."""
    if snapshot is None:
        return None
    return {
        "step": snapshot.step,
        "module": snapshot.module,
        "optimizers": snapshot.optimizers,
        "schedulers": snapshot.schedulers,
        "precision": snapshot.precision,
        "callbacks": snapshot.callbacks,
    }


def _snapshot_from(state: dict[str, Any] | None) -> TrainingSnapshot | None:
    if state is None:
        return None
    return TrainingSnapshot(
        step=int(state["step"]),
        module=dict(state["module"]),
        optimizers=list(state["optimizers"]),
        schedulers=list(state["schedulers"]),
        precision=dict(state.get("precision", {})),
        callbacks=dict(state.get("callbacks", {})),
    )
