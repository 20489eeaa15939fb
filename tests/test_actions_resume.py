"""Resuming a backed-off, escalated run continues with the same learning rates and stage."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyClassifier, classification_data, flat_weights, loader, trainer
from lightning.pytorch.callbacks import Callback
from test_actions_events import LrRecorder, ScriptedSource

from lightning_stability.actions import LRBackoff, Rollback, StagedTraining
from lightning_stability.warning.events import Level

STAGES = [{}, {"lr_scale": 0.5, "gradient_clip_val": 0.5, "accumulate_grad_batches": 2}]


class _Scheduled(TinyClassifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30, eta_min=0.001)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _callbacks():
    source = ScriptedSource({1: "warning", 2: "warning"})
    actions = [LRBackoff(), StagedTraining(stages=STAGES, calm_steps=None), Rollback(every=2)]
    return [source, *actions, LrRecorder()]


def _fit(max_steps, ckpt_path=None):
    torch.manual_seed(0)
    model = _Scheduled(lr=0.1)
    cbs = _callbacks()
    t = trainer(max_steps=max_steps, callbacks=cbs)
    t.fit(model, loader(classification_data(256), shuffle=False), ckpt_path=ckpt_path)
    return t, model, cbs


def test_resume_mid_run_keeps_lrs_stage_and_knobs(tmp_path):
    _, _, full_cbs = _fit(10)
    first, _, _ = _fit(4)  # stops mid-epoch, backed off twice and in stage 1
    assert first.callbacks[1].backoffs == 2 and first.callbacks[2].stage == 1
    path = tmp_path / "mid.ckpt"
    first.save_checkpoint(path)
    torch.load(path, weights_only=True)  # every action's state is checkpoint-safe
    resumed, _, cbs = _fit(10, ckpt_path=str(path))
    assert cbs[1].backoffs == 2 and cbs[1].scales == [[0.25]]
    assert cbs[2].stage == 1
    # the sources' level (WARNING since step 1, no event since) is restored too
    assert cbs[1].source_level == cbs[2].source_level == Level.WARNING
    assert resumed.gradient_clip_val == 0.5 and resumed.accumulate_grad_batches == 2
    for step in range(5, 11):
        assert cbs[-1].lrs[step] == pytest.approx(full_cbs[-1].lrs[step], rel=1e-12)
    assert cbs[-1].lrs[10] == pytest.approx(resumed.optimizers[0].param_groups[0]["lr"])


def _one_batch_fit(max_steps, script, ckpt_path=None):
    """One batch per epoch, so that a checkpoint is always at an epoch boundary and the
    resumed run sees the same data as the uninterrupted one."""
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.1)
    rollback = Rollback(every=2, skip_steps=0)
    cbs = [ScriptedSource(dict(script)), rollback, StepWeights()]
    t = trainer(max_steps=max_steps, max_epochs=-1, callbacks=cbs)
    t.fit(model, loader(classification_data(32), shuffle=False), ckpt_path=ckpt_path)
    return t, model, rollback, cbs[-1]


class StepWeights(Callback):
    """The flat weights after every step boundary (placed after the actions)."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights[int(trainer.global_step)] = flat_weights(pl_module)


def test_resume_taken_at_warning_rolls_back_to_the_same_state(tmp_path):
    """A WARNING at step 3 keeps the step-2 snapshot from being promoted, so at the CRITICAL
    of step 10 the uninterrupted run returns to step 0. A run resumed at step 6 (level still
    WARNING) must do the same, not take its resumed weights as good."""
    script = {3: "warning", 10: "critical"}
    _, full_model, full, full_weights = _one_batch_fit(14, script)
    assert [e.details["to_step"] for e in full.events] == [0.0]

    first, _, _, _ = _one_batch_fit(6, script)
    path = tmp_path / "at-warning.ckpt"
    first.save_checkpoint(path)
    torch.load(path, weights_only=True)  # the snapshots are checkpoint-safe
    _, model, resumed, weights = _one_batch_fit(14, script, ckpt_path=str(path))
    assert resumed.source_level == Level.OK  # re-armed by the rollback, as in the full run
    assert [(e.step, e.message) for e in resumed.events] == [
        (e.step, e.message) for e in full.events
    ]
    for step in range(7, 15):
        assert torch.equal(weights.weights[step], full_weights.weights[step]), step
    assert torch.equal(flat_weights(model), flat_weights(full_model))


def test_resume_from_a_checkpoint_without_snapshots_does_not_trust_unsettled_weights():
    rollback = Rollback(every=2)
    state = {"rollbacks": 0, "current_level": int(Level.WARNING)}
    rollback.load_state_dict(state)
    t = trainer(max_steps=1, callbacks=[ScriptedSource({}), rollback])
    t.fit(TinyClassifier(), loader(classification_data(32), shuffle=False))
    assert rollback.good is None and rollback.pending is not None


def test_a_resumed_run_rolls_back_to_the_same_loss_band(tmp_path):
    """With an EarlyWarning watching the loss, the snapshots carry its band: a run resumed
    at step 6 rolls back at step 10 to the band of the same snapshot as the uninterrupted
    run, and its band, events and weights match it from then on."""
    from lightning_stability import LossMonitor
    from lightning_stability.warning import EarlyWarning

    def fit(max_steps, ckpt_path=None):
        torch.manual_seed(0)
        model = TinyClassifier(lr=0.1)
        ew, rollback, weights = EarlyWarning(), Rollback(every=2, skip_steps=0), StepWeights()
        script = ScriptedSource({3: "warning", 10: "critical"})
        cbs = [LossMonitor(), ew, script, rollback, weights]
        t = trainer(max_steps=max_steps, max_epochs=-1, callbacks=cbs)
        t.fit(model, loader(classification_data(32), shuffle=False), ckpt_path=ckpt_path)
        return t, ew, rollback, weights

    _, full_ew, full, full_weights = fit(14)
    assert [e.details["to_step"] for e in full.events] == [0.0]
    first, _, _, _ = fit(6)
    path = tmp_path / "with-band.ckpt"
    first.save_checkpoint(path)
    torch.load(path, weights_only=True)  # the saved bands are checkpoint-safe
    _, ew, resumed, weights = fit(14, ckpt_path=str(path))
    assert [(e.step, e.message) for e in resumed.events] == [
        (e.step, e.message) for e in full.events
    ]
    assert ew.monitor.band.state_dict() == full_ew.monitor.band.state_dict()
    for step in range(7, 15):
        assert torch.equal(weights.weights[step], full_weights.weights[step]), step
