"""LRBackoff in real Trainer runs: cuts, cooldown, bound, floor, recovery, schedulers, DDP."""

from __future__ import annotations

import math

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
from lightning.pytorch.callbacks import Callback
from test_actions_events import LrRecorder, ScriptedSource

from lightning_stability.actions import LRBackoff


def _fit(action, script, max_steps=12, model=None, extra=(), **kw):
    rec = LrRecorder()
    callbacks = [ScriptedSource(script), action, rec, *extra]
    t = trainer(max_steps=max_steps, callbacks=callbacks, **kw)
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
        ({"calm_steps": 0}, "calm_steps"),
        ({"level": "loud"}, "level"),
        ({"lr_memory": 0}, "lr_memory"),
        ({"ineffective_cuts": 0}, "ineffective_cuts"),
        ({"ineffective_cuts": 1.5}, "ineffective_cuts"),
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
    action = LRBackoff(factor=0.25, calm_steps=2, recovery_steps=4)
    lrs, _ = _fit(action, {2: "warning", 3: "ok"}, max_steps=12)
    assert lrs[2] == pytest.approx(0.025)
    assert lrs[3] == pytest.approx(0.025)  # 1 calm step < patience
    # ramp starts at step 4: 0.25 ** (3/4, 2/4, 1/4, 0)
    for k, step in enumerate(range(4, 8), start=1):
        assert lrs[step] == pytest.approx(0.1 * 0.25 ** (1 - k / 4), rel=1e-12)
    assert max(lrs.values()) <= 0.1 * (1 + 1e-12)
    assert lrs[12] == pytest.approx(0.1, rel=1e-12)


def test_trouble_after_a_ramp_caps_the_next_ramp_then_probes_higher():
    action = LRBackoff(factor=0.5, calm_steps=2, recovery_steps=2)
    script = {2: "warning", 3: "ok", 7: "warning", 8: "warning", 9: "ok"}
    lrs, _ = _fit(action, script, max_steps=16)
    assert lrs[2] == pytest.approx(0.05)
    # calm steps 3-4, ramp at 4-5 back to 1.0 (the ceiling is still 1.0)
    assert lrs[4] == pytest.approx(0.1 * 0.5**0.5, rel=1e-12)
    assert lrs[5] == pytest.approx(0.1, rel=1e-12)
    # step 7: trouble after the ramp: cut, and 0.5 becomes the ceiling; step 8 cuts again
    assert lrs[7] == pytest.approx(0.05)
    assert lrs[8] == pytest.approx(0.025)
    # calm 9-10, ramp at 10-11 up to the ceiling only (without it: 0.05, then 0.1)
    assert lrs[10] == pytest.approx(0.1 * (0.25 * 0.5) ** 0.5, rel=1e-12)
    assert lrs[11] == pytest.approx(0.05, rel=1e-12)
    assert lrs[12] == pytest.approx(0.05, rel=1e-12)
    # calm 12-13 at the ceiling, then a probe one factor higher: ramp at 13-14 to 1.0
    assert lrs[13] == pytest.approx(0.1 * 0.5**0.5, rel=1e-12)
    assert lrs[14] == pytest.approx(0.1, rel=1e-12)
    assert max(lrs.values()) <= 0.1 * (1 + 1e-12)
    assert action.ceiling == [[1.0]]


def test_a_critical_cut_becomes_the_ceiling_and_probes_climb_back_in_stages():
    action = LRBackoff(factor=0.5, calm_steps=2, recovery_steps=2)
    lrs, _ = _fit(action, {2: "critical", 3: "warning", 4: "ok"}, max_steps=12)
    # steps 2 and 3 cut to 0.25x; the critical at 2 set the ceiling to 0.5x, and the
    # warning at 3 (no ramp in between) leaves it
    assert lrs[3] == pytest.approx(0.025)
    # calm 4-5, ramp at 5-6 up to the ceiling 0.5x (without it: 0.05, then 0.1)
    assert lrs[5] == pytest.approx(0.1 * 0.125**0.5, rel=1e-12)
    assert lrs[6] == pytest.approx(0.05, rel=1e-12)
    assert lrs[7] == pytest.approx(0.05, rel=1e-12)
    # calm 7-8 at the ceiling, then the probe: ramp at 8-9 to 1.0
    assert lrs[8] == pytest.approx(0.1 * 0.5**0.5, rel=1e-12)
    assert lrs[9] == pytest.approx(0.1, rel=1e-12)


def test_no_ramp_while_the_level_stays_high_without_new_events():
    # An event marks a change of level: after the warning at 2 the sources stay at
    # WARNING, silently, until the OK at 8. Only then do calm steps count.
    action = LRBackoff(factor=0.5, calm_steps=2, recovery_steps=2)
    lrs, _ = _fit(action, {2: "warning", 8: "ok"}, max_steps=14)
    assert all(lrs[s] == pytest.approx(0.05) for s in range(2, 9))
    # calm steps 8-9: ramp at 9-10 back to 1.0
    assert lrs[9] == pytest.approx(0.1 * 0.5**0.5, rel=1e-12)
    assert lrs[10] == pytest.approx(0.1, rel=1e-12)
    # without the OK, the same script never ramps
    held = LRBackoff(factor=0.5, calm_steps=2, recovery_steps=2)
    lrs, _ = _fit(held, {2: "warning"}, max_steps=14)
    assert all(lrs[s] == pytest.approx(0.05) for s in range(2, 15))


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
    # without the memory of rises: the warm-ups here would otherwise be held (see below)
    lrs, _ = _fit(LRBackoff(lr_memory=None), {4: "warning"}, max_steps=15, model=_Scheduled(kind))
    ref, _ = _fit(LRBackoff(lr_memory=None), {}, max_steps=15, model=_Scheduled(kind))
    assert lrs[3] == ref[3]
    for step in range(4, 16):
        assert lrs[step] == pytest.approx(0.5 * ref[step], rel=1e-12)


class _Jumping(TinyClassifier):
    """lr 0.1, x10 at step 5, then rising 10% per step (a broken warm-up)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        rule = lambda s: 1.0 if s < 5 else 10.0 * 1.1 ** (s - 5)  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, rule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_trouble_after_a_rise_goes_back_to_the_calm_rate_and_holds_it():
    action = LRBackoff(factor=0.5)
    lrs, _ = _fit(action, {7: "warning"}, max_steps=14, model=_Jumping())
    ref, _ = _fit(LRBackoff(), {}, max_steps=14, model=_Jumping())
    assert lrs[6] == pytest.approx(ref[6]) and ref[6] > 1.0
    # not one factor (0.5x the risen rate) but back to the rate before the rise, held
    # there while the schedule keeps rising
    for step in range(7, 15):
        assert lrs[step] == pytest.approx(0.1, rel=1e-9)
    assert action.rise_step == 7 and action.backoffs == 1
    assert "before a rise" in action.events[0].message


class _OneGroupJumps(TinyClassifier):
    """Two param groups at lr 0.1: the first jumps x10 at step 5, the second stays."""

    def configure_optimizers(self):
        first, second = self.net[0], self.net[-1]
        opt = torch.optim.SGD(
            [{"params": first.parameters()}, {"params": second.parameters()}], lr=0.1
        )
        rules = [lambda s: 1.0 if s < 5 else 10.0, lambda s: 1.0]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, rules)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_only_the_group_whose_rate_rose_is_held():
    action = LRBackoff(factor=0.5)
    _fit(action, {7: "warning"}, max_steps=9, model=_OneGroupJumps())
    # the first group goes back to its calm 0.1 and is held there; the second, which did
    # not rise, is cut by one factor and not held
    assert action.scales[0] == pytest.approx([0.1, 0.5])
    assert action.caps[0][0] == pytest.approx(0.1) and action.caps[0][1] == math.inf


class _WarmUpFromNearZero(TinyClassifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 1000))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_one_cut_after_a_rise_goes_down_at_most_factor_to_the_fourth():
    # at step 40 the warm-up's rate is 41x its lowest in the window: the cut stops at 1/16
    action = LRBackoff(factor=0.5)
    lrs, _ = _fit(action, {40: "warning"}, max_steps=42, model=_WarmUpFromNearZero())
    ref, _ = _fit(LRBackoff(), {}, max_steps=42, model=_WarmUpFromNearZero())
    assert lrs[40] == pytest.approx(ref[40] / 16, rel=1e-9)
    assert action.rise_step == 40


def test_a_held_rate_is_probed_higher_by_one_factor_after_calm():
    action = LRBackoff(factor=0.5, calm_steps=2, recovery_steps=2)
    lrs, _ = _fit(action, {7: "warning", 8: "ok"}, max_steps=16, model=_Jumping())
    assert lrs[8] == pytest.approx(0.1, rel=1e-9)
    # calm 8-9, then the probe: ramp at 9-10 to twice the held rate, never beyond it
    # while the schedule keeps rising
    assert 0.1 < lrs[9] < 0.2
    for step in (10, 11):
        assert lrs[step] == pytest.approx(0.2, rel=1e-9)
    assert lrs[13] == pytest.approx(0.4, rel=1e-9)


def test_a_steady_rate_is_cut_by_one_factor_as_before():
    # constant schedule: no rise, so the memory changes nothing
    with_memory, _ = _fit(LRBackoff(), {3: "warning", 6: "warning"})
    without, _ = _fit(LRBackoff(lr_memory=None), {3: "warning", 6: "warning"})
    assert with_memory == without
    assert with_memory[6] == pytest.approx(0.025)


def test_the_memory_of_rises_survives_a_resume(tmp_path):
    def run(max_steps, ckpt=None):
        torch.manual_seed(0)
        rec, action = LrRecorder(), LRBackoff()
        t = trainer(max_steps=max_steps, callbacks=[ScriptedSource({7: "warning"}), action, rec])
        t.fit(_Jumping(), loader(classification_data(256), shuffle=False), ckpt_path=ckpt)
        return rec.lrs, action, t

    whole, _, _ = run(10)
    _, _, first = run(6)  # stops after the rise, before the warning
    path = tmp_path / "mid.ckpt"
    first.save_checkpoint(path)
    resumed, action, _ = run(10, ckpt=str(path))
    # without the remembered rates before step 6 the warning would cut one factor only
    assert resumed[7] == pytest.approx(whole[7]) == pytest.approx(0.1)
    assert resumed[10] == pytest.approx(whole[10])
    assert action.rise_step == 7


class _Drifting(TinyClassifier):
    """A training loss that grows (``trend`` > 0) or shrinks with the step whatever the
    learning rate, as when the data moves."""

    def __init__(self, trend: float) -> None:
        super().__init__(lr=0.1)
        self.trend = trend

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        step = float(self.trainer.global_step)
        return loss + (0.05 * step if self.trend > 0 else 5.0 / (1.0 + 0.1 * step))


@pytest.mark.parametrize("trend", [1.0, -1.0])
def test_cuts_that_leave_the_loss_where_it_was_are_not_repeated(trend):
    script = {20: "warning", 40: "warning", 60: "warning", 70: "warning", 80: "critical"}
    action = LRBackoff()
    lrs, _ = _fit(action, script, max_steps=82, model=_Drifting(trend))
    assert lrs[20] == pytest.approx(0.05) and lrs[40] == pytest.approx(0.025)
    if trend > 0:
        # two cuts, and the loss at 60 is above the loss at the first: no more WARNING
        # cuts (said once); the critical event still cuts
        assert lrs[60] == pytest.approx(0.025) and lrs[79] == pytest.approx(0.025)
        assert lrs[80] == pytest.approx(0.0125)
        declined = [e for e in action.events if "not cut further" in e.message]
        assert [e.step for e in declined] == [60]
    else:
        assert lrs[60] == pytest.approx(0.0125) and lrs[70] == pytest.approx(0.00625)
        assert not any("not cut further" in e.message for e in action.events)
    # without the rule every event cuts
    plain = LRBackoff(ineffective_cuts=None)
    lrs, _ = _fit(plain, script, max_steps=82, model=_Drifting(trend))
    assert lrs[80] == pytest.approx(0.1 * 0.5**5)


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


def test_a_ramp_that_meets_the_held_rate_early_waits_calm_steps_before_the_next_probe():
    """The schedule keeps rising 10% a step, so a ramp towards the ceiling meets the held
    rate long before its ``recovery_steps``: the ramp is over there, and the next probe
    (twice the held rate) waits ``calm_steps`` calm steps at it, as every probe does."""
    action = LRBackoff(factor=0.5, calm_steps=2, recovery_steps=20)
    lrs, _ = _fit(action, {7: "warning", 8: "ok"}, max_steps=30, model=_Jumping())
    assert lrs[8] == pytest.approx(0.1, rel=1e-9)
    first = min(s for s in lrs if s > 8 and lrs[s] >= 0.2 * (1 - 1e-9))
    second = min(s for s in lrs if s > 8 and lrs[s] >= 0.4 * (1 - 1e-9))
    for step in range(first, first + 2):  # held from the step it met 0.2 until 2 calm steps
        assert lrs[step] == pytest.approx(0.2, rel=1e-9)
    assert second >= first + 3
    assert lrs[30] < 2 * 0.8


class _Restarting(TinyClassifier):
    """lr 0.1, x10 at step 5; from step 8 the schedule starts again from 0.01x and rises
    30% a step (a warm-up restarted, as a rollback restarts it)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        rule = lambda s: 1.0 if s < 5 else 10.0 if s < 8 else 0.01 * 1.3 ** (s - 8)  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, rule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_a_held_rate_is_kept_while_the_schedule_rises_towards_it():
    """After the rise at step 5 the rate is held at 0.1. The restarted schedule is below
    it when the calm check comes, but rising: the held rate stays (probed higher one
    factor per calm period) instead of being dropped, and the rate never passes it."""
    action = LRBackoff(factor=0.5, calm_steps=2, recovery_steps=2)
    caps = {}

    class Caps(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            caps[trainer.global_step] = action.caps[0][0]

    lrs, _ = _fit(
        action, {7: "warning", 8: "ok"}, max_steps=30, model=_Restarting(), extra=[Caps()]
    )
    for step in range(8, 31):
        assert caps[step] < math.inf, step
        assert lrs[step] <= caps[step] * (1 + 1e-9), step


def test_each_probe_that_fails_doubles_the_wait_before_the_next():
    """A cut at 5; calm, the ramp back reaches 1.0 at step 9; trouble at 11 follows that
    ramp, so 0.5 becomes the ceiling and the next probe waits 2 * calm_steps calm steps;
    trouble after that probe doubles the wait again, and a probe that holds resets it."""
    action = LRBackoff(factor=0.5, calm_steps=2, recovery_steps=2)
    failed = {}

    class Failed(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            failed[trainer.global_step] = action.failed_probes

    script = {5: "warning", 6: "ok", 11: "warning", 12: "ok", 18: "warning", 19: "ok"}
    lrs, _ = _fit(action, script, max_steps=40, extra=[Failed()])
    assert lrs[5] == pytest.approx(0.05) and lrs[9] == pytest.approx(0.1)
    assert lrs[11] == pytest.approx(0.05) and failed[11] == 1
    # the first ramp began after 2 calm steps (6, 7); calm from step 12, the probe
    # begins after 4 (12-15)
    assert lrs[7] > 0.05
    assert all(lrs[s] == pytest.approx(0.05) for s in range(11, 15))
    assert lrs[15] > 0.05 and lrs[16] == pytest.approx(0.1)
    # trouble after that probe: 8 calm steps (19-26) before the next
    assert failed[18] == 2
    assert all(lrs[s] == pytest.approx(0.05) for s in range(18, 26))
    assert lrs[26] > 0.05 and lrs[27] == pytest.approx(0.1)
    # that probe held: after 2 calm steps at 1.0 the count is reset
    assert failed[30] == 0 and lrs[40] == pytest.approx(0.1)
