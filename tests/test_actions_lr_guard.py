"""LRGuard: a step predicted past the edge runs at (1 + margin) times the edge; the schedule
itself is never rewritten; a run the guard does not clamp is bit-identical to one without it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import flat_weights, trainer
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stability import (
    LRGuard,
    SharpnessCadence,
    SharpnessEstimator,
    SharpnessMeasures,
    SharpnessMonitor,
    stability_callbacks,
)
from lightning_stability.probes.edge import EdgePrediction
from lightning_stability.warning.events import Level


def regression_data(n: int = 64, d: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor(
        [3.0, 1.0, 0.5, 0.2], dtype=torch.float64
    )
    y = x @ torch.randn(d, 1, generator=g, dtype=torch.float64)
    return TensorDataset(x, y)


class LinearRegression(pl.LightningModule):
    """MSE linear regression with plain SGD: the Hessian is ``2 X^T X / n`` exactly."""

    def __init__(self, lr: float = 0.1, schedule: Any = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1, bias=False).double()
        self.lr = lr
        self.schedule = schedule

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.lin(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.schedule is None:
            return opt
        sched = self.schedule(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FixedEdge(Callback):
    """Stands in for the sharpness monitor: one edge reading, fixed."""

    def __init__(self, ratio: float, lr: float) -> None:
        self.edge = EdgePrediction()
        self.edge.measured(ratio, lr)


class RecordLR(Callback):
    """The learning rate each step asked for (read before the step) and the one that
    reached the optimizer's step."""

    def __init__(self) -> None:
        self.requested: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.requested.append(float(trainer.optimizers[0].param_groups[0]["lr"]))


def full_batch(data: TensorDataset) -> DataLoader:
    return DataLoader(data, batch_size=len(data), shuffle=False)


def fit(module: pl.LightningModule, callbacks: list[Callback], steps: int) -> pl.Trainer:
    t = trainer(max_steps=steps, callbacks=callbacks)
    t.fit(module, full_batch(regression_data()))
    return t


def test_clamped_steps_match_a_run_at_the_applied_rate_and_the_schedule_is_kept() -> None:
    # StepLR halves the rate every step (a chainable scheduler: it reads the group's lr),
    # so the requested rates are 0.1, 0.05, 0.025, 0.0125, predicted ratios 4, 2, 1, 0.5:
    # the guard applies 1.5/4 and 1.5/2 of the first two and leaves the rest alone.
    def halving(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    guard, lrs = LRGuard(margin=0.5, confirm=1), RecordLR()
    guarded = LinearRegression(0.1, halving)
    fit(guarded, [FixedEdge(4.0, 0.1), lrs, guard], steps=4)

    applied = [0.1 * 1.5 / 4.0, 0.05 * 1.5 / 2.0, 0.025, 0.0125]
    reference = LinearRegression(0.1, lambda opt: _lambda(opt, [a / 0.1 for a in applied]))
    fit(reference, [], steps=4)

    torch.testing.assert_close(flat_weights(guarded), flat_weights(reference), rtol=1e-12, atol=0)
    assert lrs.requested == pytest.approx([0.1, 0.05, 0.025, 0.0125], rel=1e-12)
    assert guard.clamped_steps == 2
    assert [e.level for e in guard.events] == [Level.WARNING, Level.OK]
    start = guard.events[0]
    assert start.step == 0
    assert start.details["requested_lr"] == pytest.approx(0.1)
    assert start.details["applied_lr"] == pytest.approx(0.0375)
    assert start.details["predicted_ratio"] == pytest.approx(4.0)
    assert guard.events[1].step == 2


def _lambda(opt, factors):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factors[min(s, len(factors) - 1)])


@pytest.mark.parametrize("callbacks", [[FixedEdge(1.4, 0.1)], []], ids=["below-margin", "no-edge"])
def test_a_run_the_guard_does_not_clamp_is_bit_identical(callbacks) -> None:
    bare = LinearRegression(0.1)
    fit(bare, [], steps=5)
    guarded, guard = LinearRegression(0.1), LRGuard(confirm=1)
    if callbacks:
        fit(guarded, [*callbacks, guard], steps=5)
    else:
        with pytest.warns(UserWarning, match="no SharpnessMonitor"):
            fit(guarded, [guard], steps=5)
    assert torch.equal(flat_weights(bare), flat_weights(guarded))
    assert guard.clamped_steps == 0 and guard.events == []


def test_hook_is_removed_after_fit() -> None:
    module, guard = LinearRegression(0.1), LRGuard(confirm=1)
    t = fit(module, [FixedEdge(4.0, 0.1), guard], steps=2)
    assert guard._handle is None
    # the optimizer outlives the fit: no hook of the guard may stay registered on it
    assert len(t.optimizers[0]._optimizer_step_post_hooks) == 0


def test_guard_with_the_sharpness_monitor_clamps_a_learning_rate_jump_to_the_edge() -> None:
    data = regression_data()
    x = data.tensors[0]
    lam = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())
    lr = 0.5 / lam  # ratio 0.25

    class Jump(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 5:
                for g in trainer.optimizers[0].param_groups:
                    g["lr"] *= 20.0  # ratio 5: plain GD would diverge along the top direction

    monitor = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=1),
        estimator=SharpnessEstimator(tol=1e-8, max_iter=4),
        measures=SharpnessMeasures(directional=False, critical=False),
        probe_batch=tuple(data.tensors),
    )
    guard, lrs = LRGuard(margin=0.5), RecordLR()
    module = LinearRegression(lr)
    fit(module, [Jump(), monitor, lrs, guard], steps=12)

    first = guard.events[0]
    assert first.step == 5 and first.level == Level.WARNING
    assert first.details["predicted_ratio"] == pytest.approx(5.0, rel=1e-6)
    # the applied step sits at 1.5x the edge: lr * lambda / 2 = 1.5
    assert first.details["applied_lr"] * lam / 2 == pytest.approx(1.5, rel=1e-6)
    assert lrs.requested[6:] == pytest.approx([20 * lr] * 6)  # the user's rate is kept
    assert guard.clamped_steps == 7  # every step from the jump on, as the curvature is fixed
    assert torch.isfinite(flat_weights(module)).all()


class ScriptedEdge(Callback):
    """Edge readings that change at given steps: ``script[step] = (ratio, lr)``."""

    def __init__(self, script: dict[int, tuple[float, float]]) -> None:
        self.edge = EdgePrediction()
        self.script = script

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.script:
            self.edge.measured(*self.script[trainer.global_step])


def test_a_lone_high_reading_clamps_nothing_and_a_confirmed_one_does() -> None:
    # an outlier at step 2 between ordinary readings: nothing; two high readings: a clamp
    # from the step the second arrives, at the smaller of the two
    script = {0: (0.5, 0.1), 2: (4.0, 0.1), 3: (0.6, 0.1), 5: (3.0, 0.1), 6: (2.0, 0.1)}
    guard = LRGuard(margin=0.5)
    fit(LinearRegression(0.1), [ScriptedEdge(script), guard], steps=8)
    start = guard.events[0]
    assert start.step == 6
    assert start.details["predicted_ratio"] == pytest.approx(2.0)
    assert guard.clamped_steps == 2  # steps 6 and 7


def test_state_dict_round_trip() -> None:
    guard = LRGuard(confirm=1)
    fit(LinearRegression(0.1), [FixedEdge(4.0, 0.1), guard], steps=3)
    restored = LRGuard()
    restored.load_state_dict(guard.state_dict())
    assert restored.clamped_steps == guard.clamped_steps == 3
    assert restored.state_dict() == guard.state_dict()
    assert [e.message for e in restored.events] == [e.message for e in guard.events]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"margin": 0}, "margin must be a number > 0"),
        ({"margin": True}, "margin must be a number > 0"),
        ({"max_age": 0}, "max_age must be an integer >= 1 or None"),
        ({"confirm": 0}, "confirm must be an integer >= 1"),
    ],
)
def test_invalid_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LRGuard(**kwargs)


def test_default_set_option() -> None:
    assert not any(isinstance(c, LRGuard) for c in stability_callbacks())
    assert sum(isinstance(c, LRGuard) for c in stability_callbacks(lr_guard=True)) == 1
    guard = next(c for c in stability_callbacks(lr_guard={"margin": 1.0}) if isinstance(c, LRGuard))
    assert guard.margin == 1.0
    with pytest.raises(ValueError, match="lr_guard needs the sharpness monitor"):
        stability_callbacks(sharpness=False, lr_guard=True)
