"""Edge-of-stability thresholds and Adam's preconditioned sharpness against the spectral
radius of the optimizers' own linear iteration on a quadratic."""

import pytest
import torch

from lightning_stability.estimators.lanczos import lanczos_top_k
from lightning_stability.estimators.preconditioned import (
    ScaledOperator,
    adam_edge,
    adam_preconditioner,
    adam_state_scale,
    sgd_edge,
)


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def _radius(m: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(m).abs().max())


def _adam_iteration(h, d_inv, lr, beta1):
    """Adam with a frozen preconditioner on L = w^T H w / 2, state (w, m)."""
    n = h.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    top = torch.cat([eye - lr * (1 - beta1) * d_inv @ h, -lr * beta1 * d_inv], dim=1)
    bottom = torch.cat([(1 - beta1) * h, beta1 * eye], dim=1)
    return torch.cat([top, bottom], dim=0)


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_adam_ratio_of_one_is_where_the_iteration_diverges(beta1):
    n = 6
    h = _spd(n)
    d = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.2
    # Preconditioned sharpness from the symmetric form, as the callback computes it.
    op = ScaledOperator(lambda v: h @ v, 1.0 / d)
    sharp = float(lanczos_top_k(op, n, k=1, tol=0, max_iter=n, dtype=torch.float64).eigenvalues[0])
    dense = torch.linalg.eigvals(torch.diag(1 / d) @ h).real.max()
    assert sharp == pytest.approx(float(dense), rel=1e-9)
    lr_edge = 2 * (1 + beta1) / ((1 - beta1) * sharp)  # lr at which ratio = 1
    assert adam_edge(lr_edge, beta1) == pytest.approx(sharp)
    d_inv = torch.diag(1 / d)
    assert _radius(_adam_iteration(h, d_inv, 0.97 * lr_edge, beta1)) < 1
    assert _radius(_adam_iteration(h, d_inv, 1.03 * lr_edge, beta1)) > 1


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov"),
    [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.5, False), (0.9, 0.0, True)],
)
def test_sgd_edge_is_where_heavy_ball_diverges(momentum, dampening, nesterov):
    lam = 3.0  # one curvature; state (w, b) in PyTorch's momentum convention

    def iteration(lr):
        if nesterov:  # b' = mu b + lam w ; w' = w - lr (lam w + mu b')
            return torch.tensor(
                [[1 - lr * lam - lr * momentum * lam, -lr * momentum**2], [lam, momentum]],
                dtype=torch.float64,
            )
        c = 1 - dampening  # b' = mu b + c lam w ; w' = w - lr b'
        return torch.tensor(
            [[1 - lr * c * lam, -lr * momentum], [c * lam, momentum]], dtype=torch.float64
        )

    # edge(lr) = lam  <=>  lr = lr_edge, since edge is proportional to 1 / lr
    lr_edge = sgd_edge(1.0, momentum, dampening, nesterov) / lam
    assert _radius(iteration(0.97 * lr_edge)) < 1
    assert _radius(iteration(1.03 * lr_edge)) > 1


def test_adam_state_scale_gives_the_ratio_from_a_real_optimizer_state():
    torch.manual_seed(0)
    n = 5
    h = _spd(n).float()
    w = torch.nn.Parameter(torch.randn(n))
    lr, beta1 = 0.01, 0.8
    opt = torch.optim.Adam([w], lr=lr, betas=(beta1, 0.99), eps=1e-8)
    for _ in range(7):
        opt.zero_grad()
        (0.5 * w @ h @ w).backward()
        opt.step()
    scale, edge = adam_state_scale(opt, [w])
    assert edge == pytest.approx(2 * (1 + beta1) / ((1 - beta1) * lr))
    state = opt.state[w]
    d = adam_preconditioner(state["exp_avg_sq"], state["step"], 0.99, 1e-8)
    v_hat = state["exp_avg_sq"].double() / (1 - 0.99 ** float(state["step"]))
    assert torch.allclose(d, v_hat.sqrt() + 1e-8)
    ratio = lanczos_top_k(
        ScaledOperator(lambda v: h.double() @ v, scale), n, tol=0, max_iter=n, dtype=torch.float64
    ).eigenvalues[0]
    expected = torch.linalg.eigvals(torch.diag(1 / d) @ h.double()).real.max() / edge
    assert float(ratio) == pytest.approx(float(expected), rel=1e-9)


def test_adam_state_scale_is_none_before_the_first_step():
    w = torch.nn.Parameter(torch.zeros(3))
    assert adam_state_scale(torch.optim.Adam([w]), [w]) is None


def test_adam_state_scale_is_none_at_a_zero_learning_rate():
    """A warm-up that starts at lr = 0 takes no step, so there is no edge: no ratio, and no
    error that would end the run."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=1e-3)
    (w.square().sum()).backward()
    opt.step()
    assert adam_state_scale(opt, [w]) is not None
    opt.param_groups[0]["lr"] = 0.0
    assert adam_state_scale(opt, [w]) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        sgd_edge(0.0)
    with pytest.raises(ValueError, match="beta1"):
        adam_edge(0.1, 1.0)
    with pytest.raises(ValueError, match="scale"):
        ScaledOperator(lambda v: v, torch.tensor([1.0, 0.0]))
