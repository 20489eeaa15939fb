"""Small reference models whose exact Hessian is cheap: ground truth for the estimators.

Each problem is a module, a fixed batch and a loss; ``exact_hessian`` differentiates the
loss twice with respect to one flat float64 parameter vector.
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
