"""Train a small MLP on scikit-learn's digits and watch its sharpness approach 2/lr.

Every few steps the top Hessian eigenvalue of the training loss is estimated by Lanczos
(warm-started from the previous eigenvector) and printed next to the edge-of-stability
threshold 2/lr (Cohen et al. 2021); both go to TensorBoard under ``runs/estimators_only``.

    python examples/estimators_only.py
    tensorboard --logdir runs/estimators_only
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_stability.estimators import hessian_top_k


def main(steps: int = 300, every: int = 20, lr: float = 0.2) -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    probe_x, probe_y = x[:256], y[:256]
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    writer = SummaryWriter("runs/estimators_only")
    previous = None
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            res = hessian_top_k(
                model,
                lambda: nn.functional.cross_entropy(model(probe_x), probe_y),
                warm_start=previous,
                generator=generator,
            )
            previous = res.eigenvectors
            sharpness = float(res.eigenvalues[0])
            print(
                f"step {step:4d}  loss {loss.item():.3f}  lambda_max {sharpness:7.3f}"
                f"  2/lr {2 / lr:.1f}  HVPs {res.num_products}"
            )
            writer.add_scalar("stability/sharpness/lambda_max", sharpness, step)
            writer.add_scalar("stability/sharpness/critical", 2 / lr, step)
            writer.add_scalar("stability/sharpness/eos_ratio", sharpness * lr / 2, step)
    writer.close()


if __name__ == "__main__":
    main()
