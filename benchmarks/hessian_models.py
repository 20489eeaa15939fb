"""Reference models for the curvature estimators.

Tiny models (37-114 parameters) whose exact Hessian is cheap serve as ground truth in the
tests; ``exact_hessian`` differentiates the loss twice with respect to one flat float64
parameter vector. Realistic models (an MLP and a CNN on scikit-learn's 8x8 digits, tens
of thousands of parameters, trained briefly by SGD so the spectrum has structure) serve
the estimator benchmark, where the ground truth is a long converged float64 Lanczos run.

Each problem is a module, a fixed batch and a loss (plus, for the trained models, the
training set so that further SGD steps can be taken).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call


@dataclass
class Problem:
    name: str
    module: nn.Module
    inputs: Tensor
    targets: Tensor
    criterion: Callable[[Tensor, Tensor], Tensor]
    train_inputs: Tensor | None = None
    train_targets: Tensor | None = None

    def loss(self) -> Tensor:
        return self.criterion(self.module(self.inputs), self.targets)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)


def exact_hessian(problem: Problem) -> Tensor:
    """The ``(dim, dim)`` float64 Hessian of ``problem.loss()`` in the module's current
    mode (buffers are read, not updated: a copy of the module is used)."""
    module = _double_copy(problem.module)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in module.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])
    inputs = problem.inputs.double() if problem.inputs.is_floating_point() else problem.inputs
    targets = problem.targets.double() if problem.targets.is_floating_point() else problem.targets

    def f(flat: Tensor) -> Tensor:
        params, offset = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            params[n] = flat[offset : offset + k].view(s)
            offset += k
        return problem.criterion(functional_call(module, params, (inputs,)), targets)

    return torch.autograd.functional.hessian(f, flat0)


def exact_spectrum(problem: Problem) -> Tensor:
    """Eigenvalues of the exact Hessian, descending (float64)."""
    return torch.linalg.eigvalsh(exact_hessian(problem)).flip(0)


def _double_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).double()


def mlp_tanh(seed: int = 0) -> Problem:
    """Tanh MLP regression (MSE), 5 -> 8 -> 2."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(32, 5, generator=g)
    y = torch.randn(32, 2, generator=g)
    return Problem("mlp_tanh", module, x, y, nn.functional.mse_loss)


def mlp_relu_ce(seed: int = 0) -> Problem:
    """ReLU MLP classifier (cross-entropy), 6 -> 10 -> 4."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    x = torch.randn(48, 6, generator=g)
    y = torch.randint(0, 4, (48,), generator=g)
    return Problem("mlp_relu_ce", module, x, y, nn.functional.cross_entropy)


def small_cnn(seed: int = 0) -> Problem:
    """Conv(1->3, 3x3) + tanh + max-pool + linear classifier on 6x6 images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 3),
    )
    x = torch.randn(24, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return Problem("small_cnn", module, x, y, nn.functional.cross_entropy)


def saddle_mlp(seed: int = 0) -> Problem:
    """A tanh layer under a frozen all-ones read-out, fitting targets far below its
    saturated outputs: the residual times tanh'' makes the curvature mostly negative and
    the most negative eigenvalue (about -18) far exceeds the top one (about 2.6) in
    magnitude, so power iteration finds the wrong end of the spectrum."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    with torch.no_grad():
        module[0].bias.fill_(1.0)
        module[2].weight.fill_(1.0)
        module[2].bias.zero_()
    module[2].requires_grad_(False)
    x = torch.randn(32, 4, generator=g)
    y = torch.full((32, 1), -5.0)
    return Problem("saddle_mlp", module, x, y, nn.functional.mse_loss)


def bn_dropout_mlp(seed: int = 0) -> Problem:
    """MLP with BatchNorm and Dropout (train/eval mode curvature differ)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)
    )
    x = torch.randn(32, 5, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return Problem("bn_dropout_mlp", module, x, y, nn.functional.cross_entropy)


REFERENCE = [mlp_tanh, mlp_relu_ce, small_cnn, saddle_mlp]


def digits(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digit images as standardised ``(1797, 64)`` features and
    integer labels (ships with scikit-learn: no download)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-3)
    return x, torch.tensor(data.target, dtype=torch.long)


def sgd_steps(
    problem: Problem, steps: int, lr: float, batch_size: int, generator: torch.Generator
) -> None:
    """Plain SGD on minibatches of the problem's training set drawn by ``generator``."""
    assert problem.train_inputs is not None and problem.train_targets is not None
    opt = torch.optim.SGD(problem.params, lr=lr)
    n = problem.train_inputs.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        opt.zero_grad(set_to_none=True)
        out = problem.module(problem.train_inputs[idx])
        problem.criterion(out, problem.train_targets[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


TRAIN_LR = 0.1
"""SGD learning rate of the realistic models' training (and of the warm-start step)."""
TRAIN_BATCH = 64


def _trained(name: str, module: nn.Module, x: Tensor, y: Tensor, seed: int, steps: int,
             hessian_batch: int) -> Problem:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    x, y = x[perm], y[perm]
    problem = Problem(name, module, x[:hessian_batch], y[:hessian_batch],
                      nn.functional.cross_entropy, x, y)  # fmt: skip
    sgd_steps(problem, steps, TRAIN_LR, TRAIN_BATCH, g)
    return problem


def digits_mlp(seed: int = 0, steps: int = 200, hessian_batch: int = 512) -> Problem:
    """ReLU MLP 64 -> 128 -> 128 -> 10 on digits (26,122 parameters), trained ``steps``
    SGD steps (lr 0.1, batch 64); the Hessian is taken on a fixed batch of
    ``hessian_batch`` training images."""
    torch.manual_seed(seed)
    module = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    x, y = digits()
    return _trained("digits_mlp", module, x, y, seed, steps, hessian_batch)


def digits_cnn(seed: int = 0, steps: int = 200, hessian_batch: int = 128) -> Problem:
    """CNN on 8x8 digits: conv 3x3 (1 -> 8) + ReLU, conv 3x3 (8 -> 16) + ReLU, 2x2
    max-pool, linear 256 -> 10 (3,818 parameters); trained like :func:`digits_mlp`."""
    torch.manual_seed(seed)
    module = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10),
    )  # fmt: skip
    x, y = digits()
    return _trained("digits_cnn", module, x.view(-1, 1, 8, 8), y, seed, steps, hessian_batch)


REALISTIC = [digits_mlp, digits_cnn]
