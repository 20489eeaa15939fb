import pytest
import torch
from torch import nn

from benchmarks.hessian_models import REFERENCE, exact_hessian, saddle_mlp
from lightning_stability.estimators import (
    HessianOperator,
    PyHessianBackend,
    hessian_top_k,
    lanczos_top_k,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("make", REFERENCE, ids=lambda f: f.__name__)
@pytest.mark.parametrize("k", [1, 3])
def test_top_k_matches_exact_spectrum(make, k):
    problem = make()
    exact = torch.linalg.eigvalsh(exact_hessian(problem)).flip(0)[:k]
    with HessianOperator(problem.loss, problem.params) as op:
        res = lanczos_top_k(op.matvec, op.dim, k, generator=_gen())
    assert res.converged
    assert res.eigenvalues.shape == (k,)
    assert torch.all(res.eigenvalues[:-1] >= res.eigenvalues[1:])
    torch.testing.assert_close(res.eigenvalues, exact, rtol=1e-4, atol=0)
    assert res.num_products < problem.dim


@pytest.mark.parametrize("make", REFERENCE, ids=lambda f: f.__name__)
def test_eigenvectors_are_orthonormal_eigenvectors(make):
    problem = make()
    h = exact_hessian(problem)
    with HessianOperator(problem.loss, problem.params) as op:
        res = lanczos_top_k(op.matvec, op.dim, 2, tol=1e-6, generator=_gen(), dtype=torch.float64)
    v = res.eigenvectors
    torch.testing.assert_close(v.T @ v, torch.eye(2, dtype=v.dtype), atol=1e-10, rtol=0)
    exact_vectors = torch.linalg.eigh(h).eigenvectors.flip(1)[:, :2]
    cosines = (exact_vectors.T @ v).diagonal().abs()
    assert float(cosines.min()) > 1 - 1e-4


def test_negative_curvature_dominates_power_iteration_is_wrong_lanczos_is_right():
    problem = saddle_mlp()
    spectrum = torch.linalg.eigvalsh(exact_hessian(problem))
    top, bottom = float(spectrum[-1]), float(spectrum[0])
    assert 0 < top < abs(bottom) / 3  # the premise of the test
    with HessianOperator(problem.loss, problem.params) as op:
        ours = lanczos_top_k(op.matvec, op.dim, generator=_gen())
    power = PyHessianBackend(problem.loss, problem.params, problem.module).top_k(max_iter=500)
    assert float(ours.eigenvalues[0]) == pytest.approx(top, rel=1e-4)
    assert float(power.eigenvalues[0]) == pytest.approx(bottom, rel=1e-2)


def test_warm_start_after_one_sgd_step_is_cheaper_and_as_accurate():
    problem = REFERENCE[1]()
    with HessianOperator(problem.loss, problem.params) as op:
        before = lanczos_top_k(op.matvec, op.dim, 3, generator=_gen())
    opt = torch.optim.SGD(problem.params, lr=0.1)
    problem.loss().backward()
    opt.step()
    problem.module.zero_grad(set_to_none=True)
    exact = torch.linalg.eigvalsh(exact_hessian(problem)).flip(0)[:3]
    with HessianOperator(problem.loss, problem.params) as op:
        cold = lanczos_top_k(op.matvec, op.dim, 3, generator=_gen(1))
        warm = lanczos_top_k(
            op.matvec, op.dim, 3, warm_start=before.eigenvectors, generator=_gen(1)
        )
    torch.testing.assert_close(warm.eigenvalues, exact, rtol=1e-4, atol=0)
    assert warm.num_products < cold.num_products


def test_float64_basis_reaches_float64_accuracy():
    problem = REFERENCE[0]()
    exact = torch.linalg.eigvalsh(exact_hessian(problem)).flip(0)[:2]
    res = hessian_top_k(problem.module, problem.loss, 2, tol=1e-10, dtype=torch.float64)
    assert res.eigenvectors.dtype == torch.float64
    torch.testing.assert_close(res.eigenvalues, exact, rtol=1e-9, atol=0)
    assert all(p.dtype == torch.float32 for p in problem.module.parameters())


def test_exhausted_krylov_space_and_repeated_eigenvalues_are_exact():
    diag = torch.tensor([3.0, 3.0, -5.0, 1.0, 0.5], dtype=torch.float64)
    res = lanczos_top_k(lambda v: diag * v, 5, 3, dtype=torch.float64, generator=_gen())
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 3.0, 1.0], dtype=torch.float64))
    assert res.converged


def test_max_iter_bound_is_respected():
    a = torch.linspace(-1, 1, 500, dtype=torch.float64)
    res = lanczos_top_k(lambda v: a * v, 500, tol=1e-12, max_iter=7, dtype=torch.float64)
    assert res.num_products == 7
    assert not res.converged


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"k": 0}, "k"), ({"k": 9}, "k"), ({"tol": -1.0}, "tol"), ({"max_iter": 0}, "max_iter")],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lanczos_top_k(lambda v: v, 8, **kwargs)


def test_bad_warm_start_shape_raises():
    with pytest.raises(ValueError, match="warm_start"):
        lanczos_top_k(lambda v: v, 8, warm_start=torch.ones(7))


def test_front_end_rejects_unknown_backend():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="backend"):
        hessian_top_k(model, lambda: model(torch.ones(1, 2)).sum(), backend="arpack")


def test_non_finite_operator_raises_floating_point_error():
    def matvec(v):
        out = 2.0 * v
        out[0] = float("nan")
        return out

    with pytest.raises(FloatingPointError, match="non-finite"):
        lanczos_top_k(matvec, 10, k=1)
