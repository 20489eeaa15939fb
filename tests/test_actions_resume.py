"""Resuming a backed-off, escalated run continues with the same learning rates and stage."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyClassifier, classification_data, loader, trainer
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
