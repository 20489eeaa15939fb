"""Critical step size along a direction against its closed form on quadratics."""

import math

import pytest
import torch

from lightning_stability.estimators.critical_sharpness import LineLoss, critical_step_size


def _quadratic(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = a @ a.T / n + 0.05 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    return h, b, w


def _loss(h, b, w):
    return float(0.5 * w @ h @ w + b @ w)


@pytest.mark.parametrize("eta0", [1e-4, 0.3, 50.0])
def test_gradient_direction_gives_directional_curvature(eta0):
    h, b, w = _quadratic()
    g = h @ w + b
    res = critical_step_size(
        lambda eta: _loss(h, b, w - eta * g), _loss(h, b, w), eta0, rtol=1e-3, max_evals=60
    )
    exact = 2 * float(g @ g) / float(g @ h @ g)
    assert res.lower < exact <= res.upper
    assert res.eta == pytest.approx(exact, rel=1e-3)
    assert res.sharpness == pytest.approx(float(g @ h @ g) / float(g @ g), rel=1e-3)


def test_arbitrary_descent_direction():
    h, b, w = _quadratic(seed=1)
    g = h @ w + b
    d = -g + 0.3 * torch.randn(
        g.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    assert float(d @ g) < 0
    res = critical_step_size(
        lambda eta: _loss(h, b, w + eta * d), _loss(h, b, w), 1.0, rtol=1e-4, max_evals=80
    )
    assert res.eta == pytest.approx(-2 * float(d @ g) / float(d @ h @ d), rel=1e-4)


def test_ascent_direction_and_flat_line():
    h, b, w = _quadratic()
    g = h @ w + b
    up = critical_step_size(lambda eta: _loss(h, b, w + eta * g), _loss(h, b, w), 1.0)
    assert up.eta == 0.0 and not up.defined and math.isnan(up.sharpness)
    flat = critical_step_size(lambda eta: 1.0 - eta, 1.0, 1.0, eta_max=1e3)
    assert math.isinf(flat.eta) and flat.sharpness == 0.0


def test_nonfinite_loss_counts_as_a_rise():
    res = critical_step_size(
        lambda eta: math.nan if eta > 2.0 else -eta, 0.0, 1.0, rtol=1e-3, max_evals=60
    )
    assert res.eta == pytest.approx(2.0, rel=1e-3)


def test_line_loss_restores_weights_bit_for_bit():
    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 3)
    before = [p.detach().clone() for p in layer.parameters()]
    x = torch.randn(16, 7)
    direction = torch.randn(sum(p.numel() for p in layer.parameters()))
    with LineLoss(list(layer.parameters()), direction, lambda: layer(x).pow(2).mean()) as line:
        values = [line(eta) for eta in (0.1, 0.37, 1e-3, 2.9)]
        # The weights between evaluations are the saved ones, not w + eta d - eta d.
        assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before))
    assert len(set(values)) == 4
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before))


def test_bad_arguments():
    with pytest.raises(ValueError, match="eta0"):
        critical_step_size(lambda e: 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="rtol"):
        critical_step_size(lambda e: 0.0, 0.0, 1.0, rtol=2.0)
    with pytest.raises(ValueError, match="direction"):
        LineLoss([torch.zeros(3)], torch.zeros(4), lambda: torch.tensor(0.0))


@pytest.mark.parametrize(("a", "b"), [(0.5, 1.0), (40.0, 0.3), (1e-3, 2.0)])
def test_analytic_line_critical_step(a, b):
    """L(eta) = 1 - b eta + a eta^2 rises above L(0) from eta_c = b / a on, so the
    critical sharpness is 2 a / b."""
    res = critical_step_size(
        lambda eta: 1.0 - b * eta + a * eta**2, 1.0, 1.0, rtol=1e-6, max_evals=200, slope=-b
    )
    assert res.defined
    assert res.eta == pytest.approx(b / a, rel=1e-5)
    assert res.sharpness == pytest.approx(2 * a / b, rel=1e-5)


@pytest.mark.parametrize("slope", [0.0, 0.7, math.nan])
def test_non_descent_slope_is_undefined_without_evaluating(slope):
    calls = []

    def line(eta):
        calls.append(eta)
        return 1.0 + eta

    res = critical_step_size(line, 1.0, 1e-3, slope=slope)
    assert not res.defined and math.isnan(res.sharpness) and res.evaluations == 0
    assert not calls
