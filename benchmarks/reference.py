"""The reference task on which callback overhead is measured: a small character-level
transformer language model trained on text from Python's own standard library.

A realistic per-step cost (tens of milliseconds on a CPU) matters for overhead ratios: on a
toy model whose step takes a millisecond, any callback looks expensive.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["CharLM", "CharTextDataset", "reference_dataloader", "reference_module", "stdlib_text"]

STDLIB_FILES = ("textwrap.py", "string.py", "heapq.py", "bisect.py", "functools.py", "shlex.py")
VOCAB = 128


def stdlib_text(max_chars: int = 200_000) -> str:
    """ASCII text from a fixed list of standard-library modules (ships with Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in STDLIB_FILES:
        path = root / name
        if path.exists():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    text = "\n".join(parts)
    return "".join(c if ord(c) < VOCAB else "?" for c in text)[:max_chars]


class CharTextDataset(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` characters; item = (input, target)."""

    def __init__(self, text: str, seq_len: int = 64) -> None:
        data = torch.tensor([ord(c) for c in text], dtype=torch.long)
        n = (len(data) - 1) // seq_len
        self.x = data[: n * seq_len].view(n, seq_len)
        self.y = data[1 : n * seq_len + 1].view(n, seq_len)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class CharLM(pl.LightningModule):
    """A causal transformer language model over ASCII characters."""

    def __init__(
        self,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        seq_len: int = 64,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) / math.sqrt(d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)
        self.register_buffer(
            "causal_mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.pos[:t]
        h = self.blocks(h, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        self.log("val_loss", loss)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9)
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, betas=hp.betas)
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=hp.betas)


def reference_module(**kwargs: Any) -> CharLM:
    """The reference model (defaults: 2 layers, d_model 128, AdamW lr 1e-3)."""
    return CharLM(**kwargs)


def reference_dataloader(batch_size: int = 32, seq_len: int = 64, seed: int = 0) -> DataLoader:
    """Shuffled training batches of the standard-library text (seeded order)."""
    dataset = CharTextDataset(stdlib_text(), seq_len)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def quiet_trainer(**overrides: Any) -> pl.Trainer:
    """A CPU Trainer for timing and measuring: one device, no logger, checkpoints, progress
    bar or model summary unless ``overrides`` say otherwise."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)
