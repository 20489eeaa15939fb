"""A learning-rate cut survives 100 further steps of every scheduler.

Ground truth: the same scheduler built from the start around half the learning rate
(and half of every learning-rate-valued argument). After the cut, the two trajectories
must agree to rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import SGD
from torch.optim import lr_scheduler as S

from lightning_stability.actions.lr_scaling import scale_learning_rates

LR = 0.8
K = 7  # scheduler steps before the cut
STEPS = 100


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 10)


def _make(name: str, s: float):
    """An optimizer with two param groups and the scheduler ``name``, every
    learning-rate-valued argument multiplied by ``s``."""
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = SGD([{"params": [params[0]]}, {"params": [params[1]], "lr": LR / 4 * s}], lr=LR * s)
    if name == "none":
        return opt, None
    if name == "step":
        return opt, S.StepLR(opt, step_size=9, gamma=0.7)
    if name == "cosine":
        return opt, S.CosineAnnealingLR(opt, T_max=40, eta_min=0.01 * s)
    if name == "onecycle":
        return opt, S.OneCycleLR(opt, max_lr=[LR * s, LR / 4 * s], total_steps=K + STEPS + 1)
    if name == "lambda":
        return opt, S.LambdaLR(opt, _warmup)
    if name == "sequential":
        warm = S.LinearLR(opt, start_factor=0.1, total_iters=5)
        cos = S.CosineAnnealingLR(opt, T_max=30, eta_min=0.02 * s)
        return opt, S.SequentialLR(opt, [warm, cos], milestones=[5])
    if name == "plateau":
        return opt, S.ReduceLROnPlateau(opt, factor=0.5, patience=2, min_lr=0.003 * s)
    raise AssertionError(name)


def _step(opt, sched) -> None:
    opt.step()
    if isinstance(sched, S.ReduceLROnPlateau):
        sched.step(1.0)  # a flat metric: the plateau schedule keeps cutting down to min_lr
    elif sched is not None:
        sched.step()


def _lrs(opt) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


SCHEDULERS = ["none", "step", "cosine", "onecycle", "lambda", "sequential", "plateau"]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_cut_survives_100_scheduler_steps(name):
    opt, sched = _make(name, 1.0)
    ref_opt, ref_sched = _make(name, 0.5)
    for _ in range(K):
        _step(opt, sched)
        _step(ref_opt, ref_sched)
    scale_learning_rates(opt, 0.5, [sched] if sched is not None else [])
    assert _lrs(opt) == pytest.approx(_lrs(ref_opt), rel=1e-12, abs=0)
    for _ in range(STEPS):
        _step(opt, sched)
        _step(ref_opt, ref_sched)
        assert _lrs(opt) == pytest.approx(_lrs(ref_opt), rel=1e-12, abs=1e-15)
    if sched is not None and not isinstance(sched, S.ReduceLROnPlateau):
        assert sched.get_last_lr() == pytest.approx(_lrs(ref_opt), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", ["lambda", "onecycle", "sequential"])
def test_scaling_only_the_current_lr_is_undone(name):
    """Why the references are scaled: a bare ``group["lr"] *= 0.5`` does not survive
    these schedulers, so the test above is able to fail."""
    opt, sched = _make(name, 1.0)
    ref_opt, ref_sched = _make(name, 0.5)
    for _ in range(K):
        _step(opt, sched)
        _step(ref_opt, ref_sched)
    for g in opt.param_groups:
        g["lr"] *= 0.5
    for _ in range(STEPS):
        _step(opt, sched)
        _step(ref_opt, ref_sched)
    assert not math.isclose(_lrs(opt)[0], _lrs(ref_opt)[0], rel_tol=1e-6)


def test_per_group_factors_and_length_check():
    opt, sched = _make("step", 1.0)
    scale_learning_rates(opt, [0.5, 0.25], [sched])
    assert _lrs(opt) == pytest.approx([LR * 0.5, LR / 4 * 0.25])
    assert sched.base_lrs == pytest.approx([LR * 0.5, LR / 4 * 0.25])
    with pytest.raises(ValueError, match="factor"):
        scale_learning_rates(opt, [0.5], [sched])
