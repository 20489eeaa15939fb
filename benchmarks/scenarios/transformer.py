"""A small causal transformer whose attention is written out, for the logit-growth scenarios.

Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training
instabilities", reproduce two instabilities of large transformers in small ones trained at a
high learning rate: attention logits that grow until the attention softmax saturates (its
entropy collapses; qk-layernorm prevents it), and output logits that drift large until the
loss diverges (weight decay or the z-loss ``1e-4 * log(Z)^2`` prevent it). ``nn.MultiheadAttention``
hides its logits, so this model computes scaled dot-product attention itself, with
``qk_norm`` as the switch for the healthy counterpart, and keeps the largest attention
logit and output logit of its last forward pass for inspection.

Pre-LN blocks, GELU feed-forward, learned positions; trained with AdamW and a linear
warm-up applied multiplicatively to the optimizer's learning rate (so an action that scales
the learning rate composes with it).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.reference import VOCAB

__all__ = ["Block", "CausalSelfAttention", "SmallGPT"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, ``softmax(q k^T / sqrt(d_head)) v``.

    ``qk_norm`` applies a LayerNorm to each head's queries and keys before the product
    (Wortsman et al. 2023, sec. 3.1), which bounds the logits. ``logit_max`` holds the
    largest absolute attention logit of the last forward pass (detached).
    """

    def __init__(self, d_model: int, n_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.q_norm = nn.LayerNorm(self.d_head) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.d_head) if qk_norm else nn.Identity()
        self.logit_max = torch.tensor(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.d_head).unbind(2)
        q, k, v = self.q_norm(q), self.k_norm(k), v
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, d_head)
        logits = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        self.logit_max = logits.detach().abs().max()
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        attn = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, qk_norm)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SmallGPT(pl.LightningModule):
    """A causal character-level transformer language model (ASCII, 128 symbols).

    Args:
        d_model, n_layers, n_heads, seq_len: the shape (defaults 64, 2, 4, 32).
        lr: peak learning rate, reached after ``warmup`` optimizer steps of linear warm-up.
        weight_decay: AdamW's decoupled weight decay (default 0).
        betas, eps: AdamW's.
        qk_norm: LayerNorm on queries and keys (the mitigation for attention logit growth).
        final_norm: LayerNorm before the output layer.
        z_loss: coefficient of ``log(Z)^2`` added to the training loss, where ``Z`` is the
            softmax normaliser of the output logits (the mitigation for output logit
            divergence; Wortsman et al. use 1e-4). Default 0.
        head_lr_mult: the output layer's learning rate relative to ``lr`` (default 1).
    """

    def __init__(
        self,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        seq_len: int = 32,
        lr: float = 1e-3,
        warmup: int = 0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        qk_norm: bool = False,
        final_norm: bool = True,
        z_loss: float = 0.0,
        head_lr_mult: float = 1.0,
    ) -> None:
        super().__init__()
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup!r}")
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) / math.sqrt(d_model))
        self.blocks = nn.Sequential(*[Block(d_model, n_heads, qk_norm) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d_model) if final_norm else nn.Identity()
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.output_logit_max = torch.tensor(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        logits = self.head(self.norm(self.blocks(h)))
        self.output_logit_max = logits.detach().abs().max()
        return logits

    @property
    def attention_logit_max(self) -> float:
        """The largest absolute attention logit over the layers, last forward pass."""
        return max(float(b.attn.logit_max) for b in self.blocks)

    def _loss(self, batch: Any, z_loss: float = 0.0) -> torch.Tensor:
        x, y = batch
        logits = self(x).reshape(-1, VOCAB)
        loss = nn.functional.cross_entropy(logits, y.reshape(-1))
        if z_loss:
            loss = loss + z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, self.hparams.z_loss)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # linear warm-up as a per-step ratio, (t + 1) / t, so that it composes with any
        # other multiplicative change of the learning rate
        t, warmup = self.trainer.global_step, self.hparams.warmup
        if 0 < t < warmup:
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * (t + 1) / t

    def configure_optimizers(self):
        hp = self.hparams
        start = hp.lr / hp.warmup if hp.warmup else hp.lr
        head = list(self.head.parameters())
        rest = [p for n, p in self.named_parameters() if not n.startswith("head.")]
        groups = [{"params": rest, "lr": start}, {"params": head, "lr": start * hp.head_lr_mult}]
        return torch.optim.AdamW(
            groups, lr=start, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay
        )
