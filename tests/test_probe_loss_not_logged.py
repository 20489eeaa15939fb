"""A probe that re-runs ``training_step`` never has its loss logged as a training metric:
what the loggers receive is exactly what the training steps themselves logged."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_stability import AuditConfig, SharpnessCadence, SharpnessEstimator
from lightning_stability.probes import PerturbationAudit, SharpnessMonitor


class LogsStepAndEpoch(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss


class Losses(Callback):
    """The loss each training step returned, by step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[int(trainer.global_step) - 1] = float(outputs["loss"])


def _logged(directory: Path, key: str) -> dict[int, float]:
    (path,) = directory.rglob("metrics.csv")
    with open(path) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def test_the_probe_loss_is_never_logged(tmp_path):
    # every step re-runs training_step on the first batch (a curvature check and a
    # directional reading); the audit re-runs it on a forked copy at the epoch's end
    probes = [
        SharpnessMonitor(
            cadence=SharpnessCadence(every_n_steps=1), estimator=SharpnessEstimator(max_iter=3)
        ),
        PerturbationAudit(
            audit=AuditConfig(horizon=2, dimensions=("learning_signal",)), num_batches=1
        ),
    ]
    losses = Losses()
    t = trainer(
        max_steps=-1,
        max_epochs=1,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[*probes, losses],
    )
    t.fit(LogsStepAndEpoch(), loader(classification_data(256), shuffle=False))
    assert "stability/sharpness/lambda_max" in probes[0].readings
    assert "stability/audit/learning_signal/param_distance" in probes[1].readings
    step = _logged(tmp_path, "train_loss_step")
    assert len(step) == 8 and step == {s: losses.losses[s] for s in step}
    (epoch,) = _logged(tmp_path, "train_loss_epoch").values()
    assert math.isclose(epoch, sum(losses.losses.values()) / 8, rel_tol=1e-6)
    assert math.isclose(float(t.callback_metrics["train_loss_step"]), losses.losses[7])


class CountsItsSteps(LogsStepAndEpoch):
    """Sets a plain attribute on ``self`` in every training step, as some modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.steps_seen = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_seen += 1
        return super().training_step(batch, batch_idx)


def test_a_probe_re_run_leaves_the_module_and_the_trainer_as_they_were(tmp_path):
    model = CountsItsSteps()
    probe = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=1), estimator=SharpnessEstimator(max_iter=3)
    )
    t = trainer(max_steps=6, logger=CSVLogger(tmp_path), callbacks=[probe])
    t.fit(model, loader(classification_data(256), shuffle=False))
    assert probe.readings["stability/sharpness/lambda_max"].step == 6
    # six real steps; the probe's re-runs (several per check) changed nothing on the module
    assert model.steps_seen == 6
    assert "log" not in vars(model) and "log_dict" not in vars(model)
