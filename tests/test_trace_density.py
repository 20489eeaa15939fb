import pytest
import torch

from benchmarks.hessian_models import REFERENCE, Problem, exact_hessian, mlp_tanh
from lightning_stability.estimators import (
    HessianOperator,
    hessian_density,
    hessian_trace,
    hutchinson_trace,
    hutchpp_trace,
    slq_density,
)

TRACE_MODELS = REFERENCE[:3]


def trained(problem: Problem, steps: int = 300) -> Problem:
    """Near a minimum, where the Hessian is close to positive semi-definite with a few
    dominant eigenvalues: the regime the trace is monitored in."""
    opt = torch.optim.Adam(problem.params, lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        problem.loss().backward()
        opt.step()
    problem.module.zero_grad(set_to_none=True)
    return problem


@pytest.fixture(scope="module", params=TRACE_MODELS, ids=lambda f: f.__name__)
def near_minimum(request):
    torch.manual_seed(0)
    problem = trained(request.param())
    return problem, float(exact_hessian(problem).trace())


def test_hutchpp_default_budget_within_5_percent(near_minimum):
    problem, exact = near_minimum
    for seed in range(3):
        res = hessian_trace(
            problem.module, problem.loss, generator=torch.Generator().manual_seed(seed)
        )
        assert res.num_products == 60
        assert res.estimate == pytest.approx(exact, rel=0.05)


def test_hutchpp_beats_hutchinson_at_equal_budget(near_minimum):
    problem, exact = near_minimum
    errors = {hutchinson_trace: 0.0, hutchpp_trace: 0.0}
    with HessianOperator(problem.loss, problem.params) as op:
        for fn in errors:
            for seed in range(10):
                res = fn(op.matvec, op.dim, 30, generator=torch.Generator().manual_seed(seed))
                assert res.num_products == 30
                errors[fn] += (res.estimate / exact - 1) ** 2
    assert errors[hutchpp_trace] < errors[hutchinson_trace]


def test_hutchinson_is_exact_on_a_diagonal_operator():
    # Rademacher probes: g^T D g = tr(D) for every sample.
    diag = torch.linspace(-2, 5, 40)
    res = hutchinson_trace(lambda v: diag * v, 40, 9)
    assert res.estimate == pytest.approx(float(diag.sum()), rel=1e-5)
    assert res.std_error == pytest.approx(0.0, abs=1e-5)


def test_trace_rejects_too_small_budget():
    with pytest.raises(ValueError, match="num_products"):
        hutchpp_trace(lambda v: v, 10, 2)


@pytest.mark.parametrize("make", REFERENCE, ids=lambda f: f.__name__)
def test_slq_density_integrates_to_one_and_covers_the_spectrum(make):
    problem = make()
    spectrum = torch.linalg.eigvalsh(exact_hessian(problem))
    lo, hi = float(spectrum[0]), float(spectrum[-1])
    width = hi - lo
    with HessianOperator(problem.loss, problem.params) as op:
        density = slq_density(op.matvec, op.dim, num_steps=25, num_probes=2)
    assert density.num_products == 50
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(2, dtype=torch.float64))
    grid, curve = density.curve()
    assert float(torch.trapezoid(curve, grid)) == pytest.approx(1.0, abs=1e-3)
    assert bool((curve >= 0).all())
    support_lo, support_hi = density.support
    assert abs(support_lo - lo) < 1e-3 * width and abs(support_hi - hi) < 1e-3 * width
    assert float(grid[0]) < lo and float(grid[-1]) > hi


def test_slq_with_full_krylov_space_recovers_the_exact_spectrum_and_trace():
    problem = mlp_tanh()
    h = exact_hessian(problem)
    density = hessian_density(problem.module, problem.loss, num_steps=200, dtype=torch.float64)
    assert density.num_products == problem.dim
    torch.testing.assert_close(
        density.nodes[0].sort().values, torch.linalg.eigvalsh(h), rtol=1e-6, atol=1e-8
    )
