"""The ``EarlyWarning`` callback: probes' readings -> meta-state -> level -> events."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_warn
from typing_extensions import override

from lightning_stability.callback_identity import IdentifiedCallback
from lightning_stability.configuration import regroup
from lightning_stability.probes.base import (
    Reading,
    StabilityProbe,
    logs_this_step,
    step_loss,
    write_to_loggers,
)
from lightning_stability.vocabulary import (
    DIMENSIONS,
    LOSS_VALUE,
    META_DEVIATION,
    META_LEVEL,
    meta_key,
)
from lightning_stability.warning.assessment import Assessment, MetaStateMonitor
from lightning_stability.warning.config import (
    EARLY_WARNING_FLAT_ALIASES,
    Baselines,
    DeviationThresholds,
    EdgeRule,
    LevelPolicy,
    TrendTest,
)
from lightning_stability.warning.events import (
    EventListener,
    InstabilityEvent,
    Level,
    event_from_state,
    event_to_state,
)
from lightning_stability.warning.levels import LevelTracker
from lightning_stability.warning.loss_band import LossBand
from lightning_stability.warning.metastate import SignalSpec

__all__ = ["EarlyWarning", "InstabilityWarning"]


class InstabilityWarning(UserWarning):
    """The Python warning category of instability events."""


class EarlyWarning(IdentifiedCallback):
    """Warns before a run collapses, from the readings of the attached probes.

    At every optimizer step (in ``on_train_batch_end``) the latest readings of every
    :class:`~lightning_stability.probes.base.StabilityProbe` in ``trainer.callbacks``
    are assessed, and the run is given a level. Levels mean evidence, not surprise:

    * WATCH (spend more measurement): the meta-state deviates. Each reading's deviation
      from its robust baseline (rolling median/MAD, log scale for positive quantities)
      is grouped along four dimensions (optimisation, learning signal, parametric,
      data); critical-slowing-down trends (rising variance and lag-1 autocorrelation,
      Kendall's tau; Dakos et al. 2012) and a CUSUM of the deviation (Page 1954) add to
      it. Quantities that move on healthy runs enter as rates or ratios (the update
      ratio rather than the weight norm; the edge ratio rather than the sharpness).
      A trend counts only when variance and autocorrelation rise together.
    * WARNING (the next steps are unsafe): an edge-of-stability ratio sustained above
      ``1 + eos_margin``, a learning-rate jump that takes the predicted ratio above it,
      or the training loss leaving its band
      (:class:`~lightning_stability.warning.loss_band.LossBand`).
    * CRITICAL (the run is being damaged): non-finite loss or gradients, a loss far
      above its recent floor (or back at the level the run started from, after it had
      learned) for several steps without recovering, an edge ratio above
      ``eos_critical`` while the loss is above its band.

    The rules are in :mod:`lightning_stability.warning.rules`; soft statistics never
    raise the level above WATCH, and time spent at a level never raises it.

    Each change of level is an :class:`InstabilityEvent` (CRITICAL from a rule is
    repeated at most every ``cooldown`` steps; a WARNING that the evidence still holds
    is repeated every ``repeat_every`` steps while the evidence grows, so that an action
    such as :class:`~lightning_stability.actions.LRBackoff` cuts again while the run keeps
    getting worse, and not while it recovers): logged as ``stability/meta/level``, written to TensorBoard's text by
    :class:`~lightning_stability.StabilityDashboard` (one entry per step with the actions
    it triggered), warned as an :class:`InstabilityWarning`
    (levels >= ``warn_level``), and delivered to every listener (:meth:`subscribe`) and
    to ``on_event``, on every rank. ``stability/meta/deviation`` and
    ``stability/meta/<dimension>`` are logged at Lightning's log cadence.

    Under DDP the per-rank levels and scores are reduced with the maximum, so one
    rank's warning is every rank's warning and all ranks see the same event.

    Place probes before this callback in ``callbacks`` so that their
    ``on_train_batch_end`` readings are seen in the same step. How the defaults were
    chosen, and what they measure on the healthy corpus and the scenario suite, is in
    ``benchmarks/RESULTS.md``.

    Args:
        deviation: when the meta-state's deviation and its CUSUM propose WATCH, and the
            exit ratio of every level
            (:class:`~lightning_stability.warning.config.DeviationThresholds`).
        levels: how the level rises, dwells, cools down and repeats
            (:class:`~lightning_stability.warning.config.LevelPolicy`).
        baselines: the rolling robust baselines and the staleness of readings
            (:class:`~lightning_stability.warning.config.Baselines`).
        trend: the critical-slowing-down test
            (:class:`~lightning_stability.warning.config.TrendTest`).
        edge: the edge-of-stability rule (:class:`~lightning_stability.warning.config.EdgeRule`).
        loss_band: the training loss's band (default ``LossBand()``).
        signals: which readings feed which dimension and how (default
            :data:`~lightning_stability.warning.metastate.DEFAULT_SIGNALS`).
        use_step_loss: when no probe publishes ``stability/loss/value``, use the training
            step's own loss (averaged over ranks) instead (default True).
        warn_level: lowest level issued as a Python warning (default ``"warning"``).
        on_event: called with every event, on every rank.
        **deprecated: the flat keywords of the previous release (``watch_threshold=8.0``,
            ``patience=2``, ``trend_tau=0.6``, ``eos_margin=0.25``, ...), folded into their
            group with a ``DeprecationWarning`` that names it. ``warning_threshold``,
            ``critical_threshold`` and ``escalate_after`` are no longer used (soft
            deviation never raises the level above WATCH, and a WARNING that persists is
            not escalated); accepted with a ``DeprecationWarning``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_stability import EarlyWarning, GradientMonitor, LossMonitor

        from lightning_stability.warning import EdgeRule, LevelPolicy

        warning = EarlyWarning(levels=LevelPolicy(patience=3), edge=EdgeRule(margin=0.3))
        trainer = Trainer(callbacks=[GradientMonitor(), LossMonitor(), warning])
    """

    def __init__(
        self,
        deviation: DeviationThresholds | None = None,
        levels: LevelPolicy | None = None,
        baselines: Baselines | None = None,
        trend: TrendTest | None = None,
        edge: EdgeRule | None = None,
        loss_band: LossBand | None = None,
        signals: list[SignalSpec] | None = None,
        use_step_loss: bool = True,
        warn_level: str = "warning",
        on_event: EventListener | None = None,
        **deprecated: Any,
    ) -> None:
        super().__init__()
        for name in ("warning_threshold", "critical_threshold", "escalate_after"):
            if deprecated.pop(name, None) is not None:
                rank_zero_deprecation(
                    f"EarlyWarning({name}=...) has no effect: soft deviation raises the level "
                    "to WATCH at most, and WARNING and CRITICAL come from the rules in "
                    "lightning_stability.warning.rules."
                )
        groups = regroup(
            "EarlyWarning",
            deprecated,
            EARLY_WARNING_FLAT_ALIASES,
            {
                "deviation": (DeviationThresholds, deviation),
                "levels": (LevelPolicy, levels),
                "baselines": (Baselines, baselines),
                "trend": (TrendTest, trend),
                "edge": (EdgeRule, edge),
            },
        )
        levels = groups.pop("levels")
        self.monitor = MetaStateMonitor(signals=signals, loss_band=loss_band, **groups)
        self.level_policy = levels
        self.tracker = LevelTracker(
            patience=levels.patience,
            min_dwell=levels.min_dwell,
            cooldown=levels.cooldown,
            repeat_every=levels.repeat_every,
        )
        self.use_step_loss = use_step_loss
        self.warn_level = Level.parse(warn_level, "warn_level")
        if on_event is not None and not callable(on_event):
            raise ValueError(f"on_event must be callable or None, got {on_event!r}")
        self.on_event = on_event
        self.listeners: list[EventListener] = []
        self.events: list[InstabilityEvent] = []
        self.probes: list[StabilityProbe] = []
        self.deviation = 0.0
        # this step's training losses, read to the host only when no probe publishes one
        self._step_losses: list[torch.Tensor] = []
        self._last_step = -1

    @property
    def level(self) -> Level:
        """The run's current level."""
        return self.tracker.level

    @property
    def request_closer_watch(self) -> bool:
        """True while the level is WATCH or above: probes may measure more often."""
        return self.tracker.level >= Level.WATCH

    def subscribe(self, listener: EventListener) -> None:
        """Deliver every future event to ``listener(event, trainer, pl_module)``."""
        if not callable(listener):
            raise ValueError(f"listener must be callable, got {listener!r}")
        self.listeners.append(listener)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.probes = [cb for cb in trainer.callbacks if isinstance(cb, StabilityProbe)]
        if not self.probes and not self.use_step_loss:
            rank_zero_warn(
                "EarlyWarning found no StabilityProbe in trainer.callbacks and "
                "use_step_loss=False: it has nothing to watch except nothing."
            )

    def _readings(self, trainer: pl.Trainer) -> dict[str, Any]:
        readings: dict[str, Any] = {}
        for probe in self.probes:
            readings.update(probe.readings)
        step = trainer.global_step
        if self.use_step_loss and LOSS_VALUE not in readings and self._step_losses:
            total = 0.0
            for value in self._step_losses:
                total += float(value)
            loss = torch.tensor(total / len(self._step_losses), dtype=torch.float64)
            if trainer.world_size > 1:
                loss = trainer.strategy.reduce(loss.to(trainer.strategy.root_device), "mean")
            readings[LOSS_VALUE] = Reading(float(loss), step)
        self._step_losses = []
        return readings

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor.band.new_epoch()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = step_loss(trainer, pl_module, outputs) if self.use_step_loss else None
        if loss is not None:
            self._step_losses.append(loss)
        step = trainer.global_step
        # evaluate once per optimizer step (not per accumulated micro-batch)
        if step == self._last_step:
            return
        self._last_step = step
        local = self.monitor.assess(self._readings(trainer), step, self.tracker.level)
        proposed, hold, hard, ruled, worse, deviation, dims, src = self._reduce(trainer, local)
        self.deviation = deviation
        new = self.tracker.update(step, proposed, hold, hard, ruled, worse)
        if new is not None:
            self.monitor.issued()
        meta = {
            META_DEVIATION: deviation,
            META_LEVEL: float(self.tracker.level),
            **{meta_key(name): value for name, value in dims.items()},
        }
        metrics = trainer.callback_metrics  # a property that gathers the results: read once
        for key, value in meta.items():
            metrics[key] = torch.tensor(value)
        # Loggers get the dense readings at Lightning's log cadence (pl_module.log costs
        # about a millisecond a call), and always on a step with an event, so the level
        # plot shows every change.
        if new is not None or logs_this_step(trainer):
            write_to_loggers(trainer, meta)
        if new is not None:
            self._emit(trainer, pl_module, new, step, deviation, dims, local, src)

    def rollback_state(self) -> dict[str, Any]:
        """What of this callback's view goes back with the weights at a rollback: the loss
        band, which describes the losses of the weights it was learned on. A new object
        at every call (the band's state is built afresh), so a snapshot can keep it as is."""
        return {"band": self.monitor.band.state_dict()}

    def restore_view(self, state: dict[str, Any]) -> None:
        """The weights were replaced by those ``state`` (:meth:`rollback_state`) was saved
        with: judge their losses against the band learned on them. A band learned on
        later, lower losses would call the restored weights' own loss damage (a rollback
        to the start of a run is back at the loss the run started from)."""
        if state.get("band") is not None:
            self.monitor.band.load_state_dict(state["band"])

    def rearm(self, step: int, pause: int = 0) -> None:
        """Called by a rollback on every rank at the same step: the weights are back at a
        good state, so the level returns to OK and may rise again at once, the trend
        windows and CUSUM restart, and the baselines learn nothing for ``pause`` steps."""
        self.tracker.reset(step)
        self.monitor.restart(step, pause)
        self.deviation = 0.0

    def _reduce(
        self, trainer: pl.Trainer, local: Assessment
    ) -> tuple[Level, Level, bool, Level, bool, float, dict[str, float], int]:
        """Maximum over ranks of the levels and scores, and the rank whose evidence is
        strongest (it describes the event)."""
        world = trainer.world_size
        rank = trainer.global_rank
        dims = [local.dimensions.get(d, -1.0) for d in DIMENSIONS]
        # the highest proposed level wins; ties go to the lowest rank
        source_key = float(int(local.proposed) * world + (world - 1 - rank))
        v = [
            float(local.proposed),
            float(local.hold),
            float(local.hard),
            float(local.ruled),
            float(local.worse),
            float(local.deviation),
            source_key,
            *(float(d) for d in dims),
        ]
        if world > 1:  # one process: the maximum is the row itself
            vec = torch.tensor(v, dtype=torch.float64, device=trainer.strategy.root_device)
            v = trainer.strategy.reduce(vec, reduce_op="max").cpu().tolist()
        src = world - 1 - int(v[6]) % world
        reduced_dims = {d: s for d, s in zip(DIMENSIONS, v[7:]) if s >= 0}
        levels = Level(int(v[0])), Level(int(v[1])), bool(v[2]), Level(int(v[3])), bool(v[4])
        return *levels, v[5], reduced_dims, src

    def _emit(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        level: Level,
        step: int,
        deviation: float,
        dims: dict[str, float],
        local: Assessment,
        src: int,
    ) -> None:
        signals = tuple(dict.fromkeys(key for key, _, _ in local.drivers))
        payload = (signals, local.message(level, step))
        if trainer.world_size > 1:
            payload = trainer.strategy.broadcast(payload, src=src)
        signals, message = payload
        details = {f"meta/{k}": float(v) for k, v in dims.items()}
        event = InstabilityEvent(
            level=level,
            step=step,
            signals=tuple(signals),
            message=message,
            deviation=float(deviation),
            details=details,
        )
        self.events.append(event)
        if level >= self.warn_level and level > Level.OK:
            rank_zero_warn(message, category=InstabilityWarning)
        for listener in self.listeners:
            listener(event, trainer, pl_module)
        if self.on_event is not None:
            self.on_event(event, trainer, pl_module)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            warn_level=self.warn_level.name.lower(),
            watch_threshold=self.monitor.watch_threshold,
            window=self.monitor.window,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor.state_dict(),
            "tracker": self.tracker.state_dict(),
            "last_step": self._last_step,
            "deviation": self.deviation if math.isfinite(self.deviation) else 0.0,
            "events": [event_to_state(e) for e in self.events],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict["monitor"])
        self.tracker.load_state_dict(state_dict["tracker"])
        self._last_step = int(state_dict["last_step"])
        self.deviation = float(state_dict["deviation"])
        self.events = [event_from_state(e) for e in state_dict.get("events", [])]
