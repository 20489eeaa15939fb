"""The healthy-run corpus: training configurations that a careful practitioner would call
healthy, the yardstick for false alarms (see :mod:`benchmarks.healthy`).

The corpus spans model families (MLP, CNN with and without BatchNorm, residual MLP with
LayerNorm, a transformer and a GRU char-LM, an LSTM on synthetic sequences), optimizers
(SGD plain, momentum, Nesterov, Adam, AdamW, RMSprop, Adagrad), schedules (constant,
warm-up + cosine, step decay, OneCycle, ReduceLROnPlateau, CyclicLR) and regimes (tiny
batches, full-batch gradient descent at the edge of stability, zero and large weight
decay, fine-tuning with a frozen-then-unfrozen backbone, a curriculum that switches the
data distribution at an epoch boundary, label smoothing, bf16 autocast, gradient
accumulation, gradient clipping, two runs of 20,000 steps at their noise floor).

It is split by configuration: defaults may be tuned on ``split="calibration"``, and
``split="validation"`` is only reported. Each half mixes families, optimizers and
schedules. Every configuration trains bare for three seeds without diverging (by
:func:`benchmarks.scenarios.divergence.divergence_step`) and with its loss falling clearly
below its start. All data ships with a package; nothing is downloaded.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from benchmarks.reference import VOCAB
from benchmarks.scenarios.registry import CHARLM_CHANCE, DIGITS_CHANCE, Built, Scenario
from benchmarks.scenarios.tasks import (
    charlm_data,
    charlm_module,
    digits_data,
    seeded_loader,
    synthetic_regression_data,
)

__all__ = [
    "HEALTHY",
    "CurriculumSampler",
    "Trainable",
    "sequence_regression_data",
]


class Trainable(pl.LightningModule):
    """A network plus the recipe that trains it: loss, optimizer and learning-rate schedule.

    Args:
        net: maps a batch's input to logits (classification, char-LM) or predictions.
        loss: ``"ce"`` (cross-entropy over the last dimension, so char-LM logits work too),
            ``"mse"`` (regression) or ``"mse_onehot"`` (classification by squared error).
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` or ``"adagrad"``;
            ``opt_kwargs`` go to its constructor (momentum, nesterov, weight_decay, ...).
        lr: base (for OneCycle and CyclicLR: peak) learning rate.
        schedule: ``"constant"``, ``"warmup_cosine"``, ``"step"``, ``"onecycle"``,
            ``"cyclic"`` or ``"plateau"`` (ReduceLROnPlateau on ``val_loss``, checked at
            each epoch end; the scenario validates once per epoch so the value is fresh).
        total_steps: optimizer steps of the run (the schedules end there).
        label_smoothing: for ``"ce"``.
        frozen: parameter-name prefixes frozen until ``unfreeze_at`` (fine-tuning);
            ``backbone_lr_mult`` scales their learning rate once they train.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        loss: str = "ce",
        optimizer: str = "sgd",
        lr: float = 0.05,
        opt_kwargs: dict[str, Any] | None = None,
        schedule: str = "constant",
        sched_kwargs: dict[str, Any] | None = None,
        total_steps: int = 1000,
        label_smoothing: float = 0.0,
        frozen: tuple[str, ...] = (),
        unfreeze_at: int = 0,
        backbone_lr_mult: float = 1.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_kind = loss
        self.optimizer_name = optimizer
        self.lr = lr
        self.opt_kwargs = dict(opt_kwargs or {})
        self.schedule = schedule
        self.sched_kwargs = dict(sched_kwargs or {})
        self.total_steps = total_steps
        self.label_smoothing = label_smoothing
        self.frozen = frozen
        self.unfreeze_at = unfreeze_at
        self.backbone_lr_mult = backbone_lr_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss_of(self, batch: Any) -> torch.Tensor:
        """The recipe's loss on ``batch`` (no side effects: probes re-run it)."""
        x, y = batch
        out = self(x)
        if self.loss_kind == "ce":
            return nn.functional.cross_entropy(
                out.reshape(-1, out.shape[-1]).float(),
                y.reshape(-1),
                label_smoothing=self.label_smoothing,
            )
        if self.loss_kind == "mse_onehot":
            # squared error against one-hot targets, halved and summed over classes (the
            # classification loss of Cohen et al. 2021's edge-of-stability experiments)
            target = nn.functional.one_hot(y, out.shape[-1]).to(torch.float32)
            return 0.5 * (out.float() - target).pow(2).sum(-1).mean()
        return nn.functional.mse_loss(out.squeeze(-1).float(), y)

    def _is_backbone(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.frozen)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Fine-tuning: the backbone stays frozen (no gradient, so no optimizer update)
        # until `unfreeze_at`, then trains; decided from the step, so a resumed run agrees.
        if self.frozen:
            trainable = self.global_step >= self.unfreeze_at
            for name, p in self.named_parameters():
                if self._is_backbone(name):
                    p.requires_grad_(trainable)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss_of(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss_of(batch))

    def _param_groups(self) -> list[dict[str, Any]]:
        if not self.frozen:
            return [{"params": list(self.parameters())}]
        named = list(self.named_parameters())
        return [
            {"params": [p for n, p in named if not self._is_backbone(n)]},
            {
                "params": [p for n, p in named if self._is_backbone(n)],
                "lr": self.lr * self.backbone_lr_mult,
            },
        ]

    def configure_optimizers(self):
        cls = {
            "sgd": torch.optim.SGD,
            "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop,
            "adagrad": torch.optim.Adagrad,
        }[self.optimizer_name]
        opt = cls(self._param_groups(), lr=self.lr, **self.opt_kwargs)
        kw, total = self.sched_kwargs, self.total_steps
        if self.schedule == "constant":
            return opt
        if self.schedule == "warmup_cosine":
            warm, floor = kw.get("warmup", 100), kw.get("min_frac", 0.0)

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                progress = min(1.0, (step - warm) / max(1, total - warm))
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

            sched: Any = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        elif self.schedule == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, kw["step_size"], kw.get("gamma", 0.3))
        elif self.schedule == "onecycle":
            max_lr = [g["lr"] for g in opt.param_groups]
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total)
        elif self.schedule == "cyclic":
            sched = torch.optim.lr_scheduler.CyclicLR(
                opt,
                base_lr=self.lr * kw.get("base_frac", 0.1),
                max_lr=self.lr,
                step_size_up=kw.get("step_size_up", 100),
                mode=kw.get("mode", "triangular2"),
            )
        elif self.schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, factor=kw.get("factor", 0.5), patience=kw.get("patience", 2)
            )
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"},
            }
        else:
            raise ValueError(f"unknown schedule {self.schedule!r}")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --- networks ---------------------------------------------------------------------------


def _mlp(d_in: int, d_out: int, hidden: int = 64, depth: int = 2, act: str = "relu"):
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh() if act == "tanh" else nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (optionally BatchNorm) and a linear head on 8x8 digits, which
    arrive flattened to 64 features."""

    def __init__(self, batchnorm: bool, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        c1, c2 = channels
        parts: list[tuple[str, nn.Module]] = [("conv1", nn.Conv2d(1, c1, 3, padding=1))]
        if batchnorm:
            parts.append(("bn1", nn.BatchNorm2d(c1)))
        parts += [("act1", nn.ReLU()), ("conv2", nn.Conv2d(c1, c2, 3, padding=1))]
        if batchnorm:
            parts.append(("bn2", nn.BatchNorm2d(c2)))
        parts += [("act2", nn.ReLU()), ("pool", nn.MaxPool2d(2))]
        self.features = nn.Sequential(OrderedDict(parts))
        self.head = nn.Linear(c2 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


class ResidualBlock(nn.Module):
    """Pre-LayerNorm residual MLP block: ``x + fc2(gelu(fc1(ln(x))))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """Input projection, residual LayerNorm blocks, a final LayerNorm and a linear head."""

    def __init__(self, d_in: int, d_out: int, width: int = 64, n_blocks: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class GRULM(nn.Module):
    """A one-layer GRU language model over ASCII characters."""

    def __init__(self, d_embed: int = 32, d_hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_embed)
        self.gru = nn.GRU(d_embed, d_hidden, batch_first=True)
        self.head = nn.Linear(d_hidden, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.embed(x))
        return self.head(h)


class LSTMRegressor(nn.Module):
    """A one-layer LSTM reading a sequence and predicting a scalar from its last state."""

    def __init__(self, d_in: int = 4, d_hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, d_hidden, batch_first=True)
        self.head = nn.Linear(d_hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        return self.head(h[:, -1])


class CharLMNet(nn.Module):
    """The reference char-LM transformer as a plain network (its recipe lives in
    :class:`Trainable`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        lm = charlm_module(**kwargs)
        self.embed, self.pos, self.blocks = lm.embed, lm.pos, lm.blocks
        self.norm, self.head = lm.norm, lm.head
        self.register_buffer("causal_mask", lm.causal_mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.pos[:t]
        h = self.blocks(h, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


# --- data -------------------------------------------------------------------------------


def sequence_regression_data(
    seed: int = 0, n: int = 2048, n_val: int = 256, length: int = 16, d: int = 4
) -> tuple[TensorDataset, TensorDataset]:
    """Sequences ``x_t ~ N(0, I_d)`` whose target is a read-out of a random tanh RNN teacher
    run over them (standardised, plus noise 0.1): a task that needs memory."""
    g = torch.Generator().manual_seed(20_000 + seed)
    x = torch.randn(n + n_val, length, d, generator=g)
    a = torch.randn(8, 8, generator=g) * 0.6 / 8**0.5
    b = torch.randn(d, 8, generator=g) / d**0.5
    w = torch.randn(8, generator=g) / 8**0.5
    h = torch.zeros(n + n_val, 8)
    for t in range(length):
        h = torch.tanh(h @ a + x[:, t] @ b)
    y = h @ w
    y = (y - y.mean()) / y.std() + 0.1 * torch.randn(len(y), generator=g)
    return TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val])


class CurriculumSampler(Sampler[int]):
    """Easy examples first, then all of them: for epochs before ``switch_epoch`` each epoch
    is shuffled passes over ``easy`` (as many indices as a full epoch, so the epoch length
    never changes), from then on a shuffle of every index.

    The order of epoch ``e`` comes from a generator seeded with ``(seed, e)``, and Lightning
    tells the sampler its epoch through :meth:`set_epoch`, so the order does not depend on
    how often the loader was iterated."""

    def __init__(self, n: int, easy: list[int], switch_epoch: int, seed: int) -> None:
        self.n, self.easy, self.switch_epoch, self.seed = n, easy, switch_epoch, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every training epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.epoch >= self.switch_epoch:
            return iter(torch.randperm(self.n, generator=g).tolist())
        easy = torch.tensor(self.easy)
        reps = -(-self.n // len(easy))
        order = torch.cat([easy[torch.randperm(len(easy), generator=g)] for _ in range(reps)])
        return iter(order[: self.n].tolist())


def _easy_digits(train: TensorDataset, keep: float = 0.5) -> list[int]:
    """Per class, the ``keep`` fraction of training images closest to their class mean."""
    x, y = train.tensors
    easy: list[int] = []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        dist = (x[idx] - x[idx].mean(0)).norm(dim=1)
        easy += idx[dist.argsort()[: int(keep * len(idx))]].tolist()
    return sorted(easy)


def _subset(dataset: TensorDataset, n: int, seed: int) -> TensorDataset:
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorDataset(*(t[idx] for t in dataset.tensors))


class _WholeDataset(Dataset):
    """``repeats`` items, each the whole dataset as one batch: full-batch training without
    collating a thousand samples at every step, and without an epoch boundary (with its
    per-epoch overhead) at every step."""

    def __init__(self, dataset: TensorDataset, repeats: int) -> None:
        self.tensors = dataset.tensors
        self.repeats = repeats

    def __len__(self) -> int:
        return self.repeats

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.tensors


def _full_batch(dataset: TensorDataset, steps: int) -> DataLoader:
    return DataLoader(_WholeDataset(dataset, steps), batch_size=None)


def _val(dataset: Any, batch_size: int = 512) -> DataLoader:
    return seeded_loader(dataset, batch_size, 0, shuffle=False)


# --- the configurations -----------------------------------------------------------------


def _digits_mlp(
    seed: int,
    steps: int,
    *,
    batch_size: int = 64,
    act: str = "relu",
    **recipe: Any,
) -> Built:
    train, val = digits_data(seed)
    module = Trainable(_mlp(64, 10, 64, 2, act), total_steps=steps, **recipe)
    return module, seeded_loader(train, batch_size, seed), _val(val), [], steps


def _digits_cnn(
    seed: int, steps: int, *, batchnorm: bool, batch_size: int = 64, **recipe: Any
) -> Built:
    train, val = digits_data(seed)
    module = Trainable(DigitsCNN(batchnorm), total_steps=steps, **recipe)
    return module, seeded_loader(train, batch_size, seed), _val(val), [], steps


def _curriculum_cnn(seed: int, steps: int, **recipe: Any) -> Built:
    train, val = digits_data(seed)
    batch = 64
    sampler = CurriculumSampler(len(train), _easy_digits(train), switch_epoch=8, seed=seed)
    loader = DataLoader(train, batch_size=batch, sampler=sampler, drop_last=True)
    module = Trainable(DigitsCNN(batchnorm=False), total_steps=steps, **recipe)
    return module, loader, _val(val), [], steps


def _resmlp_digits(seed: int, steps: int, *, batch_size: int = 64, **recipe: Any) -> Built:
    train, val = digits_data(seed)
    module = Trainable(ResidualMLP(64, 10), total_steps=steps, **recipe)
    return module, seeded_loader(train, batch_size, seed), _val(val), [], steps


def _charlm(seed: int, steps: int, *, batch_size: int = 16, **recipe: Any) -> Built:
    train, val = charlm_data()
    module = Trainable(CharLMNet(), total_steps=steps, **recipe)
    return module, seeded_loader(train, batch_size, seed), _val(val, 256), [], steps


def _gru_lm(seed: int, steps: int, *, batch_size: int = 32, **recipe: Any) -> Built:
    train, val = charlm_data()
    module = Trainable(GRULM(), total_steps=steps, **recipe)
    return module, seeded_loader(train, batch_size, seed), _val(val, 256), [], steps


def _lstm_seq(seed: int, steps: int, *, batch_size: int = 8, **recipe: Any) -> Built:
    train, val = sequence_regression_data(seed)
    module = Trainable(LSTMRegressor(), loss="mse", total_steps=steps, **recipe)
    return module, seeded_loader(train, batch_size, seed), _val(val), [], steps


def _synthetic_mlp(seed: int, steps: int, *, batch_size: int = 64, **recipe: Any) -> Built:
    train, val = synthetic_regression_data(seed)
    module = Trainable(_mlp(16, 1, 64, 2, "tanh"), loss="mse", total_steps=steps, **recipe)
    return module, seeded_loader(train, batch_size, seed), _val(val), [], steps


def _fullbatch_digits(seed: int, steps: int, lr: float, n: int = 1000) -> Built:
    train, val = digits_data(seed)
    train = _subset(train, n, seed)
    module = Trainable(
        _mlp(64, 10, 64, 2, "tanh"), loss="mse_onehot", optimizer="sgd", lr=lr, total_steps=steps
    )
    return module, _full_batch(train, steps), _val(val), [], steps


def _fullbatch_regression(seed: int, steps: int, lr: float, n: int = 1024) -> Built:
    train, val = synthetic_regression_data(seed, n=n)
    module = Trainable(
        _mlp(16, 1, 64, 2, "tanh"), loss="mse", optimizer="sgd", lr=lr, total_steps=steps
    )
    return module, _full_batch(train, steps), _val(val), [], steps


def _finetune(seed: int, steps: int, unfreeze_at: int) -> Built:
    """Pre-train an MLP on digits 0-4 (plain loop, deterministic under the seeded global
    RNG), then fine-tune on all ten classes with a fresh head: backbone frozen for the first
    ``unfreeze_at`` steps, then trained at a tenth of the head's learning rate."""
    train, val = digits_data(seed)
    net = _mlp(64, 10, 64, 2, "relu")
    x, y = train.tensors
    keep = y < 5
    pre = TensorDataset(x[keep], y[keep])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    done = 0
    while done < 300:
        for xb, yb in seeded_loader(pre, 64, seed + 1):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
            done += 1
            if done == 300:
                break
    net[-1].reset_parameters()
    module = Trainable(
        net,
        optimizer="adam",
        lr=2e-3,
        total_steps=steps,
        frozen=("net.0.", "net.2."),
        unfreeze_at=unfreeze_at,
        backbone_lr_mult=0.1,
    )
    return module, seeded_loader(train, 64, seed), _val(val), [], steps


MLP = ("net.1", "net.3")
CNN = ("net.features.act1", "net.features.act2")
RES = ("net.blocks.0", "net.blocks.1")
TRANSFORMER = ("net.blocks.layers.0", "net.blocks.layers.1")
GRU = ("net.embed", "net.gru")
LSTM = ("net.lstm", "net.head")
SEQ_CHANCE = 1.0  # targets are standardised: predicting 0 costs their variance
CAL, VAL = "calibration", "validation"
LONG_STEPS = 20_000
LR_EOS_DIGITS = 0.2
LR_EOS_REG = 0.2

_LIST = [
    # ---- calibration ----
    Scenario(
        "mlp_sgd_tiny_batch",
        "healthy",
        "digits MLP, plain SGD lr 0.02, constant, batch 8 (noisy)",
        lambda s, k: _digits_mlp(s, 1500, batch_size=8, optimizer="sgd", lr=0.02 * k),
        DIGITS_CHANCE,
        MLP,
        val_every=250,
        split=CAL,
    ),
    Scenario(
        "cnn_bn_nesterov_onecycle_ls",
        "healthy",
        "digits CNN+BatchNorm, SGD Nesterov 0.9, OneCycleLR peak 0.1, label smoothing 0.1",
        lambda s, k: _digits_cnn(
            s,
            1000,
            batchnorm=True,
            optimizer="sgd",
            lr=0.1 * k,
            opt_kwargs=dict(momentum=0.9, nesterov=True),
            schedule="onecycle",
            label_smoothing=0.1,
        ),
        DIGITS_CHANCE,
        CNN,
        val_every=200,
        split=CAL,
    ),
    Scenario(
        "resmlp_ln_adamw_cosine_clip",
        "healthy",
        "digits residual MLP with LayerNorm, AdamW lr 2e-3 wd 0.05, warm-up 100 + cosine, "
        "gradient clipping 1.0",
        lambda s, k: _resmlp_digits(
            s,
            1000,
            optimizer="adamw",
            lr=2e-3 * k,
            opt_kwargs=dict(weight_decay=0.05),
            schedule="warmup_cosine",
            sched_kwargs=dict(warmup=100),
        ),
        DIGITS_CHANCE,
        RES,
        val_every=200,
        split=CAL,
        trainer_kwargs={"gradient_clip_val": 1.0},
    ),
    Scenario(
        "charlm_adam_cosine",
        "healthy",
        "char-LM transformer on stdlib text, Adam lr 2e-3, warm-up 80 + cosine",
        lambda s, k: _charlm(
            s,
            700,
            optimizer="adam",
            lr=2e-3 * k,
            schedule="warmup_cosine",
            sched_kwargs=dict(warmup=80, min_frac=0.05),
        ),
        CHARLM_CHANCE,
        TRANSFORMER,
        val_every=200,
        split=CAL,
    ),
    Scenario(
        "gru_lm_rmsprop_step_clip",
        "healthy",
        "char-level GRU LM on stdlib text, RMSprop lr 3e-3, step decay x0.3 every 300, "
        "gradient clipping 0.5",
        lambda s, k: _gru_lm(
            s,
            700,
            optimizer="rmsprop",
            lr=3e-3 * k,
            schedule="step",
            sched_kwargs=dict(step_size=300, gamma=0.3),
        ),
        CHARLM_CHANCE,
        GRU,
        val_every=200,
        split=CAL,
        trainer_kwargs={"gradient_clip_val": 0.5},
    ),
    Scenario(
        "eos_fullbatch_digits",
        "healthy",
        "tanh MLP on 1000 digits, squared loss on one-hot targets, full-batch GD lr 0.2 (edge "
        "of stability: sharpness rises to 2/lr and stays there while the loss keeps falling)",
        lambda s, k: _fullbatch_digits(s, 1500, LR_EOS_DIGITS * k),
        0.5,  # the squared loss of predicting all zeros
        MLP,
        val_every=250,
        split=CAL,
    ),
    Scenario(
        "mlp_adamw_large_wd_bf16",
        "healthy",
        "digits MLP, AdamW lr 2e-3 weight decay 0.5, warm-up 50 + cosine to exactly 0, "
        "bf16 autocast",
        lambda s, k: _digits_mlp(
            s,
            1000,
            optimizer="adamw",
            lr=2e-3 * k,
            opt_kwargs=dict(weight_decay=0.5),
            schedule="warmup_cosine",
            sched_kwargs=dict(warmup=50),
        ),
        DIGITS_CHANCE,
        MLP,
        val_every=200,
        split=CAL,
        trainer_kwargs={"precision": "bf16-mixed"},
    ),
    Scenario(
        "cnn_adagrad_curriculum",
        "healthy",
        "digits CNN, Adagrad lr 0.03, constant; curriculum: the half of each class closest to "
        "its mean for 8 epochs, then all data",
        lambda s, k: _curriculum_cnn(s, 1000, optimizer="adagrad", lr=0.03 * k),
        DIGITS_CHANCE,
        CNN,
        val_every=200,
        split=CAL,
    ),
    Scenario(
        "long_synthetic_adamw",
        "healthy",
        "teacher-student regression MLP, AdamW lr 1e-3, constant, batch 64, 20k steps "
        "(at its noise floor most of the run)",
        lambda s, k: _synthetic_mlp(
            s, LONG_STEPS, optimizer="adamw", lr=1e-3 * k, opt_kwargs=dict(weight_decay=0.01)
        ),
        1.0,
        MLP,
        val_every=2000,
        split=CAL,
    ),
    # ---- validation ----
    Scenario(
        "mlp_momentum_step_decay",
        "healthy",
        "digits MLP, SGD momentum 0.9 lr 0.05, no weight decay, step decay x0.3 every 300",
        lambda s, k: _digits_mlp(
            s,
            1000,
            optimizer="sgd",
            lr=0.05 * k,
            opt_kwargs=dict(momentum=0.9, weight_decay=0.0),
            schedule="step",
            sched_kwargs=dict(step_size=300, gamma=0.3),
        ),
        DIGITS_CHANCE,
        MLP,
        val_every=200,
        split=VAL,
    ),
    Scenario(
        "cnn_adam_accum",
        "healthy",
        "digits CNN, Adam lr 1e-3, constant, batch 16 with 4-batch gradient accumulation",
        lambda s, k: _digits_cnn(
            s, 600, batchnorm=False, batch_size=16, optimizer="adam", lr=1e-3 * k
        ),
        DIGITS_CHANCE,
        CNN,
        val_every=200,
        split=VAL,
        trainer_kwargs={"accumulate_grad_batches": 4},
    ),
    Scenario(
        "cnn_bn_sgd_cyclic",
        "healthy",
        "digits CNN+BatchNorm, SGD momentum 0.9, CyclicLR 0.005-0.05 (triangular2, 100 up)",
        lambda s, k: _digits_cnn(
            s,
            1000,
            batchnorm=True,
            optimizer="sgd",
            lr=0.05 * k,
            opt_kwargs=dict(momentum=0.9),
            schedule="cyclic",
            sched_kwargs=dict(step_size_up=100),
        ),
        DIGITS_CHANCE,
        CNN,
        val_every=200,
        split=VAL,
    ),
    Scenario(
        "resmlp_ln_adam_plateau",
        "healthy",
        "digits residual MLP with LayerNorm, Adam lr 2e-3, ReduceLROnPlateau(val_loss, x0.5, "
        "patience 2) checked every epoch",
        lambda s, k: _resmlp_digits(
            s, 1200, batch_size=50, optimizer="adam", lr=2e-3 * k, schedule="plateau"
        ),
        DIGITS_CHANCE,
        RES,
        val_every=30,  # = steps per epoch (1500 images / 50), so each epoch ends validated
        split=VAL,
    ),
    Scenario(
        "charlm_adamw_onecycle_clip_bf16",
        "healthy",
        "char-LM transformer, AdamW lr 3e-3 wd 0.1, OneCycleLR, gradient clipping 1.0, "
        "bf16 autocast",
        lambda s, k: _charlm(
            s,
            700,
            optimizer="adamw",
            lr=3e-3 * k,
            opt_kwargs=dict(weight_decay=0.1),
            schedule="onecycle",
        ),
        CHARLM_CHANCE,
        TRANSFORMER,
        val_every=200,
        split=VAL,
        trainer_kwargs={"gradient_clip_val": 1.0, "precision": "bf16-mixed"},
    ),
    Scenario(
        "lstm_seq_adam_cosine_tiny_batch",
        "healthy",
        "LSTM on synthetic sequences (RNN teacher), Adam lr 3e-3, warm-up 50 + cosine, batch 8",
        lambda s, k: _lstm_seq(
            s,
            1200,
            optimizer="adam",
            lr=3e-3 * k,
            schedule="warmup_cosine",
            sched_kwargs=dict(warmup=50),
        ),
        SEQ_CHANCE,
        LSTM,
        val_every=300,
        split=VAL,
    ),
    Scenario(
        "mlp_finetune_unfreeze",
        "healthy",
        "digits MLP pre-trained on classes 0-4, new head; Adam lr 2e-3, backbone frozen for "
        "300 steps, then trained at lr/10",
        lambda s, k: _finetune(s, 900, unfreeze_at=300),
        DIGITS_CHANCE,
        MLP,
        val_every=150,
        split=VAL,
    ),
    Scenario(
        "eos_fullbatch_regression",
        "healthy",
        "tanh MLP on 1024 teacher-student samples, full-batch GD lr 0.2 (edge of stability)",
        lambda s, k: _fullbatch_regression(s, 1500, LR_EOS_REG * k),
        1.0,
        MLP,
        val_every=250,
        split=VAL,
    ),
    Scenario(
        "long_digits_sgd_cosine",
        "healthy",
        "digits MLP, SGD momentum 0.9 lr 0.05 wd 5e-4, cosine to 1% over 20k steps, batch 64",
        lambda s, k: _digits_mlp(
            s,
            LONG_STEPS,
            optimizer="sgd",
            lr=0.05 * k,
            opt_kwargs=dict(momentum=0.9, weight_decay=5e-4),
            schedule="warmup_cosine",
            sched_kwargs=dict(warmup=1, min_frac=0.01),
        ),
        DIGITS_CHANCE,
        MLP,
        val_every=2000,
        split=VAL,
    ),
]

HEALTHY: dict[str, Scenario] = {s.name: s for s in _LIST}
"""The healthy corpus by name; every entry has ``kind="healthy"`` and a ``split``."""
