"""Rollback: bit-identical restore of the proven-good snapshot step, NaN recovery, clean
stop."""

from __future__ import annotations

import copy
import os

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
from test_actions_events import LrRecorder, NonFiniteLossSource, ScriptedSource
from torch.utils.data import TensorDataset

from lightning_stability.actions import LRBackoff, Rollback, StagedTraining
from lightning_stability.warning.events import Level


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
        ({"backoff_factor": 1.5}, "backoff_factor"),
        ({"calm_below": "fine"}, "calm_below"),
        ({"skip_steps": -1}, "skip_steps"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rollback(**kwargs)


class StateRecorder(Callback):
    """Weights and optimizer state after every step (placed before Rollback), and right
    after the rollback step (``after``, placed after it)."""

    def __init__(self) -> None:
        self.states: dict[int, tuple] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.states[int(trainer.global_step)] = (flat_weights(pl_module), opt)


def _same_optimizer_state(a, b) -> bool:
    if a["state"].keys() != b["state"].keys():
        return False
    for k in a["state"]:
        for name, value in a["state"][k].items():
            if not torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][k][name])):
                return False
    return True


def test_restores_bit_identical_weights_and_optimizer_state():
    before, after = StateRecorder(), StateRecorder()
    rollback = Rollback(every=3, backoff_factor=0.5)
    cbs = [ScriptedSource({8: "critical"}), before, rollback, after]
    t = trainer(max_steps=10, callbacks=cbs)
    model = TinyClassifier(lr=0.01, opt="adam")
    t.fit(model, loader(classification_data(512), shuffle=False))
    # Step 6 is the latest snapshot but still unproven (pending); step 3 was promoted to
    # good at step 6 after a calm interval, so that is where the run goes back to.
    weights_3, opt_3 = before.states[3]
    weights_8, opt_8 = after.states[8]
    assert torch.equal(weights_8, weights_3)
    assert not torch.equal(before.states[8][0], weights_3)
    assert not torch.equal(before.states[6][0], weights_3)
    assert _same_optimizer_state(opt_8, opt_3)
    assert not _same_optimizer_state(before.states[8][1], opt_3)
    assert opt_8["param_groups"][0]["lr"] == pytest.approx(0.005)
    assert rollback.rollbacks == 1 and rollback.events[0].source == "rollback"
    assert rollback.events[0].details["to_step"] == 3.0


class InitialWeights(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = flat_weights(pl_module)


@pytest.mark.parametrize(
    ("script", "to_step"),
    [
        # A warning in the interval after step 3 keeps it from being promoted at step 6;
        # step 6 is promoted at step 9 after a calm interval.
        ({4: "warning", 5: "ok", 10: "critical"}, 6),
        # No calm interval completed since the warning: only the starting state is good.
        ({4: "warning", 5: "ok", 8: "critical"}, 0),
        # Calm throughout: the previous snapshot (promoted at step 9), not step 9 itself.
        ({10: "critical"}, 6),
    ],
)
def test_only_a_snapshot_followed_by_a_calm_interval_is_restored(script, to_step):
    before, after, initial = StateRecorder(), StateRecorder(), InitialWeights()
    rollback = Rollback(every=3)
    t = trainer(max_steps=11, callbacks=[ScriptedSource(script), initial, before, rollback, after])
    model = TinyClassifier(lr=0.05)
    t.fit(model, loader(classification_data(512), shuffle=False))
    expected = initial.weights if to_step == 0 else before.states[to_step][0]
    crit = max(script)
    assert torch.equal(after.states[crit][0], expected)
    assert rollback.events[0].details["to_step"] == float(to_step)


def _data_with_nan_batches(nan_batches: tuple[int, ...], batch_size: int = 32):
    ds = classification_data(512)
    x = ds.tensors[0].clone()
    for b in nan_batches:
        x[b * batch_size : (b + 1) * batch_size] = float("nan")
    return TensorDataset(x, ds.tensors[1])


@pytest.mark.parametrize("escalation", ["own_factor", "lr_backoff", "staged"])
def test_planted_nan_batch_run_finishes_with_finite_weights(escalation):
    extra = {"own_factor": [], "lr_backoff": [LRBackoff()], "staged": [StagedTraining()]}
    rollback = Rollback(every=2, nonfinite_loss=False)  # only the source reports it
    cbs = [NonFiniteLossSource(), *extra[escalation], rollback]
    t = trainer(max_steps=12, callbacks=cbs)
    model = TinyClassifier(lr=0.1)
    t.fit(model, loader(_data_with_nan_batches((5,)), shuffle=False))
    assert t.global_step == 12
    assert torch.isfinite(flat_weights(model)).all()
    assert rollback.rollbacks == 1
    lr = t.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.05)  # one cut (default stage 1 is also 0.5x)
    if escalation == "staged":
        assert extra["staged"][0].stage == 1


def test_skipping_under_clipping_by_value_does_not_end_the_run():
    rollback = Rollback(every=2, skip_steps=3)
    t = trainer(
        max_steps=12,
        callbacks=[ScriptedSource({}), rollback],
        gradient_clip_val=0.05,
        gradient_clip_algorithm="value",
    )
    model = TinyClassifier(lr=0.1)
    t.fit(model, loader(_data_with_nan_batches((5,)), shuffle=False))
    assert t.global_step == 12
    assert rollback.rollbacks == 1 and rollback.skipped == 3
    assert torch.isfinite(flat_weights(model)).all()


def test_nonfinite_loss_is_critical_without_a_source_saying_so():
    rollback = Rollback(every=2)
    t = trainer(max_steps=12, callbacks=[ScriptedSource({}), rollback])
    model = TinyClassifier(lr=0.1)
    t.fit(model, loader(_data_with_nan_batches((5,)), shuffle=False))
    assert torch.isfinite(flat_weights(model)).all()
    assert rollback.rollbacks == 1


def test_after_max_rollbacks_the_run_goes_on_and_other_actions_respond(tmp_path):
    """NaN batches 3, 5 and 7: the first two are rolled back; the third finds
    max_rollbacks=2 reached, is recorded with one warning and left to LRBackoff; the run
    reaches max_steps and no stop checkpoint is written."""
    backoff = LRBackoff()
    rollback = Rollback(every=2, max_rollbacks=2, skip_steps=0, nonfinite_loss=False)
    t = trainer(
        max_steps=14,
        default_root_dir=str(tmp_path),
        callbacks=[NonFiniteLossSource(), backoff, rollback],
    )
    with pytest.warns(UserWarning, match="max_rollbacks=2 reached") as caught:
        t.fit(TinyClassifier(lr=0.1), loader(_data_with_nan_batches((3, 5, 7)), shuffle=False))
    assert t.global_step == 14 and not t.should_stop
    assert len([w for w in caught if "Rollback" in str(w.message)]) == 1
    assert rollback.rollbacks == 2
    # the later critical events (the weights are NaN from step 8) are not recorded again
    assert [e.step for e in rollback.events] == [4, 6, 8]
    assert "not rolled back" in rollback.events[2].message
    assert "Training goes on" in rollback.events[2].message
    # LRBackoff answers every critical event itself, the third and later ones included
    assert [e.step for e in backoff.events][:4] == [4, 6, 8, 9]
    assert os.listdir(tmp_path) == []


def test_max_rollbacks_zero_never_rolls_back():
    rollback = Rollback(every=2, max_rollbacks=0)
    after = StateRecorder()
    t = trainer(max_steps=12, callbacks=[ScriptedSource({}), rollback, after])
    with pytest.warns(UserWarning, match="max_rollbacks=0"):
        t.fit(TinyClassifier(lr=0.1), loader(_data_with_nan_batches((5,)), shuffle=False))
    assert t.global_step == 12 and rollback.rollbacks == 0 and rollback.skipped == 0
    assert not torch.isfinite(after.states[12][0]).all()  # the user's limit, honoured


def test_the_declined_limit_survives_a_resume(tmp_path):
    rollback = Rollback(every=2, max_rollbacks=0)
    t = trainer(max_steps=8, callbacks=[ScriptedSource({}), rollback])
    with pytest.warns(UserWarning, match="max_rollbacks=0"):
        t.fit(TinyClassifier(lr=0.1), loader(_data_with_nan_batches((5,)), shuffle=False))
    state = rollback.state_dict()
    again = Rollback(every=2, max_rollbacks=0)
    again.load_state_dict(state)
    assert again._declined == ["max_rollbacks=0 reached"]


def test_rollback_keeps_the_history_of_earlier_actions():
    backoff = LRBackoff()
    rollback = Rollback(every=3)
    cbs = [ScriptedSource({7: "warning", 11: "critical"}), backoff, rollback]
    t = trainer(max_steps=12, callbacks=cbs)
    t.fit(TinyClassifier(lr=0.1), loader(classification_data(512), shuffle=False))
    # The snapshot is from step 3, before both cuts. The weights go back to it; the cuts
    # at steps 7 and 11 are kept, and the critical event already had its cut at step 11,
    # so the rollback adds none.
    log = [(e.step, e.message) for e in backoff.events]
    assert [step for step, _ in log] == [7, 11]
    assert "(WARNING event)" in log[0][1]
    assert "(CRITICAL event)" in log[1][1]
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    assert backoff.backoffs == 2
    assert rollback.rollbacks == 1
    assert "learning rate backed off" in rollback.events[0].message


def test_a_burst_of_bad_batches_is_skipped_not_rolled_back_again():
    """Batches 5-8 are NaN. Batch 5 triggers the rollback at step 6; batches 6-8 arrive
    while the next ``skip_steps`` updates are skipped, so each extends the skip instead of
    rolling back again; no update is applied until the skip ends."""
    after = StateRecorder()
    rollback = Rollback(every=2, skip_steps=5)
    t = trainer(max_steps=20, callbacks=[ScriptedSource({}), rollback, after])
    model = TinyClassifier(lr=0.1)
    t.fit(model, loader(_data_with_nan_batches((5, 6, 7, 8)), shuffle=False))
    assert rollback.rollbacks == 1
    assert torch.isfinite(flat_weights(model)).all()
    # the last bad batch is step 9; the skip then runs through step 14
    restored = after.states[6][0]
    for step in range(7, 15):
        assert torch.equal(after.states[step][0], restored), step
    assert not torch.equal(after.states[15][0], restored)
    assert rollback.skipped == 8
    extensions = [e for e in rollback.events if "while skipping" in e.message]
    assert [e.step for e in extensions] == [7, 8, 9]


def _data_with_nan_then_wrong_batches(nan_batch: int, wrong_from: int, batch_size: int = 32):
    """Batch ``nan_batch`` is NaN; from ``wrong_from`` on, inputs are x1000 (saturating the
    tanh layer, so predictions are confident) and every label is shifted to another class."""
    ds = classification_data(2048)
    x, y = ds.tensors[0].clone(), ds.tensors[1].clone()
    x[nan_batch * batch_size : (nan_batch + 1) * batch_size] = float("nan")
    x[wrong_from * batch_size :] *= 1000.0
    y[wrong_from * batch_size :] = (y[wrong_from * batch_size :] + 1) % 3
    return TensorDataset(x, y)


def test_a_critical_while_the_skipped_loss_grows_ends_the_skip():
    """Batch 30 is NaN: rollback at step 31 to step 25, skipping steps 32-36. Batch 31 is
    ordinary; from batch 32 on the labels are wrong and confidently mispredicted, so the
    restored weights' loss grows past twice the first skipped batch's. The critical event
    at step 34 ends the skip and training resumes from the restored weights; the one at
    step 36 would return to the same state, so it only cuts the learning rate."""
    rollback = Rollback(every=5, skip_steps=5, skip_growth=2.0)
    after = StateRecorder()
    script = {34: "critical", 36: "critical"}
    t = trainer(max_steps=38, callbacks=[ScriptedSource(script), rollback, after])
    data = _data_with_nan_then_wrong_batches(30, 32)
    t.fit(TinyClassifier(lr=0.1), loader(data, shuffle=False))
    assert rollback.rollbacks == 1
    assert [e.step for e in rollback.events] == [31, 34, 36]
    assert "no refuge" in rollback.events[1].message
    assert "not rolled back" in rollback.events[2].message
    restored = after.states[31][0]
    assert torch.equal(after.states[34][0], restored)  # steps 32-34 were skipped
    assert not torch.equal(after.states[35][0], restored)  # then training resumed
    assert not torch.equal(after.states[37][0], restored)  # and step 36 restored nothing
    # 0.1 halved by the rollback at 31 and again at 36
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)


def test_without_skip_growth_a_critical_while_skipping_extends_the_skip():
    rollback = Rollback(every=5, skip_steps=5, skip_growth=None)
    t = trainer(max_steps=37, callbacks=[ScriptedSource({34: "critical"}), rollback])
    t.fit(TinyClassifier(lr=0.1), loader(_data_with_nan_then_wrong_batches(30, 32), shuffle=False))
    assert rollback.rollbacks == 1
    assert [e.step for e in rollback.events if "while skipping" in e.message] == [34]


@pytest.mark.parametrize("value", [1.0, 0.5, True, "2"])
def test_skip_growth_must_exceed_one(value):
    with pytest.raises(ValueError, match="skip_growth"):
        Rollback(skip_growth=value)


def test_skipping_can_be_turned_off():
    after = StateRecorder()
    rollback = Rollback(every=2, skip_steps=0)
    t = trainer(max_steps=10, callbacks=[ScriptedSource({}), rollback, after])
    t.fit(TinyClassifier(lr=0.1), loader(_data_with_nan_batches((5,)), shuffle=False))
    assert rollback.rollbacks == 1 and rollback.skipped == 0
    assert not torch.equal(after.states[7][0], after.states[6][0])


def _rollback_state(trainer, pl_module):
    rollback = next(cb for cb in trainer.callbacks if isinstance(cb, Rollback))
    return {
        "rollbacks": rollback.rollbacks,
        "skipped": rollback.skipped,
        "skip_losses": list(rollback._skip_losses),
        "messages": [e.message for e in rollback.events],
        "weights": flat_weights(pl_module),
    }


@pytest.mark.ddp
def test_ddp_ranks_roll_back_skip_and_judge_the_skipped_loss_identically(tmp_path):
    """A critical event on rank 1 only rolls both ranks back; the skipped batches' loss is
    averaged over ranks, so a second critical event on rank 0 only is judged the same way
    on both (here it extends the skip), and the weights stay identical."""
    source = ScriptedSource({3: "critical"}, ranks=(1,))
    other = ScriptedSource({5: "critical"}, ranks=(0,))
    rollback = Rollback(every=2, skip_steps=3)
    dump = DumpOnFitEnd(tmp_path, _rollback_state)
    t = ddp_trainer(max_steps=10, callbacks=[source, other, rollback, dump])
    t.fit(TinyClassifier(lr=0.1), loader(classification_data(), shuffle=False))
    r0, r1 = load_ranks(tmp_path)
    assert r0["rollbacks"] == r1["rollbacks"] == 1
    assert r0["skipped"] == r1["skipped"] == 5  # steps 3-4, then 5-7 after the extension
    assert r0["skip_losses"] == r1["skip_losses"] and len(r0["skip_losses"]) == 2
    assert r0["messages"] == r1["messages"] and "while skipping" in r0["messages"][1]
    assert torch.equal(r0["weights"], r1["weights"])


def test_a_rollback_never_loosens_the_stage():
    """WARNINGs climb the ladder to stage 3 after the step-0 snapshot; the CRITICAL that rolls
    back must not return to that snapshot's stage 0 (+1): it keeps stage 3 and its lower
    learning rate."""
    staged = StagedTraining(cooldown=0)
    rollback = Rollback(every=100)  # only the initial snapshot exists
    script = {10: "warning", 12: "warning", 14: "warning", 30: "critical"}
    t = trainer(max_steps=32, callbacks=[ScriptedSource(script), staged, rollback])
    model = TinyClassifier(lr=0.1)
    t.fit(model, loader(classification_data(), shuffle=False))
    assert rollback.rollbacks == 1
    assert staged.stage == 3  # the top of the default ladder: the rollback's escalation is a no-op
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1)
    assert t.gradient_clip_val == 0.25 and t.accumulate_grad_batches == 4


class _Jumping(TinyClassifier):
    """lr 0.05, x10 from step 7 on (a broken warm-up)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 7 else 10.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("jump", [True, False])
def test_a_warning_after_a_rise_of_the_rate_rolls_back_before_it(jump):
    """A WARNING that LRBackoff puts down to a rise of the learning rate rolls the weights
    back to the good state before the rise; the same WARNING without a rise does not."""
    before, after = StateRecorder(), StateRecorder()
    backoff, rollback = LRBackoff(), Rollback(every=3)
    cbs = [ScriptedSource({9: "warning"}), before, backoff, rollback, after]
    t = trainer(max_steps=16, callbacks=cbs)
    model = _Jumping() if jump else TinyClassifier(lr=0.05)
    t.fit(model, loader(classification_data(512), shuffle=False))
    if jump:
        # step 3 is the good state (promoted at 6, calm since); 6 was taken but not proven
        assert rollback.rollbacks == 1
        assert torch.equal(after.states[9][0], before.states[3][0])
        assert "rise of the learning rate" in rollback.events[0].message
        # the restored schedule replays its jump; the rate stays held at the calm 0.05
        lrs = {s: st[1]["param_groups"][0]["lr"] for s, st in after.states.items()}
        assert all(lrs[s] <= 0.05 * (1 + 1e-9) for s in range(9, 17))
        assert lrs[16] == pytest.approx(0.05)
    else:
        assert rollback.rollbacks == 0 and not rollback.events
        assert torch.equal(after.states[9][0], before.states[9][0])


def test_when_the_restored_state_is_no_refuge_training_goes_back_to_the_abandoned_one():
    """A critical event at step 31 (ordinary data, finite weights) rolls back to step 25;
    from batch 32 on the labels are wrong and confidently mispredicted, so the skipped
    batches' loss on the restored weights grows past twice the first one's. The weights
    the rollback left had a lower loss at step 31 than the restored ones have now: the
    critical event at 34 ends the skip and training goes back to them."""
    rollback = Rollback(every=5, skip_steps=5, skip_growth=2.0)
    before, after = StateRecorder(), StateRecorder()
    script = {31: "critical", 34: "critical"}
    t = trainer(max_steps=36, callbacks=[ScriptedSource(script), before, rollback, after])
    ds = classification_data(2048)
    x, y = ds.tensors[0].clone(), ds.tensors[1].clone()
    x[32 * 32 :] *= 1000.0
    y[32 * 32 :] = (y[32 * 32 :] + 1) % 3
    t.fit(TinyClassifier(lr=0.1), loader(TensorDataset(x, y), shuffle=False))
    assert [e.step for e in rollback.events] == [31, 34]
    assert torch.equal(after.states[31][0], before.states[25][0])  # rolled back
    assert "before the rollback" in rollback.events[1].message
    # step 34 returns to the weights of step 31 as they were before the rollback
    assert torch.equal(after.states[34][0], before.states[31][0])
    assert _same_optimizer_state(after.states[34][1], before.states[31][1])
    assert rollback.abandoned is None


def test_the_loss_band_goes_back_with_the_weights():
    """A digits MLP learns for 150 steps, then a scripted CRITICAL rolls it back to its
    starting weights (the only good state with ``every=1000``). Their loss is the loss the
    run started from; judged against the band learned on the later, lower losses, the
    skipped batches would be "back at the level the run started from" and extend the skip
    again and again. The band goes back with the weights instead: right after the
    rollback it is the band of step 0 (empty, nothing learned), no critical event
    extends the skip, and training resumes at step 150 + skip_steps."""
    from test_warning_callback import LabelsWrongFrom, digits

    from lightning_stability import LossMonitor
    from lightning_stability.warning import EarlyWarning

    torch.manual_seed(0)
    ew = EarlyWarning()
    rollback = Rollback(every=1000, skip_steps=15)
    bands = {}

    class BandRecorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            bands[trainer.global_step] = (ew.monitor.band.learned, len(ew.monitor.band.values))

    after = StateRecorder()
    callbacks = [LossMonitor(), ew, ScriptedSource({150: "critical"}), rollback]
    t = trainer(max_steps=200, callbacks=[*callbacks, BandRecorder(), after])
    t.fit(LabelsWrongFrom(None), loader(digits(), batch_size=32))
    assert bands[149][0] and bands[149][1] == ew.monitor.band.window  # it had learned
    assert bands[150] == (False, 0)  # the band of the starting weights
    assert rollback.rollbacks == 1
    assert [e.step for e in rollback.events] == [150]
    assert [e for e in ew.events if e.level >= Level.CRITICAL] == []
    # the skip ended after skip_steps: the weights move again from step 166
    assert torch.equal(after.states[165][0], after.states[150][0])
    assert not torch.equal(after.states[166][0], after.states[150][0])


def test_data_at_fault_undoes_the_cuts_since_the_restored_state():
    """A critical event at 31 rolls back to step 25 and halves the learning rate; the
    critical event at 34 arrives while the restored weights are frozen (skip_growth=None:
    the skipped loss is not consulted), so the data is at fault: the learning rate goes
    back to what it was at step 25, and the skip goes on."""
    backoff = LRBackoff(calm_steps=None)
    rollback = Rollback(every=5, skip_steps=5, skip_growth=None)
    lrs = LrRecorder()
    script = {31: "critical", 34: "critical"}
    t = trainer(max_steps=40, callbacks=[ScriptedSource(script), backoff, rollback, lrs])
    t.fit(TinyClassifier(lr=0.1), loader(classification_data(2048)))
    assert [e.step for e in rollback.events] == [31, 34]
    assert "the data is at fault" in rollback.events[1].message
    assert lrs.lrs[31] == pytest.approx(0.05)
    assert lrs.lrs[34] == pytest.approx(0.1) and lrs.lrs[39] == pytest.approx(0.1)
    assert backoff.scales == [[1.0]]


def test_data_at_fault_returns_staged_training_to_the_restored_stage():
    staged = StagedTraining(calm_steps=None)
    rollback = Rollback(every=5, skip_steps=5, skip_growth=None)
    script = {28: "warning", 31: "critical", 34: "critical"}
    t = trainer(max_steps=40, callbacks=[ScriptedSource(script), staged, rollback])
    t.fit(TinyClassifier(lr=0.1), loader(classification_data(2048)))
    # stage 1 at 28, then stage 2 at the rollback, then back to the snapshot's stage 0
    assert rollback.events[1].message.endswith("the data is at fault, not the run: back to stage 0")
    assert staged.stage == 0
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)
