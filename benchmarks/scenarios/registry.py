"""The scenarios: named, seeded training runs that stay stable or go wrong in a known way.

Each :class:`Scenario` builds a fresh ``(module, train_loader, val_loader, extra_callbacks,
max_steps)`` for a seed. ``lr_scale`` multiplies the run's base learning rate (the detection
benchmark sweeps it to find the best fixed learning rate). Diverging scenarios are tuned so
that every seed diverges by :func:`benchmarks.scenarios.divergence.divergence_step`; stable
ones so that none does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import TensorDataset

from benchmarks.scenarios.divergence import DivergenceRule
from benchmarks.scenarios.perturbations import CorruptedLoader, LRJump, LRRamp, RoutingFeedback
from benchmarks.scenarios.tasks import (
    MLP,
    charlm_data,
    charlm_module,
    digits_data,
    digits_onehot_data,
    seeded_loader,
    synthetic_regression_data,
)
from benchmarks.scenarios.transformer import SmallGPT

__all__ = ["SCENARIOS", "Built", "Scenario"]

Built = tuple[pl.LightningModule, Any, Any, list[Callback], int]
"""``(module, train_loader, val_loader, extra_callbacks, max_steps)``."""


@dataclass(frozen=True)
class Scenario:
    """A named run recipe.

    Attributes:
        name: registry key. kind: ``"stable"`` or ``"diverging"``.
        description: one sentence for the results table.
        build: ``build(seed, lr_scale) -> Built``.
        divergence_threshold: the loss an untrained model has (chance level for
            classification, the target variance for regression); what a Lightning user
            would pass to ``EarlyStopping(divergence_threshold=...)``.
        layers: module names whose activations a drift monitor watches.
        onset: the step at which the perturbation starts (0 when the run is set up to fail
            from the start); a detector firing before it raised a false alarm, not a warning.
        val_every: optimizer steps between validation runs.
        rule: the divergence rule.
        gradual: the instability builds up over many steps (a slow ramp, progressive
            sharpening, logit growth), so an early warning is possible; shock scenarios
            (an LR jump, a corrupted batch) leave only the steps after the shock.
        split: for healthy configurations, ``"calibration"`` (defaults may be chosen on
            it) or ``"validation"`` (reported, never tuned on).
        trainer_kwargs: extra ``Trainer`` arguments (precision, gradient clipping,
            accumulation, ...).
    """

    name: str
    kind: str
    description: str
    build: Callable[[int, float], Built]
    divergence_threshold: float
    layers: tuple[str, ...] = ()
    onset: int = 0
    val_every: int = 10
    rule: DivergenceRule = field(default_factory=DivergenceRule)
    gradual: bool = False
    split: str = ""
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)

    def make(self, seed: int, lr_scale: float = 1.0) -> Built:
        """A fresh run for ``seed``; call ``lightning.seed_everything(seed)`` first so that
        the initial weights are seeded too (the runner does)."""
        return self.build(seed, lr_scale)


MLP_LAYERS = ("net.1", "net.3")
CHARLM_LAYERS = ("blocks.layers.0", "blocks.layers.1")
DIGITS_CHANCE = math.log(10)
CHARLM_CHANCE = math.log(128)


def _digits(
    seed: int,
    lr: float,
    steps: int,
    *,
    corrupt: dict[str, Any] | None = None,
    jump: tuple[int, float] | None = None,
    ramp: tuple[int, float, float] | None = None,
    batch_size: int = 64,
) -> Built:
    train, val = digits_data(seed)
    module = MLP(
        64, 10, hidden=64, depth=2, lr=lr, optimizer="sgd", momentum=0.9, activation="relu"
    )
    loader: Any = seeded_loader(train, batch_size, seed)
    if corrupt:
        loader = CorruptedLoader(loader, seed=seed, num_classes=10, **corrupt)
    extra: list[Callback] = [LRJump(*jump)] if jump else []
    if ramp:
        extra.append(LRRamp(*ramp))
    return module, loader, seeded_loader(val, 512, seed, shuffle=False), extra, steps


def _sharpening(seed: int, lr: float, steps: int, n_train: int = 500) -> Built:
    """Full-batch heavy-ball GD on a wide tanh MLP fitting the one-hot targets of
    ``n_train`` digits by mean squared error: the setting of Cohen et al. (2021), where
    the top Hessian eigenvalue rises during training until it reaches 2(1 + momentum)/lr."""
    train, val = digits_onehot_data(seed)
    train = TensorDataset(*(t[:n_train] for t in train.tensors))
    module = MLP(
        64, 10, hidden=512, depth=4, task="regression", lr=lr, optimizer="sgd", momentum=0.9
    )
    loader = seeded_loader(train, len(train), seed)  # one full batch per step
    return module, loader, seeded_loader(val, 512, seed, shuffle=False), [], steps


def _synthetic(seed: int, lr: float, steps: int) -> Built:
    train, val = synthetic_regression_data(seed)
    module = MLP(16, 1, hidden=64, depth=2, task="regression", lr=lr, optimizer="adam")
    return module, seeded_loader(train, 64, seed), seeded_loader(val, 512, seed, False), [], steps


def _charlm(seed: int, lr: float, steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> Built:
    train, val = charlm_data()
    module = charlm_module(lr=lr, betas=betas)
    return module, seeded_loader(train, 16, seed), seeded_loader(val, 256, seed, False), [], steps


def _routing(seed: int, lr_scale: float) -> Built:
    module = MLP(8, 1, hidden=32, depth=2, task="regression", lr=0.02 * lr_scale, optimizer="sgd")
    env = RoutingFeedback(module, deploy_step=100, seed=seed)
    return module, env, env.val_loader(), [], 400


def _gpt(seed: int, steps: int, **kwargs: Any) -> Built:
    """:class:`SmallGPT` (d_model 64, 2 layers, 4 heads) on the char-LM text, batch 16."""
    train, val = charlm_data()
    module = SmallGPT(**kwargs)
    return module, seeded_loader(train, 16, seed), seeded_loader(val, 256, seed, False), [], steps


GPT_LAYERS = ("blocks.0", "blocks.1")

_LIST = [
    Scenario(
        "stable_digits_sgd",
        "stable",
        "digits MLP, SGD+momentum lr 0.05",
        lambda s, k: _digits(s, 0.05 * k, 400),
        DIGITS_CHANCE,
        MLP_LAYERS,
    ),
    Scenario(
        "stable_synthetic_adam",
        "stable",
        "teacher-student regression MLP, Adam lr 1e-3",
        lambda s, k: _synthetic(s, 1e-3 * k, 400),
        1.0,
        MLP_LAYERS,
    ),
    Scenario(
        "stable_charlm_adam",
        "stable",
        "char-LM transformer on stdlib text, Adam lr 1e-3",
        lambda s, k: _charlm(s, 1e-3 * k, 200),
        CHARLM_CHANCE,
        CHARLM_LAYERS,
        val_every=25,
    ),
    Scenario(
        "lr_too_high",
        "diverging",
        "digits MLP, constant SGD lr 0.25 (beyond the edge of stability)",
        lambda s, k: _digits(s, 0.25 * k, 400),
        DIGITS_CHANCE,
        MLP_LAYERS,
    ),
    Scenario(
        "lr_spike",
        "diverging",
        "digits MLP, SGD lr 0.05 jumping x10 at step 150 (broken warm-up)",
        lambda s, k: _digits(s, 0.05 * k, 400, jump=(150, 10.0)),
        DIGITS_CHANCE,
        MLP_LAYERS,
        onset=150,
    ),
    Scenario(
        "corrupted_batches",
        "diverging",
        "digits MLP, SGD lr 0.05, inputs x100 for steps 200-209",
        lambda s, k: _digits(s, 0.05 * k, 400, corrupt=dict(start=200, stop=210, mode="scale")),
        DIGITS_CHANCE,
        MLP_LAYERS,
        onset=200,
    ),
    Scenario(
        "label_noise_burst",
        "diverging",
        "digits MLP, SGD lr 0.05, random labels for steps 150-249",
        lambda s, k: _digits(
            s, 0.05 * k, 400, corrupt=dict(start=150, stop=250, mode="random_labels")
        ),
        DIGITS_CHANCE,
        MLP_LAYERS,
        onset=150,
    ),
    Scenario(
        "feedback_loop",
        "diverging",
        "route-time regression whose traffic follows the model's predictions from step 100",
        _routing,
        1.0,
        MLP_LAYERS,
        onset=100,
    ),
    Scenario(
        "adam_spike",
        "diverging",
        "char-LM, Adam lr 1e-2 with beta2 0.5 (< beta1^2, so the update m/sqrt(v) is "
        "unbounded): late loss spikes",
        lambda s, k: _charlm(s, 1e-2 * k, 300, betas=(0.9, 0.5)),
        CHARLM_CHANCE,
        CHARLM_LAYERS,
        val_every=25,
    ),
]

_LIST += [
    Scenario(
        "lr_ramp",
        "diverging",
        "digits MLP, SGD+momentum lr 0.05, x1.015 per step from step 150 (a warm-up ramping "
        "to 10x its target)",
        lambda s, k: _digits(s, 0.05 * k, 400, ramp=(150, 1.015, 10.0)),
        DIGITS_CHANCE,
        MLP_LAYERS,
        onset=150,
        gradual=True,
    ),
    Scenario(
        "progressive_sharpening",
        "diverging",
        "one-hot MSE on 500 digits, 4x512 tanh MLP, full-batch GD+momentum 0.9 at constant "
        "lr 0.85: sharpening carries the top Hessian eigenvalue past 2(1+momentum)/lr",
        lambda s, k: _sharpening(s, 0.85 * k, 200),
        0.1,  # mean squared error of predicting all zeros for one-hot targets
        MLP_LAYERS,
        gradual=True,
    ),
    Scenario(
        "attention_logit_growth",
        "diverging",
        "small GPT without qk-layernorm, AdamW lr 1 (weight decay 0.1) after a 300-step "
        "linear warm-up: attention logits grow by orders of magnitude as the lr rises",
        lambda s, k: _gpt(s, 350, lr=1.0 * k, warmup=300, weight_decay=0.1),
        CHARLM_CHANCE,
        GPT_LAYERS,
        val_every=25,
        gradual=True,
    ),
    Scenario(
        "output_logit_divergence",
        "diverging",
        "small GPT with qk-layernorm but no final LayerNorm, AdamW lr 0.1 without weight "
        "decay after a 300-step warm-up: the output logits drift large",
        lambda s, k: _gpt(s, 400, lr=0.1 * k, warmup=300, qk_norm=True, final_norm=False),
        CHARLM_CHANCE,
        GPT_LAYERS,
        val_every=25,
        gradual=True,
    ),
]

SCENARIOS: dict[str, Scenario] = {s.name: s for s in _LIST}
