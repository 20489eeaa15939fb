"""LRGuard: keep each optimizer step's learning rate below the edge of stability it would cross."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_stability.actions.base import StabilityAction
from lightning_stability.callback_identity import IdentifiedCallback
from lightning_stability.probes.edge import EdgePrediction, step_lr
from lightning_stability.vocabulary import ACTION_LR_GUARD_SCALE, check_positive_int
from lightning_stability.warning.events import Level

__all__ = ["LRGuard"]

GUARD_SCALE_KEY = ACTION_LR_GUARD_SCALE


class LRGuard(StabilityAction):
    """Lower one optimizer step's learning rate when the step would cross the edge of
    stability by more than ``margin``, and give the schedule back at once.

    Before every optimizer step it rescales the latest edge-of-stability ratio measured by
    the :class:`~lightning_stability.probes.SharpnessMonitor` in the Trainer to the
    learning rate about to be used (``ratio * lr_now / lr_measured``: the edge is
    proportional to ``1/lr`` for every optimizer the monitor supports; Cohen et al. 2021,
    2022). When that predicted ratio exceeds ``1 + margin`` it multiplies every param
    group's learning rate by ``(1 + margin) / predicted`` for this step only: a hook on the
    optimizer puts the requested values back right after its step, before any scheduler
    steps, so the scheduler's own learning rate is never rewritten and the user's schedule
    resumes the first step the ratio allows it.

    Why a margin: a step just past the edge is the edge-of-stability regime itself, in
    which training keeps making progress while the top curvature oscillates around
    ``2/lr`` (Cohen et al. 2021; Damian et al. 2023); a step at ratio ``r`` amplifies the
    top-eigendirection component by ``|1 - 2r|`` per step, which curvature reduction
    (the catapult of Lewkowycz et al. 2020) absorbs only for ``r`` up to about 2. The
    default ``margin=0.5`` leaves healthy runs at the edge alone and stops a learning-rate
    shock before it takes a step the landscape cannot absorb.

    Opt-in and separate from the warning layer: the guard reacts to the learning rate the
    step will use, before the step, whatever the level. It needs a ``SharpnessMonitor``
    in ``trainer.callbacks``: without one it warns once and does nothing, and until the
    monitor has taken ``confirm`` readings it does nothing.

    A single curvature reading can be an outlier (a probe batch unlike the rest, a
    Lanczos start that met a transient direction), so the prediction is confirmed: it is
    the smallest of the last ``confirm`` readings, each rescaled to the learning rate about
    to be used. A learning-rate jump multiplies all of them and is seen at once; a lone
    high reading clamps nothing.

    Args:
        margin: allowed excess of the predicted ratio over the edge, > 0. The applied
            learning rate puts the step at ``1 + margin`` times the edge. Default 0.5.
        confirm: readings the prediction is confirmed over (>= 1). Default 2.
        max_age: readings older than this many optimizer steps are not trusted to clamp
            (the landscape has moved on); ``None`` trusts any age. Default ``None``.

    Logs ``stability/action/lr_guard_scale`` (applied / requested learning rate of the
    step, 1.0 = not clamped) on the steps Lightning writes step metrics. Each clamped stretch is an event in
    :attr:`events` with the requested and applied learning rate at its start, and one
    more when the schedule is given back; :attr:`clamped_steps` counts the steps clamped.

    Example::

        trainer = Trainer(callbacks=stability_callbacks(lr_guard=True))
        # or, composed by hand after the probes:
        trainer = Trainer(callbacks=[*stability_callbacks(), LRGuard(margin=1.0)])
    """

    source_name = "lr_guard"

    def __init__(self, margin: float = 0.5, confirm: int = 2, max_age: int | None = None) -> None:
        super().__init__("critical")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0:
            raise ValueError(f"margin must be a number > 0, got {margin!r}")
        check_positive_int(max_age, "max_age", allow_none=True)
        check_positive_int(confirm, "confirm")
        self.margin = float(margin)
        self.confirm = confirm
        self.max_age = max_age
        self._readings: list[tuple[float, float, int]] = []  # (ratio, lr, step), latest last
        self.clamped_steps = 0
        self.scale = 1.0
        """Applied / requested learning rate of the latest step."""
        self._edge: EdgePrediction | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._handle: Any = None
        self._requested: list[Any] | None = None  # per group, while a clamp is applied
        self._episode_start = -1
        self._episode_min = 1.0

    # ----------------------------------------------------------------- wiring
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # No event source is needed: the guard reads the monitor's edge, not the warnings,
        # so of StabilityAction's setup it takes only the state-key part.
        IdentifiedCallback.setup(self, trainer, pl_module, stage)
        if stage != "fit":
            return
        monitor = next(
            (
                cb
                for cb in trainer.callbacks
                if isinstance(getattr(cb, "edge", None), EdgePrediction)
            ),
            None,
        )
        self._edge = None if monitor is None else monitor.edge
        if self._edge is None:  # setup runs once per fit: this warns once
            rank_zero_warn(
                "LRGuard found no SharpnessMonitor in trainer.callbacks, so it has no edge "
                "to guard and does nothing; add SharpnessMonitor() (or use "
                "stability_callbacks()) to enable it"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            return
        self._optimizer = trainer.optimizers[0]
        # A documented torch hook, called right after each step of this optimizer and
        # before Lightning steps the schedulers.
        self._handle = self._optimizer.register_step_post_hook(self._after_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release_hook()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        self._release_hook()

    def _release_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------- the clamp
    def predicted_ratio(self, lr: float, step: int) -> float:
        """The edge ratio of a step taken at ``lr``: the smallest of the last ``confirm``
        readings of the monitor, each rescaled to ``lr``; NaN until there are ``confirm``
        of them (or when the oldest is more than ``max_age`` steps old)."""
        self._observe(step)
        if len(self._readings) < self.confirm:
            return math.nan
        if self.max_age is not None and step - self._readings[0][2] > self.max_age:
            return math.nan
        return min(ratio * lr / at_lr for ratio, at_lr, _ in self._readings)

    def _observe(self, step: int) -> None:
        edge = self._edge
        if edge is None or not (edge.ratio_lr > 0) or not math.isfinite(edge.ratio):
            return
        if self._readings and self._readings[-1][:2] == (edge.ratio, edge.ratio_lr):
            return  # no new reading since the last step
        self._readings = [*self._readings, (edge.ratio, edge.ratio_lr, step)][-self.confirm :]

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if optimizer is not self._optimizer:
            return
        self._restore()  # a step skipped by the grad scaler never ran the post hook
        step = int(trainer.global_step)
        lr = step_lr(optimizer)
        predicted = self.predicted_ratio(lr, step)
        limit = 1.0 + self.margin
        if not (math.isfinite(predicted) and predicted > limit):
            self.scale = 1.0
            if self._episode_start >= 0:
                self._end_episode(trainer, lr)
            return
        self.scale = limit / predicted
        self._requested = [_copy(group["lr"]) for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                # capturable/fused optimizers: the same tensor, changed in place
                group["lr"].mul_(self.scale)
            else:
                group["lr"] = group["lr"] * self.scale
        self.clamped_steps += 1
        self._episode_min = min(self._episode_min, self.scale)
        if self._episode_start < 0:
            self._episode_start = step
            self._episode_min = self.scale
            self.record(
                trainer,
                Level.WARNING,
                f"learning rate {lr:.4g} would put this step at {predicted:.3g}x the edge "
                f"of stability; applied {lr * self.scale:.4g} ({limit:.3g}x the edge) and "
                "kept the schedule's value",
                signals=("sharpness/predicted_ratio",),
                details={
                    "requested_lr": lr,
                    "applied_lr": lr * self.scale,
                    "predicted_ratio": predicted,
                },
            )

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._requested is None or self._optimizer is None:
            return
        for group, lr in zip(self._optimizer.param_groups, self._requested):
            if isinstance(lr, torch.Tensor):
                group["lr"].copy_(lr)
            else:
                group["lr"] = lr
        self._requested = None

    def _end_episode(self, trainer: pl.Trainer, lr: float) -> None:
        steps = int(trainer.global_step) - self._episode_start
        self.record(
            trainer,
            Level.OK,
            f"learning rate back on schedule ({lr:.4g}) after {steps} guarded step(s); "
            f"lowest applied share {self._episode_min:.3g}",
            details={"steps": float(steps), "min_scale": self._episode_min, "lr": lr},
        )
        self._episode_start = -1
        self._episode_min = 1.0

    @override
    def on_step_boundary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: Level | None
    ) -> None:
        self.log_value(pl_module, GUARD_SCALE_KEY, self.scale)

    # ---------------------------------------------------------------- resume
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(margin=self.margin, max_age=self.max_age)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "clamped_steps": self.clamped_steps,
            "scale": self.scale,
            "episode_start": self._episode_start,
            "episode_min": self._episode_min,
            "readings": [list(r) for r in self._readings],
            "events": self._events_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clamped_steps = int(state_dict["clamped_steps"])
        self.scale = float(state_dict["scale"])
        self._episode_start = int(state_dict["episode_start"])
        self._episode_min = float(state_dict["episode_min"])
        self._readings = [
            (float(r), float(lr), int(at)) for r, lr, at in state_dict.get("readings", [])
        ]
        self._load_events(state_dict.get("events", []))


def _copy(lr: Any) -> Any:
    return lr.clone() if isinstance(lr, torch.Tensor) else lr
