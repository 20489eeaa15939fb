"""Small models, data and Trainer settings shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def classification_data(n: int = 256, d: int = 10, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


class TinyClassifier(pl.LightningModule):
    """MLP classifier; ``norm``/``dropout`` add BatchNorm and Dropout, ``opt`` picks the
    optimizer ("sgd", "adam", "adamw")."""

    def __init__(
        self,
        d: int = 10,
        hidden: int = 16,
        classes: int = 3,
        lr: float = 0.05,
        opt: str = "sgd",
        norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d, hidden)]
        if norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, classes))
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.opt = opt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.opt == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        raise ValueError(self.opt)


def loader(dataset, batch_size: int = 32, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def trainer(**overrides: Any) -> pl.Trainer:
    """A quiet CPU Trainer for tests; keyword arguments override the defaults."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def flat_weights(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class DumpOnFitEnd(Callback):
    """Saves ``extract(trainer, pl_module)`` to ``<dir>/rank<r>.pt`` at the end of fit;
    the way a DDP-spawn test gets results back from every rank."""

    def __init__(self, directory: str | os.PathLike, extract) -> None:
        self.directory = Path(directory)
        self.extract = extract

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(
            self.extract(trainer, pl_module), self.directory / f"rank{trainer.global_rank}.pt"
        )


def load_ranks(directory: str | os.PathLike, world_size: int = 2) -> list[Any]:
    return [
        torch.load(Path(directory) / f"rank{r}.pt", weights_only=False) for r in range(world_size)
    ]


class DestroyProcessGroup(Callback):
    """Destroys the worker's process group at the very end of fit. Neither Lightning's
    spawn launcher nor torch does, and a gloo group left to the interpreter's exit can
    abort the worker ("terminate called without an active exception", SIGABRT) after
    training has finished."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank may still be in a collective of this run
            dist.destroy_process_group()


def ddp_trainer(**overrides: Any) -> pl.Trainer:
    """Two CPU processes on gloo (spawned, so it works under pytest)."""
    kwargs: dict[str, Any] = dict(strategy="ddp_spawn", devices=2)
    kwargs.update(overrides)
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), DestroyProcessGroup()]
    return trainer(**kwargs)


def rank_and_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """An ``extract`` for :class:`DumpOnFitEnd`: the rank and the flat weights."""
    return {"rank": trainer.global_rank, "weights": flat_weights(pl_module)}
