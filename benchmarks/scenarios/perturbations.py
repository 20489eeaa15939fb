"""Reusable ways to make a training run go wrong: a learning-rate jump, a slow learning-rate
ramp, a burst of corrupted batches, a stretch of random labels, and a data source that feeds on the model's own
predictions.

Every piece draws its randomness from its own seeded ``torch.Generator``, never from the
global RNG, so that a run with and without measuring callbacks sees identical data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["CorruptedLoader", "LRJump", "LRRamp", "RoutingFeedback"]


class LRJump(Callback):
    """Multiplies every parameter group's learning rate by ``factor`` once, just before
    optimizer step ``at_step`` (a warm-up whose last stage jumps instead of ramping).

    The change is multiplicative and one-off, so anything else that scales the learning rate
    later (a backoff action) composes with it instead of being overwritten.
    """

    def __init__(self, at_step: int, factor: float = 10.0) -> None:
        if at_step < 0:
            raise ValueError(f"at_step must be >= 0, got {at_step!r}")
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor!r}")
        self.at_step = at_step
        self.factor = factor
        self.applied = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.applied and trainer.global_step >= self.at_step:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * self.factor
            self.applied = True

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict["applied"])


class LRRamp(Callback):
    """Multiplies every parameter group's learning rate by ``factor`` before each optimizer
    step from ``start`` on, until the ramp's own accumulated factor reaches ``max_factor``
    (a warm-up that ramps past its target, or a schedule with a sign error).

    Each step's change is multiplicative, so anything else that scales the learning rate
    (a backoff action) composes with the ramp instead of being overwritten. The state
    (the last step ramped and the accumulated factor) is checkpointed, so a resumed run
    neither repeats nor skips a step of the ramp.

    Args:
        start: first optimizer step whose learning rate is ramped (>= 0).
        factor: per-step multiplier (>= 1; e.g. 1.015: x4.4 per 100 steps).
        max_factor: the ramp holds once its accumulated factor reaches this (>= 1;
            default: never).
    """

    def __init__(self, start: int, factor: float = 1.015, max_factor: float = float("inf")) -> None:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start!r}")
        if factor < 1.0 or max_factor < 1.0:
            raise ValueError(
                f"need factor >= 1 and max_factor >= 1, got {factor!r}, {max_factor!r}"
            )
        self.start = start
        self.factor = factor
        self.max_factor = max_factor
        self.total = 1.0
        self.last_step = -1

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # once per optimizer step (gradient accumulation calls this for every micro-batch)
        if step < self.start or step <= self.last_step:
            return
        self.last_step = step
        change = min(self.factor, self.max_factor / self.total)
        if change <= 1.0:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * change
        self.total *= change

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = float(state_dict["total"])
        self.last_step = int(state_dict["last_step"])


class CorruptedLoader:
    """Wraps a DataLoader of ``(x, y)`` batches and corrupts the batches whose running
    index (counted across epochs, one per optimizer step) lies in ``[start, stop)``.

    Modes:
        ``"scale"``: inputs multiplied by ``scale`` (a unit or preprocessing bug, x100 default).
        ``"scramble"``: labels permuted within the batch (a join that misaligned rows).
        ``"random_labels"``: a ``fraction`` of labels replaced by uniform draws from
            ``num_classes`` classes (a stretch of label noise).
    """

    MODES = ("scale", "scramble", "random_labels")

    def __init__(
        self,
        loader: DataLoader,
        start: int,
        stop: int,
        mode: str = "scale",
        scale: float = 100.0,
        num_classes: int | None = None,
        fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got start={start!r}, stop={stop!r}")
        if mode == "random_labels" and not num_classes:
            raise ValueError("num_classes is required for mode='random_labels'")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.loader = loader
        self.start, self.stop = start, stop
        self.mode = mode
        self.scale = scale
        self.num_classes = num_classes
        self.fraction = fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.index = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            if self.start <= self.index < self.stop:
                x, y = self.corrupt(x, y)
            self.index += 1
            yield x, y

    def corrupt(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The corrupted version of one batch (new tensors; the dataset is untouched)."""
        if self.mode == "scale":
            return x * self.scale, y
        if self.mode == "scramble":
            return x, y[torch.randperm(len(y), generator=self.generator)]
        y = y.clone()
        hit = torch.rand(len(y), generator=self.generator) < self.fraction
        y[hit] = torch.randint(0, self.num_classes, (int(hit.sum()),), generator=self.generator)
        return x, y


class RoutingFeedback:
    """A delivery-routing task whose data depends on the model's own predictions.

    ``n_routes`` routes have fixed features; the model regresses each route's travel time
    (MSE). Until ``deploy_step`` the training batches sample routes uniformly (historical
    data). From then on the model routes a growing part of the traffic, ramping linearly
    from none to all over ``ramp_steps`` (operators come to trust it); the part it routes is
    shared as ``softmax(-predicted_time / temperature)``, the batches sample routes by that share (the
    routes predicted fast are oversampled), and the traffic load, an exponential moving
    average of the shares with rate ``inertia``, congests the routes it goes to: a route's
    true time is ``base + congestion * (n_routes * load - 1)``. A route predicted fast
    attracts traffic, becomes slow, and the model chases a target it moves itself; the
    routes it stops sending traffic to are no longer observed, so their errors are never
    corrected. While the model routes little traffic the loop is damped; past a critical share
    the targets swing further each round and the run destabilises, as in the logistics story
    this reproduces. The ramp makes that a slow approach to a tipping point rather than a
    sudden shock.

    Iterate it for training batches (``steps_per_epoch`` per epoch); :meth:`val_loader`
    gives all routes at their current congestion.
    """

    def __init__(
        self,
        module: nn.Module,
        n_routes: int = 64,
        d: int = 8,
        batch_size: int = 32,
        deploy_step: int = 100,
        ramp_steps: int = 200,
        congestion: float = 0.5,
        temperature: float = 0.1,
        inertia: float = 0.1,
        noise: float = 0.05,
        steps_per_epoch: int = 50,
        seed: int = 0,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0.0 < inertia <= 1.0:
            raise ValueError(f"inertia must be in (0, 1], got {inertia!r}")
        self.module = module
        self.n_routes, self.batch_size = n_routes, batch_size
        self.deploy_step, self.ramp_steps = deploy_step, max(1, ramp_steps)
        self.congestion, self.temperature, self.inertia = congestion, temperature, inertia
        self.noise = noise
        self.steps_per_epoch = steps_per_epoch
        self.generator = torch.Generator().manual_seed(20_000 + seed)
        g = self.generator
        self.features = torch.randn(n_routes, d, generator=g)
        teacher = torch.randn(d, 16, generator=g) / d**0.5
        base = torch.tanh(self.features @ teacher) @ (torch.randn(16, generator=g) / 4.0)
        self.base = (base - base.mean()) / base.std()
        self.load = torch.full((n_routes,), 1.0 / n_routes)
        self.index = 0

    def travel_times(self) -> torch.Tensor:
        """Each route's true travel time under the current load."""
        return self.base + self.congestion * (self.n_routes * self.load - 1.0)

    def shares(self) -> torch.Tensor:
        """The traffic share of each route: uniform before deployment, then more and more
        by prediction."""
        uniform = torch.full((self.n_routes,), 1.0 / self.n_routes)
        trust = min(1.0, (self.index - self.deploy_step + 1) / self.ramp_steps)
        if trust <= 0:
            return uniform
        param = next(self.module.parameters())
        with torch.no_grad():
            pred = self.module(self.features.to(param.device, param.dtype)).squeeze(-1).cpu()
        pred = torch.nan_to_num(pred.float(), nan=0.0, posinf=1e6, neginf=-1e6)
        routed = torch.softmax(-pred / self.temperature, dim=0)
        return (1.0 - trust) * uniform + trust * routed

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        share = self.shares()
        self.load = (1.0 - self.inertia) * self.load + self.inertia * share
        idx = torch.multinomial(share, self.batch_size, replacement=True, generator=self.generator)
        noise = self.noise * torch.randn(self.batch_size, generator=self.generator)
        self.index += 1
        return self.features[idx], self.travel_times()[idx] + noise

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps_per_epoch):
            yield self.next_batch()

    def val_loader(self) -> DataLoader:
        """One batch of every route with its travel time at the moment it is read."""
        return DataLoader(_RoutesNow(self), batch_size=self.n_routes, shuffle=False)


class _RoutesNow(Dataset):
    """Map-style view of the routes; targets are read live, so validation sees the
    congestion of the moment (and a drift probe can draw fixed inputs by index)."""

    def __init__(self, env: RoutingFeedback) -> None:
        self.env = env

    def __len__(self) -> int:
        return self.env.n_routes

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.env.features[i], self.env.travel_times()[i]
