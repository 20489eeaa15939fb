import pytest
import torch
from torch import nn

from benchmarks.hessian_models import REFERENCE, bn_dropout_mlp, exact_hessian
from lightning_stability.estimators import PyHessianBackend, hessian_top_k, hessian_trace


@pytest.mark.parametrize("make", REFERENCE[:3], ids=lambda f: f.__name__)
def test_top_eigenvalue_agrees_with_lanczos_within_1_percent(make):
    problem = make()
    ours = hessian_top_k(problem.module, problem.loss)
    theirs = PyHessianBackend(problem.loss, problem.params, problem.module).top_k(
        max_iter=300, tol=1e-5
    )
    assert float(theirs.eigenvalues[0]) == pytest.approx(float(ours.eigenvalues[0]), rel=1e-2)
    assert theirs.num_products > 0
    assert theirs.eigenvectors.shape == (problem.dim, 1)


def test_modes_grads_buffers_and_rng_are_untouched():
    problem = bn_dropout_mlp()
    problem.module.train()
    sentinels = [torch.full_like(p, 3.0) for p in problem.params]
    for p, s in zip(problem.params, sentinels):
        p.grad = s
    buffers = [b.clone() for b in problem.module.buffers()]
    rng = torch.get_rng_state()
    backend = PyHessianBackend(problem.loss, problem.params, problem.module)
    backend.top_k(k=2, max_iter=20)
    backend.trace(max_iter=5)
    assert all(m.training for m in problem.module.modules())
    assert all(p.grad is s for p, s in zip(problem.params, sentinels))
    assert all(s.grad_fn is None and bool((s == 3.0).all()) for s in sentinels)
    assert all(torch.equal(a, b) for a, b in zip(buffers, problem.module.buffers()))
    assert torch.equal(torch.get_rng_state(), rng)


def test_no_grad_attribute_and_no_graph_left_when_grads_were_none():
    problem = REFERENCE[0]()
    PyHessianBackend(problem.loss, problem.params).trace(max_iter=3)
    assert all(p.grad is None for p in problem.params)


def test_trace_agrees_exactly_on_a_separable_loss():
    # A separable loss has a diagonal Hessian: every Hutchinson sample is exact, so both
    # implementations must agree with the exact trace to rounding.
    weights = nn.Parameter(torch.linspace(-1.0, 1.0, 12))
    scale = torch.linspace(0.5, 2.0, 12)

    class Sep(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = weights

    module = Sep()

    def loss_of(w):
        return (torch.cosh(scale * w) + w**4).sum()

    def loss():
        return loss_of(module.w)

    exact = float(torch.autograd.functional.hessian(loss_of, weights.detach()).trace())
    theirs = hessian_trace(module, loss, 10, method="pyhessian")
    ours = hessian_trace(module, loss, 10, method="hutchinson")
    assert theirs.estimate == pytest.approx(exact, rel=1e-5)
    assert ours.estimate == pytest.approx(theirs.estimate, rel=1e-5)


def test_trace_on_a_network_is_consistent_with_exact_within_its_standard_error():
    problem = REFERENCE[1]()
    exact = float(exact_hessian(problem).trace())
    res = PyHessianBackend(problem.loss, problem.params, problem.module).trace(
        max_iter=100, tol=0.0
    )
    assert res.num_products == 100
    assert abs(res.estimate - exact) < 4 * res.std_error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    problem = REFERENCE[0]()
    problem.module.cuda()
    problem.inputs, problem.targets = problem.inputs.cuda(), problem.targets.cuda()
    res = PyHessianBackend(problem.loss, problem.params, problem.module).top_k(max_iter=50)
    assert torch.isfinite(res.eigenvalues).all()


def test_rejects_plain_tensors():
    with pytest.raises(ValueError, match="params"):
        PyHessianBackend(lambda: torch.zeros(()), [torch.zeros(2, requires_grad=True)])
