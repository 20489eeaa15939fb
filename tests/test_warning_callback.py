"""EarlyWarning in real Trainer runs: a planted loss spike and a NaN raise events that
reach listeners, the user hook, the logs, TensorBoard and Python warnings; the callback
does not change training; its state goes through a weights-only checkpoint."""

import math

import pytest
import torch
from helpers import TinyClassifier, classification_data, flat_weights, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import TensorDataset

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
    with pytest.warns(InstabilityWarning, match="stability/loss/value"):
        t.fit(TinyClassifier(), loader(spiked_data(80), batch_size=BATCH, shuffle=False))
    # batch 80 is optimizer step 81 (global_step after the step)
    assert ew.events, "no event"
    first = ew.events[0]
    assert first.level >= Level.WARNING and first.step in (81, 82)
    assert first.signals[0] == "stability/loss/value"
    assert first.deviation >= 8.0
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


def test_edge_of_stability_rule_from_a_probe_and_tensorboard_text(tmp_path):
    texts = []
    logger = TensorBoardLogger(tmp_path)
    logger.experiment.add_text = lambda tag, text, global_step=None: texts.append(
        (tag, text, global_step)
    )
    ew = EarlyWarning(use_step_loss=False)
    t = trainer(max_steps=20, callbacks=[ScriptedProbe(), ew], logger=logger)
    with pytest.warns(InstabilityWarning, match="edge-of-stability"):
        t.fit(TinyClassifier(), loader(classification_data(), batch_size=BATCH))
    assert ew.events[0].level == Level.WARNING
    # second consecutive reading above 1.25 at step 16, held for patience=2 steps
    assert ew.events[0].step == 17
    assert ew.events[0].signals[0] == "stability/sharpness/eos_ratio"
    assert texts and texts[0][0] == "stability/events" and texts[0][2] == 17


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

    ew = EarlyWarning(use_step_loss=False, repeat_every=5)
    backoff = LRBackoff()
    rec = LrRecorder()
    t = trainer(max_steps=20, callbacks=[BeyondEdgeProbe(), ew, backoff, rec])
    with pytest.warns(InstabilityWarning, match="directional ratio"):
        t.fit(TinyClassifier(lr=0.1), loader(classification_data(), batch_size=BATCH))
    # second reading above 1.25 at step 6, held for patience=2 steps -> WARNING at 7,
    # repeated every 5 steps while the readings stay beyond the edge
    assert [(e.level, e.step) for e in ew.events] == [(Level.WARNING, s) for s in (7, 12, 17)]
    assert ew.events[0].signals[0] == "stability/sharpness/directional_ratio"
    assert [e.step for e in backoff.events] == [7, 12, 17]
    assert rec.lrs[6] == pytest.approx(0.1)
    assert rec.lrs[7] == pytest.approx(0.05)
    assert rec.lrs[12] == pytest.approx(0.025)
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
