"""The small, real tasks the scenarios train: an MLP on scikit-learn's digits, an MLP on a
synthetic teacher-student regression, and the reference character-level transformer on
standard-library text (imported from :mod:`benchmarks.reference`). All data ships with a
package; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from benchmarks.reference import CharLM, CharTextDataset, stdlib_text

__all__ = [
    "MLP",
    "charlm_data",
    "charlm_module",
    "digits_data",
    "digits_onehot_data",
    "seeded_loader",
    "synthetic_regression_data",
]


class MLP(pl.LightningModule):
    """A multilayer perceptron for classification (cross-entropy) or regression (MSE).

    Args:
        d_in: input features. d_out: classes (classification) or targets (regression).
        hidden: width of each hidden layer. depth: number of hidden layers.
        task: ``"classification"`` or ``"regression"``.
        lr: learning rate. optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        betas: Adam's betas. activation: ``"tanh"`` or ``"relu"``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        hidden: int = 64,
        depth: int = 2,
        task: str = "classification",
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = d_in
        for _ in range(depth):
            act = nn.Tanh() if activation == "tanh" else nn.ReLU()
            layers += [nn.Linear(width, hidden), act]
            width = hidden
        layers.append(nn.Linear(width, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.hparams.task == "classification":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out.squeeze(-1), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)
        return torch.optim.Adam(self.parameters(), lr=hp.lr, betas=hp.betas)


def seeded_loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """A DataLoader whose order comes from its own generator, not from the global RNG."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def digits_data(seed: int = 0, n_val: int = 297) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), standardised with the training
    split's statistics; the split is drawn from ``seed``.

    A pixel that is constant over the training split keeps scale 1 (as scikit-learn's
    ``StandardScaler`` does): dividing by a clamped tiny standard deviation would turn a
    validation image that has ink there into a 1000-sigma input whose single loss then
    dominates the validation mean."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    xt, yt, xv, yv = x[n_val:], y[n_val:], x[:n_val], y[:n_val]
    mean, std = xt.mean(0), xt.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return TensorDataset((xt - mean) / std, yt), TensorDataset((xv - mean) / std, yv)


def digits_onehot_data(seed: int = 0, n_val: int = 297) -> tuple[TensorDataset, TensorDataset]:
    """:func:`digits_data` with one-hot float targets, for a mean-squared-error fit of the
    10 class indicators (the square loss under which Cohen et al. (2021) observe
    progressive sharpening most clearly)."""
    (xt, yt), (xv, yv) = (d.tensors for d in digits_data(seed, n_val))
    one_hot = nn.functional.one_hot
    return TensorDataset(xt, one_hot(yt, 10).float()), TensorDataset(xv, one_hot(yv, 10).float())


def synthetic_regression_data(
    seed: int = 0, n: int = 2048, d: int = 16, noise: float = 0.1, n_val: int = 256
) -> tuple[TensorDataset, TensorDataset]:
    """Targets from a random tanh teacher network plus Gaussian noise, standardised to unit
    variance: ``y = teacher(x) + noise * eps`` with ``x ~ N(0, I_d)``."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(n + n_val, d, generator=g)
    w1 = torch.randn(d, 32, generator=g) / d**0.5
    w2 = torch.randn(32, generator=g) / 32**0.5
    y = torch.tanh(x @ w1) @ w2
    y = (y - y.mean()) / y.std()
    y = y + noise * torch.randn(len(y), generator=g)
    return TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val])


def charlm_data(seq_len: int = 32, max_chars: int = 60_000) -> tuple[Dataset, Dataset]:
    """Standard-library text split 90/10 into training and validation windows."""
    text = stdlib_text(max_chars)
    cut = int(0.9 * len(text))
    return CharTextDataset(text[:cut], seq_len), CharTextDataset(text[cut:], seq_len)


def charlm_module(**kwargs: Any) -> CharLM:
    """The reference char-LM, smaller by default so that a scenario run takes seconds."""
    defaults: dict[str, Any] = dict(d_model=64, n_layers=2, n_heads=4, seq_len=32, optimizer="adam")
    defaults.update(kwargs)
    return CharLM(**defaults)
