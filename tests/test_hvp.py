import gc
import weakref

import torch
from torch.func import functional_call

from benchmarks.hessian_models import bn_dropout_mlp, exact_hessian, mlp_tanh, small_cnn
from lightning_stability.estimators import (
    HessianOperator,
    forward_over_reverse_hvp,
    hessian_top_k,
    isolated_hessian,
)


def test_matvec_equals_exact_hessian_times_vector_without_touching_grad():
    problem = small_cnn()
    h = exact_hessian(problem)
    sentinels = [torch.full_like(p, 7.0) for p in problem.params]
    for p, s in zip(problem.params, sentinels):
        p.grad = s
    v = torch.randn(problem.dim)
    with HessianOperator(problem.loss, problem.params) as op:
        hv = op.matvec(v)
    torch.testing.assert_close(hv.double(), h @ v.double(), rtol=1e-4, atol=1e-5)
    assert all(p.grad is s and bool((s == 7.0).all()) for p, s in zip(problem.params, sentinels))


def test_gradient_graph_is_released_on_close():
    problem = mlp_tanh()
    op = HessianOperator(problem.loss, problem.params)
    op.matvec(torch.randn(problem.dim))
    assert op._grads is not None
    ref = weakref.ref(op._grads[0])
    op.close()
    gc.collect()
    assert ref() is None


def test_forward_over_reverse_matches_double_backward():
    problem = mlp_tanh()
    # F.mse_loss's backward is not forward-differentiable in torch.func (ZeroTensor
    # error), so the same loss is written out.
    problem.criterion = lambda out, y: ((out - y) ** 2).mean()
    names = [n for n, _ in problem.module.named_parameters()]

    def loss_of(*ps):
        out = functional_call(problem.module, dict(zip(names, ps)), (problem.inputs,))
        return problem.criterion(out, problem.targets)

    params = [p.detach() for p in problem.params]
    vectors = [torch.randn_like(p) for p in params]
    fwd = forward_over_reverse_hvp(loss_of, params, vectors)
    with HessianOperator(problem.loss, problem.params) as op:
        ref = op.matvec(torch.cat([v.reshape(-1) for v in vectors]))
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in fwd]), ref, rtol=1e-5, atol=1e-6)


def test_train_and_eval_mode_curvature_with_state_restored():
    problem = bn_dropout_mlp()
    problem.module[3].p = 0.0  # dropout off so the train-mode Hessian is deterministic
    problem.module.train()
    buffers = [b.clone() for b in problem.module.buffers()]
    rng = torch.get_rng_state()
    results = {}
    for train in (True, False):
        problem.module.train(train)
        exact = torch.linalg.eigvalsh(exact_hessian(problem))[-1]
        problem.module.train(not train)  # the estimator must switch the mode itself
        res = hessian_top_k(problem.module, problem.loss, train=train, tol=1e-6)
        assert (
            float(res.eigenvalues[0]) == float(exact)
            or abs(float(res.eigenvalues[0]) / float(exact) - 1) < 1e-4
        )
        assert problem.module.training is (not train)
        results[train] = float(res.eigenvalues[0])
    assert abs(results[True] - results[False]) > 1e-3 * abs(results[False])
    assert all(torch.equal(a, b) for a, b in zip(buffers, problem.module.buffers()))
    assert torch.equal(torch.get_rng_state(), rng)


def test_dropout_train_mode_leaves_rng_stream_untouched():
    problem = bn_dropout_mlp()
    problem.module.train()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with isolated_hessian(problem.module, problem.loss, train=True) as op:
        op.matvec(torch.randn(op.dim))
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_float64_compute_on_float32_model_leaves_weights_bit_identical():
    problem = mlp_tanh()
    before = [p.detach().clone() for p in problem.params]
    storages = [p.data_ptr() for p in problem.params]
    with isolated_hessian(problem.module, problem.loss, dtype=torch.float64) as op:
        assert op.dtype == torch.float64
        op.matvec(torch.randn(op.dim, dtype=torch.float64))
    assert [p.data_ptr() for p in problem.params] == storages
    assert all(p.dtype == torch.float32 for p in problem.params)
    assert all(torch.equal(a, p) for a, p in zip(before, problem.params))
