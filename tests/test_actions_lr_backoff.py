"""LRBackoff in real Trainer runs: cuts, cooldown, bound, floor, recovery, schedulers, DDP."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DumpOnFitEnd,
    TinyClassifier,
    classification_data,
    ddp_trainer,
    flat_weights,
    load_ranks,
    loader,
    trainer,
)
from test_actions_events import LrRecorder, ScriptedSource

from lightning_stability.actions import LRBackoff


def _fit(action, script, max_steps=12, model=None, **kw):
    rec = LrRecorder()
    t = trainer(max_steps=max_steps, callbacks=[ScriptedSource(script), action, rec], **kw)
    t.fit(model or TinyClassifier(lr=0.1), loader(classification_data(256), shuffle=False))
    return rec.lrs, t


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor": 1.0}, "factor"),
        ({"factor": 0.0}, "factor"),
        ({"factor": -0.5}, "factor"),
        ({"cooldown": -1}, "cooldown"),
        ({"max_backoffs": -1}, "max_backoffs"),
        ({"min_lr": -1.0}, "min_lr"),
        ({"patience": 0}, "patience"),
        ({"level": "loud"}, "level"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRBackoff(**kwargs)


def test_cooldown_and_max_backoffs():
    action = LRBackoff(cooldown=3, max_backoffs=2)
    lrs, _ = _fit(action, {2: "warning", 3: "warning", 5: "warning", 6: "critical", 9: "warning"})
    # step 2 cuts; 3 and 5 fall in the cooldown; 6 cuts; 9 exceeds max_backoffs.
    assert lrs[2] == pytest.approx(0.05)
    assert lrs[5] == pytest.approx(0.05)
    assert lrs[6] == pytest.approx(0.025)
    assert lrs[12] == pytest.approx(0.025)
    assert [e.step for e in action.events] == [2, 6]
    assert action.events[0].source == "lr_backoff"


def test_watch_events_below_level_do_nothing_and_min_lr_floors():
    action = LRBackoff(min_lr=0.03)
    lrs, _ = _fit(action, {2: "watch", 3: "warning", 4: "warning", 5: "warning"})
    assert lrs[2] == pytest.approx(0.1)
    assert lrs[3] == pytest.approx(0.05)
    assert lrs[4] == pytest.approx(0.03)  # floored, not 0.025
    assert lrs[5] == pytest.approx(0.03)
    assert action.backoffs == 2


def test_recovery_ramps_back_geometrically_never_above():
    action = LRBackoff(factor=0.25, patience=2, recovery_steps=4)
    lrs, _ = _fit(action, {2: "warning"}, max_steps=12)
    assert lrs[2] == pytest.approx(0.025)
    assert lrs[3] == pytest.approx(0.025)  # 1 calm step < patience
    # ramp starts at step 4: 0.25 ** (3/4, 2/4, 1/4, 0)
    for k, step in enumerate(range(4, 8), start=1):
        assert lrs[step] == pytest.approx(0.1 * 0.25 ** (1 - k / 4), rel=1e-12)
    assert max(lrs.values()) <= 0.1 * (1 + 1e-12)
    assert lrs[12] == pytest.approx(0.1, rel=1e-12)


def test_trouble_after_a_ramp_caps_later_ramps_at_the_cut():
    action = LRBackoff(factor=0.25, patience=2, recovery_steps=4)
    lrs, _ = _fit(action, {2: "warning", 9: "warning", 14: "warning"}, max_steps=24)
    assert lrs[7] == pytest.approx(0.1, rel=1e-12)  # the first ramp reached 1.0
    # step 9: the ramped learning rate proved too high: cut, and 0.25 becomes the ceiling
    assert lrs[9] == pytest.approx(0.025)
    assert action.ceiling == [[pytest.approx(0.25)]]
    assert lrs[13] == pytest.approx(0.025)  # calm, but already at the ceiling
    # step 14 cuts below the ceiling without a ramp in between: the ceiling stays, and the
    # next ramp climbs back to it (steps 16-19), not to 1.0
    assert lrs[14] == pytest.approx(0.1 * 0.25**2)
    assert lrs[19] == pytest.approx(0.025, rel=1e-12)
    assert max(v for k, v in lrs.items() if k >= 9) <= 0.025 * (1 + 1e-12)


class _Scheduled(TinyClassifier):
    def __init__(self, kind: str) -> None:
        super().__init__(lr=0.1)
        self.kind = kind

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        S = torch.optim.lr_scheduler
        if self.kind == "onecycle":
            sched = S.OneCycleLR(opt, max_lr=self.lr, total_steps=40)
        elif self.kind == "lambda":
            sched = S.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
        else:
            sched = S.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("kind", ["onecycle", "lambda", "step"])
def test_cut_survives_the_trainers_scheduler(kind):
    """Same run with and without a WARNING at step 4: from then on the lr is exactly
    half of the reference run's, while the scheduler keeps stepping."""
    lrs, _ = _fit(LRBackoff(), {4: "warning"}, max_steps=15, model=_Scheduled(kind))
    ref, _ = _fit(LRBackoff(), {}, max_steps=15, model=_Scheduled(kind))
    assert lrs[3] == ref[3]
    for step in range(4, 16):
        assert lrs[step] == pytest.approx(0.5 * ref[step], rel=1e-12)


def _lr_and_weights(trainer, pl_module):
    return {
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "weights": flat_weights(pl_module),
        "backoffs": trainer.callbacks[1].backoffs,
    }


@pytest.mark.ddp
def test_warning_on_one_rank_cuts_on_both(tmp_path):
    source = ScriptedSource({3: "warning"}, ranks=(1,))
    t = ddp_trainer(
        max_steps=6, callbacks=[source, LRBackoff(), DumpOnFitEnd(tmp_path, _lr_and_weights)]
    )
    t.fit(TinyClassifier(lr=0.1), loader(classification_data(), shuffle=False))
    r0, r1 = load_ranks(tmp_path)
    assert r0["lr"] == r1["lr"] == pytest.approx(0.05)
    assert r0["backoffs"] == r1["backoffs"] == 1
    assert torch.equal(r0["weights"], r1["weights"])
