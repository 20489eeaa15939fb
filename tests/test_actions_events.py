"""Event sources used by the action tests, and the subscription contract itself."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback

from lightning_stability.actions import LRBackoff, Rollback, StagedTraining
from lightning_stability.warning.events import InstabilityEvent, Level


class ScriptedSource(Callback):
    """Emits ``script[step]`` (a level name) in ``on_train_batch_end`` once
    ``trainer.global_step == step``; ``ranks`` limits the ranks that emit."""

    def __init__(self, script: dict[int, str], ranks: tuple[int, ...] | None = None) -> None:
        self.script = dict(script)
        self.ranks = ranks
        self.listeners: list[Any] = []

    def subscribe(self, listener) -> None:
        self.listeners.append(listener)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Once per optimizer step: under gradient accumulation several batches end at it.
        level = self.script.pop(int(trainer.global_step), None)
        if level is None or (self.ranks is not None and trainer.global_rank not in self.ranks):
            return
        event = InstabilityEvent(Level.parse(level), int(trainer.global_step), message="scripted")
        for listener in self.listeners:
            listener(event, trainer, pl_module)


class NonFiniteLossSource(ScriptedSource):
    """Raises CRITICAL when the training loss of the batch is not finite."""

    def __init__(self) -> None:
        super().__init__({})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not torch.isfinite(outputs["loss"]).all():
            event = InstabilityEvent(Level.CRITICAL, int(trainer.global_step), ("loss",))
            for listener in self.listeners:
                listener(event, trainer, pl_module)


class LrRecorder(Callback):
    """The first param group's lr after each step boundary (placed after the actions)."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lrs[int(trainer.global_step)] = float(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("action", [LRBackoff, StagedTraining, Rollback])
def test_missing_event_source_is_a_clear_error(action):
    t = trainer(max_steps=2, callbacks=[action()])
    with pytest.raises(MisconfigurationException, match="needs an EarlyWarning callback"):
        t.fit(TinyClassifier(), loader(classification_data(64)))


@pytest.mark.parametrize("action_first", [False, True])
def test_callback_order_decides_same_step_or_next_batch(action_first):
    """After its source, the cut applies at the step of the event; before it, at the
    start of the next batch, which is still before the next optimizer step."""
    source, action, rec = ScriptedSource({3: "warning"}), LRBackoff(), LrRecorder()
    cbs = [action, source, rec] if action_first else [source, action, rec]
    t = trainer(max_steps=6, callbacks=cbs)
    t.fit(TinyClassifier(lr=0.1), loader(classification_data(256), shuffle=False))
    assert rec.lrs[2] == pytest.approx(0.1)
    assert rec.lrs[3] == pytest.approx(0.1 if action_first else 0.05)
    assert rec.lrs[4] == pytest.approx(0.05)
    assert [e.step for e in action.events] == [3]
