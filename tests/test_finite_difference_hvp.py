"""The finite-difference Hessian operator against the exact one, its isolation (weights
bit for bit, ``.grad``), and SharpnessMonitor's switch to it when double backward fails."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyClassifier, classification_data, flat_weights, loader, trainer
from test_sharpness_monitor import exact_hessian
from torch import nn

from lightning_stability.estimators.finite_difference_hvp import FiniteDifferenceHessian
from lightning_stability.estimators.hvp import HessianOperator
from lightning_stability.estimators.lanczos import lanczos_top_k
from lightning_stability.probes.curvature_subset import make_operator
from lightning_stability.probes.sharpness import SharpnessMonitor


def _problem(dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)
    x = torch.randn(40, 6, dtype=dtype)
    y = torch.randint(0, 3, (40,))

    def closure() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    return model, closure


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-5), (torch.float32, 2e-3)])
def test_products_match_double_backward(dtype, rtol):
    model, closure = _problem(dtype)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    vectors = [torch.randn(sum(p.numel() for p in params), generator=g, dtype=torch.float64)]
    vectors += [torch.randn_like(vectors[0]) for _ in range(2)]
    # the exact products first: the finite differences move the weights in place
    with HessianOperator(closure, params) as exact:
        wanted = [exact.matvec(v).double() for v in vectors]
        grad = exact.gradient().clone()
    with FiniteDifferenceHessian(closure, params) as fd:
        for v, want in zip(vectors, wanted):
            got = fd.matvec(v).double()
            assert float((got - want).norm() / want.norm()) < rtol
        assert fd.num_products == 3
        assert torch.allclose(fd.gradient().to(dtype), grad, rtol=1e-5, atol=1e-7)


def test_top_eigenvalue_matches_exact_hessian():
    model, closure = _problem(torch.float32)
    params = list(model.parameters())
    with HessianOperator(closure, params) as op:
        eye = torch.eye(op.dim, dtype=torch.float32)
        h = torch.stack([op.matvec(e).double() for e in eye])
    top = float(torch.linalg.eigvalsh((h + h.T) / 2)[-1])
    with FiniteDifferenceHessian(closure, params) as fd:
        res = lanczos_top_k(fd.matvec, fd.dim, k=1, tol=1e-5, max_iter=40)
    assert float(res.eigenvalues[0]) == pytest.approx(top, rel=1e-3)


def test_weights_and_grads_are_left_as_they_were():
    model, closure = _problem(torch.float32)
    closure().backward()
    grads = [p.grad for p in model.parameters()]
    saved = [g.clone() for g in grads]
    before = flat_weights(model)
    with FiniteDifferenceHessian(closure, list(model.parameters())) as fd:
        fd.matvec(torch.ones(fd.dim))
        fd.gradient()
    assert torch.equal(flat_weights(model), before)
    for p, g, s in zip(model.parameters(), grads, saved):
        assert p.grad is g and torch.equal(p.grad, s)


def test_invalid_step_names_it():
    model, closure = _problem(torch.float32)
    with pytest.raises(ValueError, match="step"):
        FiniteDifferenceHessian(closure, list(model.parameters()), step=0.0)


def test_make_operator_picks_exact_for_plain_parameters():
    model, closure = _problem(torch.float32)
    params = list(model.parameters())
    assert isinstance(make_operator("auto", closure, params, None), HessianOperator)
    assert isinstance(
        make_operator("finite_difference", closure, params, None), FiniteDifferenceHessian
    )


class _NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward refuses to be differentiated (as some fused kernels do)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is wanted
            raise NotImplementedError("this kernel has no double backward")
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class OnceDifferentiable(TinyClassifier):
    def forward(self, x):
        h = _NoDoubleBackward.apply(self.net[0](x))
        return self.net[2](h)


def test_monitor_falls_back_to_finite_differences_when_double_backward_fails():
    exact_model = TinyClassifier(opt="sgd", lr=0.05)
    model = OnceDifferentiable(opt="sgd", lr=0.05)
    model.load_state_dict(exact_model.state_dict())
    readings, monitors = [], []
    for m in (exact_model, model):
        cb = SharpnessMonitor(every_n_steps=5, directional_every_n_steps=5, tol=1e-5)
        trainer(max_steps=5, callbacks=[cb]).fit(m, loader(classification_data(), shuffle=False))
        assert not cb.is_set_aside("curvature")
        readings.append(cb.readings["stability/sharpness/lambda_max"].value)
        monitors.append(cb)
    assert not monitors[0]._fd_fallback and monitors[1]._fd_fallback
    # the two models compute the same function; the plain one has a double backward
    h, _ = exact_hessian(exact_model, monitors[0]._batches)
    top = float(torch.linalg.eigvalsh(h)[-1])
    assert readings[0] == pytest.approx(top, rel=1e-4)
    assert math.isfinite(readings[1])
    assert readings[1] == pytest.approx(top, rel=1e-3)
