"""LossMonitor against losses recomputed by hand and reference window statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import TensorDataset

from lightning_stability.probes.loss import PER_SAMPLE_LOSS_KEY, LossMonitor


class LossRecorder(Callback):
    """Placed after the monitor: the batch loss recomputed by hand before the step, and the
    monitor's readings after it."""

    def __init__(self, monitor: LossMonitor) -> None:
        self.monitor = monitor
        self.losses: list[float] = []
        self.per_sample: list[torch.Tensor] = []
        self.readings: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            per = nn.functional.cross_entropy(pl_module(x), y, reduction="none")
        self.per_sample.append(per)
        self.losses.append(float(per.mean()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.readings.append({k: r.value for k, r in self.monitor.readings.items()})


class PerSampleClassifier(TinyClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        per = nn.functional.cross_entropy(self(x), y, reduction="none")
        return {"loss": per.mean(), PER_SAMPLE_LOSS_KEY: per.detach()}


def _fit(monitor, model=None, steps=12, data=None, **kw):
    rec = LossRecorder(monitor)
    torch.manual_seed(0)
    t = trainer(max_steps=steps, callbacks=[monitor, rec], **kw)
    t.fit(model or TinyClassifier(lr=0.5), loader(data or classification_data(), shuffle=False))
    return rec


def test_loss_readings_match_hand_computed_losses_and_window_statistics():
    window = 6
    monitor = LossMonitor(window=window, quantile=0.9)
    rec = _fit(monitor)
    for i, r in enumerate(rec.readings):
        assert r["stability/loss/value"] == pytest.approx(rec.losses[i], rel=1e-6)
        assert r["stability/loss/nonfinite"] == 0.0
        w = np.array(rec.losses[max(0, i - window + 1) : i + 1])
        assert r["stability/loss/tail_max"] == pytest.approx(w.max(), rel=1e-6)
        assert r["stability/loss/tail_q"] == pytest.approx(np.quantile(w, 0.9), rel=1e-6)
        assert r["stability/loss/spread"] == pytest.approx(
            np.quantile(w, 0.9) - np.median(w), rel=1e-4, abs=1e-6
        )
        if len(w) >= 3:
            d = w - w.mean()
            assert r["stability/loss/var"] == pytest.approx(w.var(ddof=1), rel=1e-5)
            assert r["stability/loss/ac1"] == pytest.approx(
                (d[:-1] * d[1:]).sum() / (d * d).sum(), rel=1e-4, abs=1e-6
            )
    assert "stability/loss/sample_q" not in rec.readings[-1]


def test_gradient_accumulation_reports_the_unscaled_batch_loss():
    monitor = LossMonitor()
    rec = _fit(monitor, steps=3, accumulate_grad_batches=2)
    assert len(rec.readings) == 6  # every batch, not every step
    for i, r in enumerate(rec.readings):
        assert r["stability/loss/value"] == pytest.approx(rec.losses[i], rel=1e-6)


def test_per_sample_losses_give_quantile_and_max():
    monitor = LossMonitor(quantile=0.75)
    rec = _fit(monitor, model=PerSampleClassifier(lr=0.5), steps=4)
    for per, r in zip(rec.per_sample, rec.readings):
        assert r["stability/loss/sample_q"] == pytest.approx(float(per.quantile(0.75)), rel=1e-5)
        assert r["stability/loss/sample_max"] == pytest.approx(float(per.max()), rel=1e-5)


def test_nonfinite_loss_is_flagged_and_kept_out_of_the_windows():
    x, y = classification_data(n=96).tensors
    x = x.clone()
    x[40, 0] = float("nan")  # in the second batch of 32
    monitor = LossMonitor(window=10)
    rec = _fit(monitor, data=TensorDataset(x, y), steps=2)
    assert [r["stability/loss/nonfinite"] for r in rec.readings] == [0.0, 1.0]
    assert math.isnan(rec.readings[1]["stability/loss/value"])
    assert monitor.loss_window.values() == [pytest.approx(rec.losses[0], rel=1e-6)]
    assert rec.readings[1]["stability/loss/tail_max"] == pytest.approx(rec.losses[0], rel=1e-6)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="window"):
        LossMonitor(window=0)
    with pytest.raises(ValueError, match="quantile"):
        LossMonitor(quantile=1.0)


def test_rearm_clears_windows_and_readings_and_pauses_accumulation():
    from types import SimpleNamespace

    from lightning_stability.probes.base import Reading

    m = LossMonitor(window=8)
    for v in (1.0, 2.0, 3.0):
        m.loss_window.update(v)
        m.worst_window.update(v)
    m.readings["stability/loss/tail_max"] = Reading(3.0, 2)
    state = m.state_dict()
    m.rearm(5, pause=3)
    assert len(m.loss_window) == len(m.worst_window) == 0 and not m.readings
    assert not m.accumulating(SimpleNamespace(global_step=7))
    assert m.accumulating(SimpleNamespace(global_step=8))
    m.load_state_dict(state)  # the checkpoint keys are the window names
    assert m.worst_window.values() == [1.0, 2.0, 3.0]
