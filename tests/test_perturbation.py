"""The fork-and-roll-out estimator against ground truth: quadratic edge of stability, exact
bisection, isolation of the live model and optimizer."""

import dataclasses
import math
from collections import OrderedDict
from typing import NamedTuple

import pytest
import torch
from torch import nn

from lightning_stability.estimators.perturbation import (
    AuditConfig,
    Fork,
    PerturbationAuditor,
    lr_margin,
    perturb_batch,
    perturb_parameters,
)


class Quadratic(nn.Module):
    """loss = 1/2 (w - w*)^T A (w - w*) with A = Q diag(eigs) Q^T."""

    def __init__(self, eigs, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = len(eigs)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T)
        self.register_buffer("target", torch.randn(n, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def loss(self) -> torch.Tensor:
        d = self.w - self.target
        return 0.5 * d @ self.a @ d


def quadratic_loss(module, batch):
    return module.loss()


def auditor(module, optimizer, config, batches=(None,), loss_fn=quadratic_loss, seed=0):
    return PerturbationAuditor(
        Fork(module, optimizer), loss_fn, list(batches), config, torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("lr", [0.02, 0.07])
def test_quadratic_lr_margin_matches_two_over_lr_lambda_max(lr):
    eigs = [10.0, 6.0, 3.0, 1.0, 0.5, 0.1]
    model = Quadratic(eigs)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cfg = AuditConfig(horizon=40, dimensions=("optimization",), bisection_steps=6)
    low, high = auditor(model, opt, cfg).lr_margin()
    expected = 2.0 / (lr * max(eigs))
    assert low <= high
    # The criterion can only fire above the edge: the stable end never undershoots by more
    # than the bracket, and the bias above the edge is a few percent.
    assert abs(low - expected) / expected < 0.10
    assert high >= expected


def test_lr_margin_bisection_finds_a_known_threshold():
    calls = []

    def diverges(m):
        calls.append(m)
        return m > 3.3

    low, high = lr_margin(diverges, (0.5, 1.0, 2.0, 4.0, 8.0), bisection_steps=8)
    assert low <= 3.3 < high
    assert high / low == pytest.approx(2.0 ** (1 / 2**8), rel=1e-9)
    assert lr_margin(lambda m: True, (1.0, 2.0), 3) == (0.0, 1.0)
    assert lr_margin(lambda m: False, (1.0, 2.0), 3) == (2.0, math.inf)


def test_live_module_and_optimizer_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 4), torch.randint(2, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    moments = {k: v.clone() for k, v in opt.state[next(iter(model.parameters()))].items()}
    rng = torch.get_rng_state()

    def loss_fn(module, batch):
        return nn.functional.cross_entropy(module(batch[0]), batch[1])

    cfg = AuditConfig(horizon=5, bisection_steps=1, lr_multipliers=(0.5, 1.0, 4.0))
    result = auditor(model, opt, cfg, batches=[(x, y)], loss_fn=loss_fn).run()
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    state = opt.state[next(iter(model.parameters()))]
    assert all(torch.equal(v, state[k]) for k, v in moments.items())
    assert torch.equal(rng, torch.get_rng_state())
    expected = {"reference/loss_ratio", "optimization/lr_margin", "parametric/param_growth"}
    assert expected <= set(result.values)
    for dim in ("parametric", "data", "learning_signal"):
        assert result.values[f"{dim}/param_distance"] > 0


def test_fork_continues_the_live_optimizer_exactly():
    """An unperturbed rollout of h steps equals h live steps of the same optimizer (momentum
    and step count carried over)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)

    def loss_fn(module, batch):
        return ((module(batch[0]) - batch[1]) ** 2).mean()

    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        opt.step()
    cfg = AuditConfig(horizon=4, dimensions=("optimization",))
    audit = auditor(model, opt, cfg, batches=[(x, y)], loss_fn=loss_fn)
    fork_final = audit.rollout().final
    for _ in range(4):
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        opt.step()
    live = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(fork_final, live, rtol=0, atol=1e-14)


def test_parametric_growth_on_quadratic_is_the_linear_map():
    """For GD on a quadratic the displacement evolves by (I - lr A)^h exactly, so the growth
    ratio is ||(I - lr A)^h d|| / ||d||; above the edge it exceeds 1, below it shrinks."""
    eigs = [4.0, 1.0]
    for lr, grows in ((0.3, False), (0.7, True)):
        model = Quadratic(eigs)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        cfg = AuditConfig(horizon=6, dimensions=("parametric",), divergence_factor=1e6)
        audit = auditor(model, opt, cfg)
        ref, pert = audit.rollout(), audit.rollout(epsilon=1e-4, seed_offset=1)
        d0 = pert.start - ref.start
        step = torch.eye(2, dtype=torch.float64) - lr * model.a
        expected = torch.linalg.matrix_power(step, 6) @ d0
        torch.testing.assert_close(pert.final - ref.final, expected, rtol=1e-8, atol=1e-14)
        assert (expected.norm() > d0.norm()) == grows


def test_perturbations_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    p = [torch.full((1000,), 2.0), torch.zeros(10)]
    before = [t.clone() for t in p]
    perturb_parameters(p, 1e-2, g)
    assert (p[0] - before[0]).norm() / before[0].norm() == pytest.approx(1e-2, rel=1e-5)
    assert (p[1] - before[1]).norm() == pytest.approx(1e-2, rel=1e-5)
    x, y = torch.randn(4000, 2), torch.arange(4000) % 5
    nx, ny = perturb_batch((x, y), 0.5, 0.2, g)
    assert (nx - x).std().item() == pytest.approx(0.5 * x.std().item(), rel=0.05)
    changed = (ny != y).float().mean().item()
    assert changed == pytest.approx(0.2 * 0.8, abs=0.03)  # 1/5 of resamples hit the same label
    assert torch.equal(torch.bincount(ny, minlength=5).bool(), torch.ones(5, dtype=torch.bool))


@dataclasses.dataclass
class DataclassBatch:
    x: torch.Tensor
    y: torch.Tensor
    name: str = "batch"


class NamedBatch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_batch_tensors_are_disturbed_in_any_collection():
    """Tensors are reached in sequences, mappings, named tuples and dataclasses, in order, so a
    batch draws the same noise whatever holds its tensors."""
    x, y = torch.randn(64, 3), torch.arange(64) % 4
    plain = perturb_batch((x, y), 0.5, 0.5, torch.Generator().manual_seed(0))
    cases = [
        ([x, y], lambda b: b),
        ({"x": x, "y": y}, lambda b: (b["x"], b["y"])),
        (OrderedDict(x=x, y=y), lambda b: (b["x"], b["y"])),
        (NamedBatch(x, y), lambda b: b),
        (DataclassBatch(x, y), lambda b: (b.x, b.y)),
    ]
    for batch, tensors in cases:
        out = perturb_batch(batch, 0.5, 0.5, torch.Generator().manual_seed(0))
        assert type(out) is type(batch)
        nx, ny = tensors(out)
        assert torch.equal(nx, plain[0]) and torch.equal(ny, plain[1])
    assert torch.equal(batch.x, x) and batch.name == "batch"  # the input is not changed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"horizon": 0},
        {"dimensions": ("parametric", "chaos")},
        {"lr_multipliers": (2.0, 1.0)},
        {"divergence_factor": 1.0},
        {"label_noise": 1.5},
        {"epsilon": -1.0},
    ],
)
def test_bad_config_raises_naming_the_argument(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AuditConfig(**kwargs)


def test_half_precision_model_is_audited_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 4, dtype=torch.bfloat16), torch.randint(2, (16,))
    seen = []

    def loss_fn(module, batch):
        seen.append((next(module.parameters()).dtype, batch[0].dtype))
        return nn.functional.cross_entropy(module(batch[0]), batch[1])

    cfg = AuditConfig(horizon=3, dimensions=("parametric",))
    result = auditor(model, opt, cfg, batches=[(x, y)], loss_fn=loss_fn).run()
    assert set(seen) == {(torch.float32, torch.float32)}
    assert math.isfinite(result.values["parametric/param_growth"])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
