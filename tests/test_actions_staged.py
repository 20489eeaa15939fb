"""StagedTraining: validation, escalation knobs, de-escalation warm-up, freezing."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.pytorch.callbacks import Callback
from test_actions_events import LrRecorder, ScriptedSource

from lightning_stability.actions import DEFAULT_STAGES, StagedTraining


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stages": [{"lr_scale": 0.5, "learning_rate": 1}]}, "stages: unknown stage key"),
        ({"stages": []}, "stages"),
        ({"stages": [{"lr_scale": 0}]}, "lr_scale"),
        ({"stages": [{"gradient_clip_val": -1.0}]}, "gradient_clip_val"),
        ({"stages": [{"accumulate_grad_batches": 0}]}, "accumulate_grad_batches"),
        ({"stages": [{"freeze": "net.0"}]}, "freeze"),
        ({"cooldown": -1}, "cooldown"),
        ({"calm_steps": 0}, "calm_steps"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StagedTraining(**kwargs)


def test_freeze_pattern_matching_nothing_is_rejected_at_setup():
    action = StagedTraining(stages=[{}, {"freeze": ["encoder*"]}])
    t = trainer(max_steps=2, callbacks=[ScriptedSource({}), action])
    with pytest.raises(ValueError, match="matches no module"):
        t.fit(TinyClassifier(), loader(classification_data(64)))


class KnobRecorder(Callback):
    def __init__(self) -> None:
        self.knobs: dict[int, tuple] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.knobs[int(trainer.global_step)] = (
            trainer.gradient_clip_val,
            trainer.accumulate_grad_batches,
        )


def test_default_ladder_escalates_and_sets_knobs():
    action, rec, knobs = StagedTraining(calm_steps=None), LrRecorder(), KnobRecorder()
    t = trainer(
        max_steps=8, callbacks=[ScriptedSource({2: "warning", 4: "warning"}), action, rec, knobs]
    )
    t.fit(TinyClassifier(lr=0.1), loader(classification_data(512), shuffle=False))
    assert action.stage == 2
    assert rec.lrs[1] == pytest.approx(0.1)
    assert rec.lrs[2] == pytest.approx(0.1 * DEFAULT_STAGES[1]["lr_scale"])
    assert rec.lrs[4] == pytest.approx(0.1 * DEFAULT_STAGES[2]["lr_scale"])
    assert knobs.knobs[1] == (None, 1)
    assert knobs.knobs[2] == (DEFAULT_STAGES[1]["gradient_clip_val"], 1)
    assert knobs.knobs[4] == (
        DEFAULT_STAGES[2]["gradient_clip_val"],
        DEFAULT_STAGES[2]["accumulate_grad_batches"],
    )
    assert [e.source for e in action.events] == ["staged_training"] * 2


def test_calm_de_escalation_warms_up_geometrically():
    stages = [{"warmup_steps": 4}, {"lr_scale": 0.1}]
    action, rec = StagedTraining(stages=stages, calm_steps=3), LrRecorder()
    t = trainer(max_steps=14, callbacks=[ScriptedSource({2: "warning", 3: "ok"}), action, rec])
    t.fit(TinyClassifier(lr=0.1), loader(classification_data(512), shuffle=False))
    assert rec.lrs[2] == pytest.approx(0.01)
    # three calm boundaries (3, 4, 5): back to stage 0 at step 5, ramped over 4 steps
    assert rec.lrs[4] == pytest.approx(0.01)
    for k, step in enumerate(range(5, 9), start=1):
        assert rec.lrs[step] == pytest.approx(0.1 * 0.1 ** (1 - k / 4), rel=1e-9)
    assert rec.lrs[14] == pytest.approx(0.1)
    assert action.stage == 0


def test_no_de_escalation_while_the_level_stays_high_without_new_events():
    stages = [{}, {"lr_scale": 0.1}]
    action, rec = StagedTraining(stages=stages, calm_steps=3), LrRecorder()
    t = trainer(max_steps=14, callbacks=[ScriptedSource({2: "warning", 9: "watch"}), action, rec])
    t.fit(TinyClassifier(lr=0.1), loader(classification_data(512), shuffle=False))
    # held at WARNING, silently, through step 8; calm boundaries 9, 10, 11
    assert all(rec.lrs[s] == pytest.approx(0.01) for s in range(2, 11))
    assert rec.lrs[11] == pytest.approx(0.1) and action.stage == 0


def test_frozen_modules_do_not_move_even_with_momentum():
    model = TinyClassifier(lr=0.1)  # SGD with momentum 0.9
    stages = [{}, {"freeze": ["net.0"]}]
    action = StagedTraining(stages=stages, calm_steps=None)

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                self.frozen_at_3 = pl_module.net[0].weight.detach().clone()
                self.head_at_3 = pl_module.net[2].weight.detach().clone()

    watch = Watch()
    t = trainer(max_steps=8, callbacks=[ScriptedSource({3: "warning"}), action, watch])
    t.fit(model, loader(classification_data(512), shuffle=False))
    assert torch.equal(model.net[0].weight, watch.frozen_at_3)
    assert not torch.equal(model.net[2].weight, watch.head_at_3)
    assert not model.net[0].weight.requires_grad
    assert len(t.optimizers[0].param_groups[0]["params"]) == 4  # groups unchanged
