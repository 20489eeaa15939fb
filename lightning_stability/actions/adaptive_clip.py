"""Opt-in adaptive gradient clipping: clip when the norm is far above its own history."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_stability.callback_identity import IdentifiedCallback
from lightning_stability.estimators.online_stats import EMAStats, RollingWindow
from lightning_stability.probes.base import logs_this_step
from lightning_stability.probes.gradients import GradientMonitor
from lightning_stability.vocabulary import check_choice
from lightning_stability.warning.events import EventListener, InstabilityEvent, Level

__all__ = ["AdaptiveGradientClipping"]

_MODES = ("zscore", "percentile")


class AdaptiveGradientClipping(IdentifiedCallback):
    """Scale the gradients down to a threshold learned from past gradient norms.

    This callback changes training (it is an action, not a probe), so it is off unless
    added. Two rules:

    - ``"zscore"`` (ZClip; Kumar et al. 2025, *ZClip: Adaptive Spike Mitigation for LLM
      Pre-Training*): keep an EMA mean ``mu`` and variance ``sigma^2`` of the total norm;
      clip to ``mu + z * sigma`` when the norm exceeds it.
    - ``"percentile"`` (AutoClip; Seetharaman et al. 2020, *AutoClip: Adaptive Gradient
      Clipping for Source Separation Networks*): clip to the ``percentile``-th percentile
      of the last ``window`` norms.

    The history is fed with the norm after clipping, so one spike does not raise the bar
    for the next. Nothing is clipped during the first ``warmup`` steps. The norm is the
    all-reduced, unscaled pre-clip norm (measured by a :class:`GradientMonitor` when one is
    attached, so both see the same value whatever the callback order); the decision is
    reduced across ranks so that every rank scales identically. Interventions are logged
    as ``stability/action/adaptive_clip`` (their number since the previous logged step)
    next to ``stability/action/adaptive_clip_threshold``, and each one as an
    :class:`~lightning_stability.warning.events.InstabilityEvent` with
    ``source="adaptive_clip"`` appended to :attr:`events` and passed to every listener.

    Args:
        mode: ``"zscore"`` (default) or ``"percentile"``.
        z: z-score threshold for ``"zscore"``; default 2.5 (> 0).
        alpha: EMA weight of the newest norm for ``"zscore"``, in (0, 1]; default 0.05.
        percentile: for ``"percentile"``, in (0, 100]; default 95.
        window: norms kept for ``"percentile"``; default 1000.
        warmup: steps observed before the first intervention; default 25.
    """

    clips_gradients = True

    def __init__(
        self,
        mode: str = "zscore",
        z: float = 2.5,
        alpha: float = 0.05,
        percentile: float = 95.0,
        window: int = 1000,
        warmup: int = 25,
    ) -> None:
        super().__init__()
        check_choice(mode, "mode", _MODES)
        if not z > 0:
            raise ValueError(f"z must be > 0, got {z!r}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
        self.mode = mode
        self.z = float(z)
        self.percentile = float(percentile)
        self.warmup = warmup
        self.ema = EMAStats(alpha)
        self.history = RollingWindow(window)
        self.seen = 0
        self.interventions = 0
        self.events: list[InstabilityEvent] = []
        self.listeners: list[EventListener] = []
        self._monitor: GradientMonitor | None = None
        self._since_log = 0

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(event, trainer, pl_module)`` for every intervention."""
        self.listeners.append(listener)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._monitor = next((c for c in trainer.callbacks if isinstance(c, GradientMonitor)), None)

    def threshold(self) -> float:
        """The current clipping threshold (``inf`` during warm-up)."""
        if self.seen < max(self.warmup, 2):
            return math.inf
        if self.mode == "zscore":
            return self.ema.mean + self.z * self.ema.std
        return self.history.quantile(self.percentile / 100.0)

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        if self._monitor is not None:
            norm_t = self._monitor.observe(trainer, pl_module).get("norm")
        else:
            norm_t = torch.linalg.vector_norm(
                torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)])
            )
        norm = float(norm_t)
        limit = self.threshold()
        clip = math.isfinite(norm) and norm > limit
        clip = bool(trainer.strategy.reduce_boolean_decision(clip, all=False))
        kept = norm
        if clip:
            scale = limit / (norm + 1e-6)
            torch._foreach_mul_(grads, scale)
            kept = limit
            self.interventions += 1
            event = InstabilityEvent(
                level=Level.WATCH,
                step=trainer.global_step,
                signals=("stability/grad/norm",),
                message=f"gradient norm {norm:.4g} above adaptive threshold {limit:.4g}; clipped",
                source="adaptive_clip",
                details={"norm": norm, "threshold": limit, "scale": scale},
            )
            self.events.append(event)
            for listener in self.listeners:
                listener(event, trainer, pl_module)
        if math.isfinite(kept):
            self.ema.update(kept)
            self.history.update(kept)
            self.seen += 1
        self._since_log += int(clip)
        if logs_this_step(trainer):
            # A count since the last logged step: a 0/1 flag logged on every step would be
            # dropped by Lightning on the steps it does not write.
            pl_module.log("stability/action/adaptive_clip", float(self._since_log), batch_size=1)
            self._since_log = 0
            if math.isfinite(limit):
                pl_module.log("stability/action/adaptive_clip_threshold", limit, batch_size=1)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, z=self.z, percentile=self.percentile)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self.ema.state_dict(),
            "history": self.history.state_dict(),
            "seen": self.seen,
            "interventions": self.interventions,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict["ema"])
        self.history.load_state_dict(state_dict["history"])
        self.seen = int(state_dict["seen"])
        self.interventions = int(state_dict["interventions"])
