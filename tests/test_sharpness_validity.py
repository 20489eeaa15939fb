"""Every published curvature reading carries its validity: unconverged Lanczos readings and
undefined critical sharpness are NaN and counted, never huge; shift and flattening against
subspaces and eigenvalues whose values are known."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, classification_data, flat_weights, loader, trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_stability import SharpnessCadence, SharpnessEstimator, SharpnessMeasures
from lightning_stability.estimators import log_flattening, principal_sines, subspace_shift
from lightning_stability.probes.sharpness import SharpnessMonitor

KEY = "stability/sharpness/"


def test_unconverged_lanczos_is_nan_counted_and_keeps_the_ratio_out():
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=2),
        estimator=SharpnessEstimator(k=2, tol=1e-7, max_iter=3),
        measures=SharpnessMeasures(directional=False, critical=False),
    )
    t = trainer(max_steps=4, callbacks=[cb])
    t.fit(TinyClassifier(), loader(classification_data()))
    assert cb.num_checks == 2
    assert math.isnan(cb.readings[KEY + "lambda_max"].value)
    assert math.isnan(cb.readings[KEY + "lambda_1"].value)
    assert cb.readings[KEY + "skipped"].value == 2.0
    for name in ("eos_ratio", "shift", "flattening"):
        assert KEY + name not in cb.readings


def test_converged_lanczos_is_not_skipped():
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=2),
        estimator=SharpnessEstimator(k=1, tol=1e-4, max_iter=100),
        measures=SharpnessMeasures(directional=False),
    )
    t = trainer(max_steps=4, callbacks=[cb])
    t.fit(TinyClassifier(), loader(classification_data()))
    assert math.isfinite(cb.readings[KEY + "lambda_max"].value)
    assert cb.readings[KEY + "skipped"].value == 0.0
    assert 0.0 <= cb.readings[KEY + "shift"].value <= 1.0
    assert math.isfinite(cb.readings[KEY + "flattening"].value)


def _ascent_loss(module: nn.Module, batch) -> torch.Tensor:
    """The negative training loss: every training update climbs it."""
    x, y = batch
    return -nn.functional.cross_entropy(module(x), y)


def test_critical_sharpness_along_a_non_descent_update_is_nan():
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=3, directional_every_n_steps=3),
        estimator=SharpnessEstimator(max_iter=60),
        measures=SharpnessMeasures(preconditioned=False),
        loss_fn=_ascent_loss,
    )
    t = trainer(max_steps=3, callbacks=[cb])
    t.fit(TinyClassifier(opt="sgd", lr=0.05), loader(classification_data(), shuffle=False))
    assert math.isnan(cb.readings[KEY + "critical"].value)
    assert cb.readings[KEY + "skipped"].value >= 1.0


def test_critical_sharpness_along_a_descent_update_is_finite_and_bounded():
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=3, directional_every_n_steps=3),
        estimator=SharpnessEstimator(max_iter=60),
    )
    t = trainer(max_steps=3, callbacks=[cb])
    t.fit(TinyClassifier(opt="sgd", lr=0.05), loader(classification_data(), shuffle=False))
    crit = cb.readings[KEY + "critical"].value
    assert math.isfinite(crit) and 0 < crit < 100 * cb.readings[KEY + "lambda_max"].value


class _LeastSquares(pl.LightningModule):
    """``mean((x w + b - y)^2)`` on one fixed batch: the Hessian is ``2 [x 1]^T [x 1] / n``
    at every point, so the curvature along any update is known exactly."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.net = nn.Linear(5, 1)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.05)
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


class _Updates(Callback):
    """The flat weights before and after each optimizer step."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(flat_weights(pl_module).clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(flat_weights(pl_module).clone())


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_critical_sharpness_is_the_curvature_along_the_update(optimizer):
    """On a quadratic, ``critical`` is ``d^T H d / d^T d`` for the last update ``d`` whatever
    the optimizer (under Adam ``2 / eta_c`` alone scales with the preconditioner), and so at
    most ``lambda_max``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g) * torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1])
    y = torch.randn(64, 1, generator=g)
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=6, directional_every_n_steps=6),
        estimator=SharpnessEstimator(tol=1e-6, max_iter=6),
        measures=SharpnessMeasures(preconditioned=False),
    )
    updates = _Updates()
    t = trainer(max_steps=6, callbacks=[cb, updates])
    t.fit(_LeastSquares(optimizer), loader(torch.utils.data.TensorDataset(x, y), batch_size=64))
    ones = torch.ones(64, 1)
    a = torch.cat([x, ones], dim=1).double()
    hessian = 2 * a.T @ a / 64
    # flat_weights orders weight then bias, as the columns of a
    d = (updates.after[-1] - updates.before[-1]).double()
    expected = float(d @ hessian @ d / (d @ d))
    crit = cb.readings[KEY + "critical"].value
    lam = float(torch.linalg.eigvalsh(hessian)[-1])
    assert cb.readings[KEY + "critical"].step == 6
    # the line search brackets the crossing to 5%
    assert crit == pytest.approx(expected, rel=0.06)
    assert crit <= 1.06 * lam
    assert cb.readings[KEY + "lambda_max"].value == pytest.approx(lam, rel=1e-5)


# ------------------------------------------------------------------- shift, flattening
def _rotation(dim: int, angle: float, i: int, j: int) -> torch.Tensor:
    r = torch.eye(dim, dtype=torch.float64)
    r[i, i] = r[j, j] = math.cos(angle)
    r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
    return r


@pytest.mark.parametrize("angle", [0.0, 1e-3, 0.3, math.pi / 2])
def test_shift_of_a_rotated_vector_is_the_sine_of_the_angle(angle):
    e = torch.eye(6, dtype=torch.float64)
    v = e[:, 0]
    assert subspace_shift(v, _rotation(6, angle, 0, 4) @ v) == pytest.approx(
        math.sin(angle), abs=1e-7
    )
    # sign-free: an eigenvector's sign is arbitrary
    assert subspace_shift(v, -v) == pytest.approx(0.0, abs=1e-7)


def test_principal_angles_of_known_subspaces():
    e = torch.eye(8, dtype=torch.float64)
    a = e[:, :3]
    # rotate two of the three directions out of the subspace by 0.2 and 0.7 rad
    b = _rotation(8, 0.7, 2, 6) @ _rotation(8, 0.2, 1, 5) @ a
    # an arbitrary basis of the same subspace gives the same angles
    mix = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    sines = principal_sines(a, b @ mix)
    torch.testing.assert_close(
        sines, torch.tensor([math.sin(0.7), math.sin(0.2), 0.0], dtype=torch.float64),
        atol=1e-7, rtol=0,
    )  # fmt: skip
    assert subspace_shift(a, b) == pytest.approx(math.sin(0.7), abs=1e-7)
    # swapping the order of two eigenvectors within the subspace is no shift
    assert subspace_shift(a, a[:, [1, 0, 2]]) == pytest.approx(0.0, abs=1e-7)


def test_flattening_is_a_log_ratio_with_an_obvious_sign():
    assert log_flattening(10.0, 5.0) == pytest.approx(math.log(2))
    assert log_flattening(5.0, 10.0) == pytest.approx(-math.log(2))
    assert log_flattening(3.0, 3.0) == 0.0
    for prev, now in [(0.0, 1.0), (-1.0, 2.0), (1.0, math.nan), (2.0, -0.5)]:
        assert math.isnan(log_flattening(prev, now))
