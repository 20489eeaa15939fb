"""Readings reach the loggers once, at the step they were measured, whatever
``log_every_n_steps`` is, and appear in ``trainer.callback_metrics``."""

import lightning.pytorch as pl
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_stability.probes.base import StabilityProbe, logs_this_step
from lightning_stability.report import find_runs, load_run


class SparseProbe(StabilityProbe):
    """Publishes at a few steps that are not multiples of ``log_every_n_steps``, and a
    dense reading that follows Lightning's cadence."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, *args) -> None:
        step = trainer.global_step
        if step in (7, 10, 13):
            self.publish(trainer, pl_module, {"sparse": float(step)})
        self.publish(trainer, pl_module, {"dense": float(step)}, log=logs_this_step(trainer))


def test_sparse_readings_are_written_once_at_their_own_step(tmp_path):
    probe = SparseProbe()
    t = trainer(
        max_steps=20,
        log_every_n_steps=5,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[probe],
    )
    t.fit(TinyClassifier(), loader(classification_data()))
    (run,) = find_runs(tmp_path)
    scalars, _ = load_run(run)
    # Lightning stamps step metrics logged at on_train_batch_end with the step count before
    # the increment; each sparse value appears exactly once, none is lost or repeated.
    assert scalars["stability/sparse"] == [(6, 7.0), (9, 10.0), (12, 13.0)]
    assert [v for _, v in scalars["stability/dense"]] == [5.0, 10.0, 15.0, 20.0]
    assert float(t.callback_metrics["stability/sparse"]) == 13.0
    assert probe.readings["stability/sparse"].step == 13
