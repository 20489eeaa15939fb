"""What every acting callback shares: finding event sources, agreeing across ranks on
what happened at a step boundary, and recording what it did.

Timing. Event sources call their listeners inside ``on_train_batch_end``, after the
optimizer step. An action only collects events there and decides at the step boundary:

* when it comes after all its sources in ``trainer.callbacks`` (the normal order, and
  the one ``stability_callbacks()`` builds), in its own ``on_train_batch_end`` of the
  same batch;
* otherwise one batch later, in ``on_train_batch_start``, before the next forward pass.

Either way it decides once per optimizer step (when ``trainer.global_step`` has moved),
never in the middle of a gradient-accumulation window.

Agreement across ranks. A source may deliver an event on one rank only. At every step
boundary each action performs exactly one collective, a max all-reduce of a single
integer (the highest level it received since the last boundary, or -1), through
``trainer.strategy.reduce``. It is the boolean ``reduce_boolean_decision(any rank saw an
event)`` carrying the level as well, so every rank takes the same decision from the same
input. Because it runs at a fixed point of every step on every rank, the number of
collectives never depends on which rank saw what. Without a process group it costs
nothing; under DDP it is one latency-bound all-reduce of 8 bytes per action per step,
with no device-to-host copy beyond reading that one integer back.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_stability.callback_identity import IdentifiedCallback
from lightning_stability.probes.base import logs_this_step
from lightning_stability.vocabulary import check_factor as check_factor
from lightning_stability.vocabulary import check_nonnegative_int as check_nonnegative_int
from lightning_stability.vocabulary import check_positive_int as check_positive_int
from lightning_stability.warning.events import (
    InstabilityEvent,
    Level,
    event_from_state,
    event_to_state,
)

__all__ = ["StabilityAction", "event_from_state", "event_to_state"]


class StabilityAction(IdentifiedCallback):
    """Base class of the callbacks that change training in response to events.

    Subclasses implement :meth:`on_step_boundary`; those that can be asked to make
    training safer by another action (a rollback) implement :meth:`escalate`.
    Every action taken is appended to :attr:`events` as an ``InstabilityEvent`` whose
    ``source`` is :attr:`source_name`.
    """

    source_name: ClassVar[str] = "action"

    def __init__(self, level: str = "warning") -> None:
        super().__init__()
        self.level = Level.parse(level, "level")
        if self.level == Level.OK:
            # every recovery is an event at OK: acting on it would cut the rate on recovery
            raise ValueError("level must be one of 'watch', 'warning', 'critical', got 'ok'")
        self.events: list[InstabilityEvent] = []
        self._seen = -1  # highest level delivered on this rank since the last boundary
        self._subscribed: list[Any] = []
        self._decide_at_batch_end = True
        self._boundary_step = -1
        self._handled_step = -1
        self._handled_until = -1
        # The sources' latest level, handled or not: an event marks a change of level,
        # so a level that stays high sends nothing until it changes.
        self.source_level = Level.OK

    # ----------------------------------------------------------------- wiring
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        sources = [
            cb
            for cb in trainer.callbacks
            if cb is not self and callable(getattr(cb, "subscribe", None))
        ]
        if not sources:
            raise MisconfigurationException(
                f"{type(self).__name__} needs an EarlyWarning callback in trainer.callbacks "
                "(any callback with a subscribe(listener) method)"
            )
        for source in sources:
            if not any(source is s for s in self._subscribed):
                source.subscribe(self._receive)
                self._subscribed.append(source)
        position = {id(cb): i for i, cb in enumerate(trainer.callbacks)}
        self._decide_at_batch_end = all(position[id(s)] < position[id(self)] for s in sources)
        if not self._decide_at_batch_end:
            rank_zero_info(
                f"{type(self).__name__} comes before an event source in trainer.callbacks; "
                "it will act on each step's events at the start of the next batch."
            )
        self._boundary_step = -1

    def _receive(
        self, event: InstabilityEvent, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        self._seen = max(self._seen, int(event.level))

    def note_level(self, level: Level) -> None:
        """Count ``level`` as received on this rank at the current step."""
        self._seen = max(self._seen, int(level))

    # ------------------------------------------------------------ the boundary
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._decide_at_batch_end:
            self._boundary(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._decide_at_batch_end:
            self._boundary(trainer, pl_module)

    def _boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        if step == self._boundary_step:
            return  # inside an accumulation window: no optimizer step since last time
        self._boundary_step = step
        level = self._agree(trainer)
        if level is not None:
            self.source_level = level
        if self._handled_step <= step <= self._handled_until:
            level = None  # another action already acted on this step's events for us
        self.on_step_boundary(trainer, pl_module, level)

    def _agree(self, trainer: pl.Trainer) -> Level | None:
        local, self._seen = self._seen, -1
        if trainer.world_size > 1:
            flag = torch.tensor(local, dtype=torch.int64, device=trainer.strategy.root_device)
            local = int(trainer.strategy.reduce(flag, reduce_op="max"))
        return None if local < 0 else Level(local)

    def on_step_boundary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: Level | None
    ) -> None:
        """Called once per optimizer step on every rank with the same ``level``: the
        highest level any rank received this step, or ``None`` when none arrived."""

    # ---------------------------------------------------- used by other actions
    def escalate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> bool:
        """Make training safer now, ignoring cooldowns; ``True`` when something changed.
        Called on every rank at the same step boundary."""
        return False

    def mark_handled(self, step: int, until: int | None = None) -> None:
        """Events of ``step`` (through ``until``) have been acted on by another action:
        do not act on them again."""
        self._handled_step = step
        self._handled_until = step if until is None else max(step, until)

    def sources_rearmed(self) -> None:
        """The event sources were re-armed (their level set back to OK without an
        event), as a rollback does."""
        self.source_level = Level.OK

    def restored(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, before: dict[str, Any]
    ) -> None:
        """Called after a rollback loaded this action's state: re-apply whatever part of
        it lives outside the module, optimizer and schedulers. ``before`` is this action's
        :meth:`state_dict` from just before the rollback, for what it learned on the
        abandoned trajectory that should outlive it."""

    def data_at_fault(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]
    ) -> str | None:
        """A rollback found the data, not the run, at fault: the restored weights, frozen
        while their batches are skipped, meet trouble that their own loss band calls
        damage. Undo what this action changed since ``state`` (its state when the restored
        weights were saved) for the trouble it answered, and say what, or ``None`` when
        nothing changed."""
        return None

    # ------------------------------------------------------------- recording
    def record(
        self,
        trainer: pl.Trainer,
        level: Level,
        message: str,
        signals: tuple[str, ...] = (),
        details: dict[str, float] | None = None,
    ) -> InstabilityEvent:
        event = InstabilityEvent(
            level=level,
            step=int(trainer.global_step),
            signals=signals,
            message=message,
            source=self.source_name,
            details=dict(details or {}),
        )
        self.events.append(event)
        rank_zero_info(f"[{self.source_name}] step {event.step}: {message}")
        return event

    @staticmethod
    def log_value(pl_module: pl.LightningModule, key: str, value: float) -> None:
        """Log ``value`` on the steps Lightning writes step metrics (every
        ``log_every_n_steps``): a ``self.log`` call costs far more than the action's own
        work, and on other steps nothing would be written."""
        if not logs_this_step(pl_module.trainer):
            return
        # Identical on every rank by construction, so no sync; only rank 0's loggers write.
        pl_module.log(key, float(value), batch_size=1, on_step=True, on_epoch=False)

    def _events_state(self) -> list[dict[str, Any]]:
        return [event_to_state(e) for e in self.events]

    def _load_events(self, state: list[dict[str, Any]]) -> None:
        self.events = [event_from_state(s) for s in state]


def action_callbacks(trainer: pl.Trainer) -> list[StabilityAction]:
    """The acting callbacks attached to ``trainer``, in callback order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, StabilityAction)]


def schedulers(trainer: pl.Trainer) -> list[Any]:
    return [config.scheduler for config in trainer.lr_scheduler_configs]
