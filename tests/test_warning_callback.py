"""EarlyWarning in real Trainer runs: a planted loss spike and a NaN raise events that
reach listeners, the user hook, the logs, TensorBoard and Python warnings; levels mean
evidence (a deviation alone is WATCH; the loss leaving its band, an edge rule: WARNING;
a non-finite loss: CRITICAL); a healthy run never warns; the callback does not change
training; its state goes through a weights-only checkpoint."""

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, classification_data, flat_weights, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import TensorDataset

from lightning_stability import EdgeRule, LevelPolicy
from lightning_stability.probes.base import StabilityProbe
from lightning_stability.warning import EarlyWarning, InstabilityWarning, Level

BATCH = 8


def spiked_data(first_batch: int, batches: int = 3, scale: float = 30.0) -> TensorDataset:
    """Classification data whose batches ``first_batch .. first_batch + batches - 1``
    (unshuffled, batch size 8) have blown-up inputs and shifted labels."""
    x, y = classification_data(n=1024).tensors
    x, y = x.clone(), y.clone()
    sl = slice(first_batch * BATCH, (first_batch + batches) * BATCH)
    x[sl] *= scale
    y[sl] = (y[sl] + 1) % 3
    return TensorDataset(x, y)


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event, trainer, pl_module):
        self.events.append((event, trainer.global_step))


def test_planted_spike_reaches_listeners_hook_logs_and_warning():
    listener, hook = Recorder(), Recorder()
    ew = EarlyWarning(on_event=hook)
    ew.subscribe(listener)
    t = trainer(max_steps=86, callbacks=[ew])
    with pytest.warns(InstabilityWarning, match="loss leaving its band"):
        t.fit(TinyClassifier(), loader(spiked_data(80), batch_size=BATCH, shuffle=False))
    # batches 80-82 are optimizer steps 81-83 (global_step after the step)
    assert ew.events, "no event"
    first = ew.events[0]
    # the deviation (a soft statistic) is huge, but proposes WATCH only, after patience=2
    assert (first.level, first.step) == (Level.WATCH, 82)
    assert first.signals[0] == "stability/loss/value"
    assert first.deviation >= 8.0
    # the evidence: the trailing median of 5 losses is above the band from step 83 (three
    # spiked losses out of five), and leaving once it stayed there confirm=2 steps
    warnings_ = [e for e in ew.events if e.level >= Level.WARNING]
    assert [(e.level, e.step) for e in warnings_] == [(Level.WARNING, 84)]
    assert warnings_[0].signals[0] == "stability/loss/value"
    assert "loss leaving its band" in warnings_[0].message
    assert [e for e, _ in listener.events] == ew.events == [e for e, _ in hook.events]
    assert all(e.step == step for e, step in listener.events)  # delivered at its own step
    assert ew.request_closer_watch == (ew.level >= Level.WATCH)
    m = t.callback_metrics
    assert float(m["stability/meta/level"]) == float(ew.level)
    assert float(m["stability/meta/deviation"]) == pytest.approx(ew.deviation)
    assert "stability/meta/learning_signal" in m


def test_no_spike_no_event_and_training_unchanged():
    data = classification_data()
    torch.manual_seed(0)
    bare = TinyClassifier()
    trainer(max_steps=30).fit(bare, loader(data, batch_size=BATCH))
    torch.manual_seed(0)
    watched = TinyClassifier()
    ew = EarlyWarning()
    trainer(max_steps=30, callbacks=[ew]).fit(watched, loader(data, batch_size=BATCH))
    assert torch.equal(flat_weights(bare), flat_weights(watched))
    assert [e for e in ew.events if e.level >= Level.WARNING] == []


class NaNAt(TinyClassifier):
    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.at else loss


def test_nan_loss_is_critical_at_that_step():
    ew = EarlyWarning()
    t = trainer(max_steps=8, callbacks=[ew])
    with pytest.warns(InstabilityWarning, match="critical"):
        t.fit(NaNAt(5), loader(classification_data(), batch_size=BATCH, shuffle=False))
    assert ew.events[0].level == Level.CRITICAL
    assert ew.events[0].step == 6  # the optimizer step that consumed the NaN loss


class ScriptedProbe(StabilityProbe):
    """Publishes an edge-of-stability ratio every 4 steps: 0.6, then 1.6 from step 12."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % 4 == 0:
            ratio = 1.6 if step >= 12 else 0.6
            self.publish(trainer, pl_module, {"sharpness/eos_ratio": ratio})


@pytest.mark.parametrize(("kwargs", "expected"), [({}, 20), ({"edge": EdgeRule(sustain=2)}, 16)])
def test_edge_of_stability_rule_from_a_probe_and_no_text_of_its_own(tmp_path, kwargs, expected):
    texts = []
    logger = TensorBoardLogger(tmp_path)
    logger.experiment.add_text = lambda tag, text, global_step=None: texts.append(
        (tag, text, global_step)
    )
    ew = EarlyWarning(use_step_loss=False, **kwargs)
    t = trainer(max_steps=20, callbacks=[ScriptedProbe(), ew], logger=logger)
    with pytest.warns(InstabilityWarning, match="edge-of-stability"):
        t.fit(TinyClassifier(), loader(classification_data(), batch_size=BATCH))
    assert ew.events[0].level == Level.WARNING
    # readings above 1.25 at steps 12, 16, 20: WARNING at the eos_sustain-th of them (the
    # default 3: step 20; 2: step 16), a rule is evidence, entered at once (no patience)
    assert ew.events[0].step == expected
    assert ew.events[0].signals[0] == "stability/sharpness/eos_ratio"
    assert not texts  # events reach TensorBoard's text through the dashboard's timeline


class BeyondEdgeProbe(StabilityProbe):
    """Publishes a directional ratio of 3.0 (three times the edge) every 2 steps from step 4,
    whatever the learning rate: a run that stays beyond the edge."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % 2 == 0:
            ratio = 3.0 if step >= 4 else 0.5
            self.publish(trainer, pl_module, {"sharpness/directional_ratio": ratio})


def test_persisting_edge_warning_is_repeated_and_backoff_cuts_each_time():
    from test_actions_events import LrRecorder

    from lightning_stability.actions import LRBackoff

    ew = EarlyWarning(levels=LevelPolicy(repeat_every=5), use_step_loss=False)
    backoff = LRBackoff()
    rec = LrRecorder()
    t = trainer(max_steps=20, callbacks=[BeyondEdgeProbe(), ew, backoff, rec])
    with pytest.warns(InstabilityWarning, match="directional ratio"):
        t.fit(TinyClassifier(lr=0.1), loader(classification_data(), batch_size=BATCH))
    # third reading above 1.25 (eos_sustain=3: steps 4, 6, 8) -> WARNING at 8 (a rule: no
    # patience), repeated every 5 steps while the readings stay beyond the edge, never
    # escalated
    assert [(e.level, e.step) for e in ew.events] == [(Level.WARNING, s) for s in (8, 13, 18)]
    assert ew.events[0].signals[0] == "stability/sharpness/directional_ratio"
    assert [e.step for e in backoff.events] == [8, 13, 18]
    assert rec.lrs[7] == pytest.approx(0.1)
    assert rec.lrs[8] == pytest.approx(0.05)
    assert rec.lrs[13] == pytest.approx(0.025)
    assert rec.lrs[18] == pytest.approx(0.0125)
    assert rec.lrs[20] == pytest.approx(0.0125)


def test_checkpoint_holds_state_that_loads_weights_only_and_resumes(tmp_path):
    ew = EarlyWarning()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    data = classification_data()
    trainer(max_steps=32, callbacks=[ew, ckpt], enable_checkpointing=True).fit(
        TinyClassifier(), loader(data, batch_size=BATCH, shuffle=False)
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("EarlyWarning")]
    values = state["monitor"]["baselines"]["stability/loss/value"]["values"]
    assert len(values) == 32 and all(math.isfinite(v) for v in values)
    resumed = EarlyWarning()
    trainer(max_steps=33, callbacks=[resumed], default_root_dir=tmp_path).fit(
        TinyClassifier(),
        loader(data, batch_size=BATCH, shuffle=False),
        ckpt_path=tmp_path / "last.ckpt",
    )
    after = resumed.monitor.baselines["stability/loss/value"].values
    assert list(after)[:-1] == values  # continued, one more step learned


def test_events_survive_a_resume(tmp_path):
    """The warnings that caused the actions are in the checkpoint, so a resumed run's
    summary shows them."""
    ew = EarlyWarning()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    data = classification_data()
    trainer(max_steps=12, callbacks=[ew, ckpt], enable_checkpointing=True).fit(
        NaNAt(5), loader(data, batch_size=BATCH, shuffle=False)
    )
    assert any(e.level == Level.CRITICAL for e in ew.events)
    resumed = EarlyWarning()
    trainer(max_steps=12, callbacks=[resumed], default_root_dir=tmp_path).fit(
        TinyClassifier(),
        loader(data, batch_size=BATCH, shuffle=False),
        ckpt_path=tmp_path / "last.ckpt",
    )
    assert resumed.events == ew.events


# ------------------------------------------------- evidence on a healthy and a planted run
PLANT = 150


def digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))


class LabelsWrongFrom(TinyClassifier):
    """A digits MLP whose training labels are all shifted to another class from optimizer
    step ``wrong_from`` on (``None``: never), which the optimizer step that uses them
    reports as global_step ``wrong_from + 1``."""

    def __init__(self, wrong_from: int | None) -> None:
        super().__init__(d=64, hidden=32, classes=10, lr=0.05)
        self.wrong_from = wrong_from

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.wrong_from is not None and self.global_step >= self.wrong_from:
            y = (y + 1) % 10
        return super().training_step((x, y), batch_idx)


def _digits_run(steps: int, wrong_from: int | None) -> EarlyWarning:
    from lightning_stability import GradientMonitor, LossMonitor

    pl.seed_everything(0, verbose=False)
    ew = EarlyWarning()
    t = trainer(max_steps=steps, callbacks=[GradientMonitor(), LossMonitor(), ew])
    t.fit(LabelsWrongFrom(wrong_from), loader(digits(), batch_size=32))
    return ew


def test_a_healthy_run_never_warns_and_wrong_labels_warn_within_a_few_steps():
    healthy = _digits_run(300, None)
    # it watched the loss (from LossMonitor) all along, with a full band
    assert len(healthy.monitor.band.values) == healthy.monitor.band.window
    assert "stability/loss/value" in healthy.monitor.baselines
    assert [e for e in healthy.events if e.level >= Level.WARNING] == []
    planted = _digits_run(PLANT + 10, PLANT)
    warnings_ = [e for e in planted.events if e.level >= Level.WARNING]
    assert warnings_, planted.events
    # the first wrong labels are seen at step PLANT + 1; a loss far above the band warns
    # at once, one that only leaves it after three of five trailing losses and confirm=2
    assert PLANT + 1 <= warnings_[0].step <= PLANT + 1 + 3
    assert warnings_[0].signals[0] == "stability/loss/value"
    assert warnings_[0].level == Level.WARNING
