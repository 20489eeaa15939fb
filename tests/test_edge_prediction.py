"""The edge carried to the learning rate about to be used: EdgePrediction by hand, and
SharpnessMonitor in a real run whose learning rate jumps (the predicted ratio and the
one-step change it publishes, the directional reading the jump moves forward, training
bit-identical with and without it)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, classification_data, flat_weights, loader, trainer
from lightning.pytorch.callbacks import Callback

from lightning_stability import SharpnessCadence
from lightning_stability.probes.edge import EdgePrediction, step_lr
from lightning_stability.probes.sharpness import SharpnessMonitor

KEY = "stability/sharpness/"


# ---------------------------------------------------------------------- by hand
def test_prediction_is_the_measured_ratio_rescaled_to_the_learning_rate():
    edge = EdgePrediction()
    # nothing measured, no previous step: both undefined
    predicted, change = edge.predict(0.05)
    assert math.isnan(predicted) and math.isnan(change)
    predicted, change = edge.predict(0.05)
    assert math.isnan(predicted) and change == 1.0
    edge.measured(0.7, 0.05)
    for lr, previous in [(0.05, 0.05), (0.15, 0.05), (0.12, 0.15), (0.001, 0.12)]:
        predicted, change = edge.predict(lr)
        assert predicted == 0.7 * lr / 0.05
        assert change == lr / previous
    # a new reading replaces the old one and its learning rate
    edge.measured(1.3, 0.001)
    assert edge.predict(0.004)[0] == 1.3 * 0.004 / 0.001


@pytest.mark.parametrize(
    ("ratio", "lr"),
    [(None, 0.1), (float("nan"), 0.1), (float("inf"), 0.1), (0.5, 0.0), (0.5, -1.0)],
)
def test_unusable_readings_are_ignored(ratio, lr):
    edge = EdgePrediction()
    edge.measured(0.4, 0.1)
    edge.measured(ratio, lr)
    assert (edge.ratio, edge.ratio_lr) == (0.4, 0.1)


def test_stale_when_the_prediction_crosses_the_edge_after_the_lr_grew():
    edge = EdgePrediction(recheck_growth=1.1)
    assert not edge.stale(1.0, 5.0)  # nothing measured yet
    edge.measured(0.95, 0.125)
    assert edge.stale(1.1 * 0.125, 1.045)  # grew by 1.1x and predicted above 1
    assert edge.stale(0.25, 1.9)
    assert not edge.stale(1.09 * 0.125, 1.0355)  # grew by less than 1.1x
    assert not edge.stale(0.25, 0.99)  # grew, but the prediction is still below the edge
    assert not edge.stale(0.0625, 3.0)  # the learning rate fell


def test_state_round_trip_through_a_weights_only_file(tmp_path):
    edge = EdgePrediction()
    edge.predict(0.125)
    torch.save(edge.state_dict(), tmp_path / "empty.pt")  # NaNs before any reading
    edge.measured(0.6, 0.125)
    torch.save(edge.state_dict(), tmp_path / "edge.pt")
    again = EdgePrediction()
    again.load_state_dict(torch.load(tmp_path / "edge.pt", weights_only=True))
    assert again.predict(0.375) == edge.predict(0.375) == (0.6 * 0.375 / 0.125, 3.0)
    empty = EdgePrediction()
    empty.load_state_dict(torch.load(tmp_path / "empty.pt", weights_only=True))
    assert math.isnan(empty.ratio) and empty.prev_lr == 0.125


def test_step_lr_is_the_largest_group_learning_rate():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.01}, {"params": [b], "lr": 0.3}], lr=0.1)
    assert step_lr(opt) == 0.3


# ------------------------------------------------------------------- in a real run
JUMP_AT, FACTOR, LR = 7, 4.0, 0.05


class LrJump(Callback):
    """Multiplies every group's learning rate by ``FACTOR`` before optimizer step
    ``JUMP_AT`` (global_step counts the steps taken before it)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == JUMP_AT:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= FACTOR


class Readings(Callback):
    """Every reading of the monitor, by key, as (value, step), once per optimizer step
    (placed after the monitor)."""

    def __init__(self, monitor: SharpnessMonitor) -> None:
        self.monitor = monitor
        self.seen: dict[str, dict[int, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for key, r in self.monitor.readings.items():
            self.seen.setdefault(key[len(KEY) :], {})[r.step] = r.value


def _run(jump: bool, monitor: bool):
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(lr=LR, norm=True, dropout=0.3)
    cb = (
        SharpnessMonitor(cadence=SharpnessCadence(every_n_steps=100, directional_every_n_steps=5))
        if monitor
        else None
    )
    callbacks = ([LrJump()] if jump else []) + ([cb, Readings(cb)] if monitor else [])
    t = trainer(max_steps=14, callbacks=callbacks)
    t.fit(model, loader(classification_data(), batch_size=16))
    return flat_weights(model), (callbacks[-1].seen if monitor else None)


def test_an_lr_jump_is_predicted_moves_a_reading_and_leaves_training_unchanged():
    weights, seen = _run(jump=True, monitor=True)
    # directional readings at steps 5 and 10 by the cadence; the jump at optimizer step 7
    # (the 8th) moves the second to the end of that step, and the cadence restarts there
    assert sorted(seen["directional_ratio"]) == [5, 8, 13]
    assert sorted(seen["critical"]) == [5, 8, 13]
    _, calm = _run(jump=False, monitor=True)
    assert sorted(calm["directional_ratio"]) == [5, 10]
    # the one-step change and the prediction, published before every optimizer step once
    # a ratio exists (before step 5 there is none, and no previous step before step 0)
    change, predicted = seen["lr_change"], seen["predicted_ratio"]
    assert sorted(change) == list(range(1, 14))
    assert {s: c for s, c in change.items() if c != 1.0} == {JUMP_AT: FACTOR}
    assert sorted(predicted) == list(range(5, 14))
    measured = seen["directional_ratio"][5]
    assert predicted[5] == predicted[6] == measured  # same learning rate: the reading
    assert predicted[JUMP_AT] == pytest.approx(measured * FACTOR, rel=1e-12)
    # after the moved reading the prediction is that reading again (same learning rate)
    assert predicted[8] == seen["directional_ratio"][8]
    assert seen["directional_ratio"][8] != measured
    # the monitor changed nothing in training, jump or not
    bare, _ = _run(jump=True, monitor=False)
    assert torch.equal(weights, bare)
