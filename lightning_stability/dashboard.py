"""What a person sees during and after a run: the Stability tab in TensorBoard, the run's
timeline (levels, learning rates, rollbacks and every event), the level in the progress
bar, and the summary at the end of ``fit``."""

from __future__ import annotations

import math
import struct
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_stability.actions import LRBackoff, LRGuard, Rollback, StagedTraining
from lightning_stability.actions.adaptive_clip import AdaptiveGradientClipping
from lightning_stability.actions.base import StabilityAction
from lightning_stability.callback_identity import IdentifiedCallback
from lightning_stability.probes import (
    GradientMonitor,
    LossMonitor,
    PerturbationAudit,
    RepresentationDriftMonitor,
    SharpnessMonitor,
    StabilityProbe,
)
from lightning_stability.probes.base import logs_this_step, step_loss
from lightning_stability.probes.edge import lambda_edge, preconditioned_edge
from lightning_stability.report import (
    SUMMARY_ROWS,
    RunLog,
    RunSummary,
    TimelineEntry,
    find_loss_tag,
    format_entries,
    render_markdown,
    render_text,
    summarize,
)
from lightning_stability.tensorboard import (
    TIMELINE,
    stability_layout,
    tensorboard_writers,
    write_layout,
)
from lightning_stability.vocabulary import (
    ACTION_STAGE,
    GRAD_CLIP_THRESHOLD,
    LEVEL_NAMES,
    LOSS_VALUE,
    META_DEVIATION,
    REF_EDGE,
    REF_LAMBDA_EDGE,
    REF_PRECONDITIONED_EDGE,
    REF_WATCH_THRESHOLD,
    SHARPNESS_DIRECTIONAL,
    SHARPNESS_DIRECTIONAL_RATIO,
    SHARPNESS_EOS_RATIO,
    SHARPNESS_LAMBDA_MAX,
    SHARPNESS_PRECONDITIONED,
    WARNING_SOURCE,
)
from lightning_stability.vocabulary import key as tag_of
from lightning_stability.warning.early_warning import EarlyWarning
from lightning_stability.warning.events import InstabilityEvent

__all__ = ["StabilityDashboard"]

_SUMMARY_TAGS = frozenset(tag for _, tag, _ in SUMMARY_ROWS)
_CURVATURE = (SHARPNESS_LAMBDA_MAX, SHARPNESS_DIRECTIONAL)
# what the dashboard follows in the probes' readings: the summary's and those framing the
# edge; readings under these prefixes are logged at every reading, the others (gradients,
# loss) only on Lightning's logging steps
_PROBE_TAGS = _SUMMARY_TAGS | {
    *_CURVATURE,
    SHARPNESS_PRECONDITIONED,
    GRAD_CLIP_THRESHOLD,
    LOSS_VALUE,
}
_SPARSE = (tag_of("sharpness/"), tag_of("cka"), tag_of("audit/"))


def _log_step(trainer: pl.Trainer) -> int:
    """The step Lightning stamps step metrics with (the charts' x axis)."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def _float32(value: float) -> float:
    """``value`` as an event file stores it."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class StabilityDashboard(IdentifiedCallback):
    """Shows the stability callbacks' work to a person.

    * Writes the "Stability" custom-scalars layout (:mod:`~lightning_stability.tensorboard`)
      to every TensorBoard logger at the first training step, with only the charts of the
      callbacks attached; its first row is the training loss the user logs (found among
      the logged metrics, or ``loss_tag``), the edge-of-stability ratio, the warning level
      and the learning rate as applied against the schedule.
    * Writes the run's timeline, as step functions (the old value one step before each
      change, the new value at it) at every change and on Lightning's logging steps:
      ``stability/timeline/level`` (0 ok ... 3 critical), ``.../rollbacks`` (count so far),
      ``.../lr_applied`` (the first param group's learning rate as the optimizer step used
      it, after backoffs, stages and the guard's clamp), ``.../lr_schedule`` (the same
      divided by the actions' factors: what the user's schedule asked for) and
      ``.../lr_factor`` (their ratio, 1 = untouched). At each step with events it writes
      ``.../event_loss`` (the step's training loss, a marker on the loss chart) and one
      markdown text entry under ``stability/timeline`` holding every event of the step:
      changes of level first, then the actions they triggered.
    * Writes reference lines next to the readings they frame: ``stability/ref/edge`` = 1
      for the ratios, ``stability/ref/lambda_edge`` for ``lambda_max``/``directional`` and,
      for Adam/AdamW, ``stability/ref/preconditioned_edge``, all from
      :mod:`~lightning_stability.probes.edge` (the definition the ratios use), and
      ``stability/ref/watch_threshold``.
    * Puts the level (``stab``: ok/watch/warning/critical) and the latest edge ratio
      (``eos``) into the progress bar's metrics when they change.
    * At the end of ``fit`` computes the run's summary with
      :func:`~lightning_stability.report.summarize` from the values that were logged (the
      function ``lightning-stability report`` runs on the event files), keeps it in
      :attr:`last_summary`, writes it as text (``stability/summary``) and logs it with
      ``rank_zero_info``.

    Other loggers receive every scalar; TensorBoard-only features are skipped for them.
    Logging is rank zero's; nothing here changes training. Per step the dashboard reads
    a few attributes; it writes only on logging steps and at events.

    Args:
        progress_bar: show level and ratio in the progress bar (default True).
        summary: log the summary at the end of ``fit`` (default True).
        timing: add the time the Trainer's profiler recorded in each stability callback
            to the summary; needs ``Trainer(profiler="simple")`` (default True).
        loss_tag: the logged metric that is the training loss (default ``None``: the
            first logged metric named like a training loss, e.g. ``train_loss``, else
            ``stability/loss/value`` when a :class:`~lightning_stability.LossMonitor` is
            attached).

    Example::

        trainer = Trainer(
            callbacks=stability_callbacks(actions="backoff"), profiler="simple"
        )
        trainer.fit(model)
        print(trainer.callbacks[-1].last_summary.headline)
    """

    def __init__(
        self,
        progress_bar: bool = True,
        summary: bool = True,
        timing: bool = True,
        loss_tag: str | None = None,
    ) -> None:
        super().__init__()
        if loss_tag is not None and (not isinstance(loss_tag, str) or not loss_tag):
            raise ValueError(f"loss_tag must be a non-empty string or None, got {loss_tag!r}")
        self.progress_bar = progress_bar
        self.summary = summary
        self.timing = timing
        self.loss_tag = loss_tag
        self.last_summary: RunSummary | None = None
        self.run_log = RunLog()
        """What this fit logged, as :func:`~lightning_stability.report.summarize` reads it."""
        self._probes: list[StabilityProbe] = []
        self._warning: EarlyWarning | None = None
        self._actions: list[StabilityAction] = []
        self._backoffs: list[LRBackoff] = []
        self._stages: list[StagedTraining] = []
        self._guards: list[LRGuard] = []
        self._rollback_cbs: list[Rollback] = []
        self._reset()

    def _reset(self) -> None:
        self.run_log = RunLog()
        self._seen: dict[str, int] = {}
        self._event_keys: set[tuple[str, int, str]] = set()
        self._event_counts: dict[int, int] = {}
        self._written: dict[str, tuple[int, float]] = {}  # tag -> last (step, value) written
        self._step = -1
        self._layout_written = False
        self._lr: tuple[Any, float, float] | None = None  # at batch start: lr, backoff, stage
        self._previous: tuple[Any, float, float] | None = None
        self._level = 0
        self._rollbacks = 0
        self._ref_step = -1
        self._bar: dict[str, str] = {}
        self._seconds_in_callbacks: dict[str, float] = {}

    # ------------------------------------------------------------------ wiring
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        callbacks = trainer.callbacks
        self._probes = [cb for cb in callbacks if isinstance(cb, StabilityProbe)]
        self._warning = next((cb for cb in callbacks if isinstance(cb, EarlyWarning)), None)
        self._actions = [cb for cb in callbacks if isinstance(cb, StabilityAction)]
        self._backoffs = self._of(LRBackoff)
        self._stages = self._of(StagedTraining)
        self._guards = self._of(LRGuard)
        self._rollback_cbs = self._of(Rollback)

    def _of(self, cls: type) -> list[Any]:
        return [cb for cb in (*self._probes, *self._actions) if isinstance(cb, cls)]

    def _parts(self, trainer: pl.Trainer) -> set[str]:
        parts: set[str] = set()
        for probe in self._of(SharpnessMonitor):
            parts.add("sharpness")
            if probe.directional:
                parts.add("directional")
                if probe.critical:
                    parts.add("critical")
            if (
                probe.preconditioned
                and trainer.optimizers
                and preconditioned_edge(trainer.optimizers[0]) is not None
            ):
                parts.add("preconditioned")
        for cls, name in (
            (GradientMonitor, "gradients"),
            (LossMonitor, "loss"),
            (RepresentationDriftMonitor, "drift"),
            (PerturbationAudit, "audit"),
            (LRBackoff, "lr_backoff"),
            (StagedTraining, "staged_training"),
            (Rollback, "rollback"),
            (LRGuard, "lr_guard"),
        ):
            if self._of(cls):
                parts.add(name)
        if self._warning is not None:
            parts.add("warning")
        clipping = trainer.gradient_clip_val or "staged_training" in parts
        if "gradients" in parts and (
            clipping or any(isinstance(cb, AdaptiveGradientClipping) for cb in trainer.callbacks)
        ):
            parts.add("clipping")
        return parts

    def _attached(self, trainer: pl.Trainer) -> list[str]:
        return [
            type(cb).__name__
            for cb in trainer.callbacks
            if type(cb).__module__.startswith("lightning_stability.")
        ]

    def _write_setup(self, trainer: pl.Trainer) -> None:
        """Once, at the first step: the layout and what is attached."""
        self._layout_written = True
        tag = self.loss_tag or find_loss_tag(trainer.callback_metrics)
        if tag is None and self._of(LossMonitor):
            tag = LOSS_VALUE
        self.run_log.loss_tag = tag
        self.run_log.attached = self._attached(trainer)
        if not trainer.is_global_zero:
            return
        write_layout(trainer.loggers, stability_layout(self._parts(trainer), tag))
        text = f"**Stability callbacks attached**: {', '.join(self.run_log.attached)}\n\n"
        text += f"**Training loss tag**: `{tag}`" if tag else "**Training loss tag**: none found"
        for writer in tensorboard_writers(trainer.loggers):
            writer.add_text(TIMELINE.SETUP, text, _log_step(trainer))

    # ------------------------------------------------------------------ writing
    def _write(self, trainer: pl.Trainer, step: int, metrics: dict[str, float]) -> None:
        """Write ``metrics`` at ``step`` (each tag only forward in steps) and record them."""
        fresh = {}
        for tag, value in metrics.items():
            last = self._written.get(tag)
            if last is not None and step <= last[0]:
                continue
            self._written[tag] = (step, value)
            self._record(tag, step, value)
            fresh[tag] = value
        if fresh and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(fresh, step=step)

    def _record(self, tag: str, step: int, value: float) -> None:
        """Keep ``value`` as an event file keeps it (float32), for the summary."""
        self.run_log.scalars.setdefault(tag, []).append((step, _float32(value)))

    def _hold(
        self, trainer: pl.Trainer, step: int, now: dict[str, float], before: dict[str, float]
    ) -> None:
        """Write step-function series: on a change, the value ``before`` one step earlier
        (when nothing was written there yet), then the value ``now``."""
        earlier = {
            tag: value
            for tag, value in before.items()
            if step > 0 and (tag not in self._written or self._written[tag][0] < step - 1)
        }
        if earlier:
            self._write(trainer, step - 1, earlier)
        self._write(trainer, step, now)

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The learning rate this step will use, and the actions' factors in it; the
        # guard's clamp is applied later, in on_before_optimizer_step, and undone after
        # the step, so it is read from LRGuard.scale at the batch's end.
        if not trainer.optimizers:
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.detach().clone()
        backoff = 1.0
        for action in self._backoffs:
            if action.scales and action.scales[0]:
                backoff *= action.scales[0][0]
        stage = 1.0
        for action in self._stages:
            stage *= float(getattr(action, "lr_scale", 1.0))
        self._lr = (lr, backoff, stage)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self._step:
            return  # inside an accumulation window: no optimizer step since last time
        self._step = trainer.global_step
        step = _log_step(trainer)
        logging = logs_this_step(trainer)
        if not self._layout_written:
            self._write_setup(trainer)
        fresh = self._follow_readings(trainer, step, logging)
        entries = self._new_events(step)
        self._timeline(trainer, step, logging, entries)
        if entries:
            loss = step_loss(trainer, pl_module, outputs)
            if loss is not None:
                self._write(trainer, step, {TIMELINE.EVENT_LOSS: float(loss)})
            self._add_events(trainer, step, entries)
        if logging and self.run_log.loss_tag:
            value = trainer.callback_metrics.get(self.run_log.loss_tag)
            if value is not None and self.run_log.loss_tag != LOSS_VALUE:
                self._record(self.run_log.loss_tag, step, _as_float(value))
        self._write_references(trainer, fresh, step, logging)
        if self.progress_bar and trainer.progress_bar_callback is not None:
            self._update_bar(trainer)

    def _follow_readings(self, trainer: pl.Trainer, step: int, logging: bool) -> set[str]:
        """Record each new reading that reached the loggers: sparse readings (curvature,
        CKA, audit) at every reading, dense ones on logging steps. Returns the keys with a
        new reading."""
        fresh: set[str] = set()
        for probe in self._probes:
            for key in _PROBE_TAGS.intersection(probe.readings):
                reading = probe.readings[key]
                if self._seen.get(key) == reading.step:
                    continue
                self._seen[key] = reading.step
                fresh.add(key)
                if logging or key.startswith(_SPARSE):
                    self._record(key, step, reading.value)
        warning_event = self._warning is not None and len(self._warning.events) != (
            self._event_counts.get(id(self._warning), 0)
        )
        if self._warning is not None and (logging or warning_event):
            self._record(META_DEVIATION, step, self._warning.deviation)
        if logging:
            for action in self._stages:
                self._record(ACTION_STAGE, step, action.stage)
        return fresh

    def _new_events(self, step: int) -> list[TimelineEntry]:
        """This step's new events of the warning layer and the actions, stamped with the
        logging step they are written at. A rollback may restore an action's earlier
        event list; events are recognised by source, step and message."""
        entries: list[TimelineEntry] = []
        sources: list[Any] = [self._warning] if self._warning is not None else []
        for source in [*sources, *self._actions]:
            events: list[InstabilityEvent] = source.events
            if len(events) == self._event_counts.get(id(source), 0):
                continue
            self._event_counts[id(source)] = len(events)
            for event in events:
                key = (event.source, event.step, event.message)
                if key in self._event_keys:
                    continue
                self._event_keys.add(key)
                entries.append(TimelineEntry(step, event.source, int(event.level), event.message))
        return sorted(entries, key=lambda e: e.source != WARNING_SOURCE)

    def _add_events(self, trainer: pl.Trainer, step: int, entries: list[TimelineEntry]) -> None:
        """Keep ``entries`` for the summary and write them as one text entry at ``step``."""
        self.run_log.events += entries
        if trainer.is_global_zero:
            for writer in tensorboard_writers(trainer.loggers):
                writer.add_text(TIMELINE.TEXT, format_entries(entries), step)

    def _timeline(
        self, trainer: pl.Trainer, step: int, logging: bool, entries: list[TimelineEntry]
    ) -> None:
        now: dict[str, float] = {}
        before: dict[str, float] = {}
        changed = False
        if self._warning is not None:
            # a level raised and reset within the step (a rollback re-arms the warning
            # layer at once) still shows at this step
            level = max([int(self._warning.level)] + [e.level for e in entries if e.is_cause])
            changed |= self._step_series(TIMELINE.LEVEL, level, self._level, now, before)
            self._level = level
        if self._rollback_cbs:
            count = sum(r.rollbacks for r in self._rollback_cbs)
            changed |= self._step_series(TIMELINE.ROLLBACKS, count, self._rollbacks, now, before)
            self._rollbacks = count
        raw = self._raw_lr()
        if raw is not None:
            previous = self._previous
            if previous is None or raw[1] != previous[1]:
                changed = True
                if previous is not None:
                    before.update(zip(_LR_TAGS, _learning_rates(*previous)))
            self._previous = raw
        if changed or logging or entries:
            if raw is not None:
                now.update(zip(_LR_TAGS, _learning_rates(*raw)))
            self._hold(trainer, step, now, before if changed else {})

    def _step_series(
        self,
        tag: str,
        value: float,
        previous: float,
        now: dict[str, float],
        before: dict[str, float],
    ) -> bool:
        """Put ``value`` in ``now``; ``True`` when the series must be written this step (its
        first write, or a change, whose old value then goes in ``before`` so the chart
        steps instead of sloping)."""
        now[tag] = float(value)
        if tag not in self._written:
            return True
        if value != previous:
            before[tag] = float(previous)
            return True
        return False

    def _raw_lr(self) -> tuple[Any, float, float] | None:
        """This step's requested learning rate (as the optimizer holds it), the actions'
        factor on it, and the part of that factor the schedule's own value excludes."""
        if self._lr is None:
            return None
        lr, backoff, stage = self._lr
        guard = 1.0
        for action in self._guards:
            guard *= action.scale
        return lr, backoff * stage * guard, backoff * stage

    def _write_references(
        self, trainer: pl.Trainer, fresh: set[str], step: int, logging: bool
    ) -> None:
        if step == self._ref_step:
            return
        refs: dict[str, float] = {}
        if any(k in fresh for k in (*_CURVATURE, SHARPNESS_PRECONDITIONED)):
            refs[REF_EDGE] = 1.0
            if trainer.optimizers:
                optimizer = trainer.optimizers[0]
                edges = {
                    REF_LAMBDA_EDGE: lambda_edge(optimizer),
                    REF_PRECONDITIONED_EDGE: preconditioned_edge(optimizer),
                }
                refs.update({k: v for k, v in edges.items() if v is not None and math.isfinite(v)})
        if self._warning is not None and logging:
            refs[REF_WATCH_THRESHOLD] = self._warning.monitor.watch_threshold
        if refs:
            self._ref_step = step
            self._write(trainer, step, refs)

    def _update_bar(self, trainer: pl.Trainer) -> None:
        """Progress-bar entries, written into the Trainer's progress-bar metrics (which
        keep a value until it is replaced) only when they change."""
        bar: dict[str, str] = {}
        if self._warning is not None:
            bar["stab"] = LEVEL_NAMES[self._warning.level]
        for key in (SHARPNESS_EOS_RATIO, SHARPNESS_DIRECTIONAL_RATIO):
            reading = next((p.readings[key] for p in self._probes if key in p.readings), None)
            if reading is not None:
                bar["eos"] = f"{reading.value:.2f}"
                break
        if bar != self._bar:
            self._bar = bar
            trainer.progress_bar_metrics.update(bar)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # readings taken at an epoch's end (representation drift) are logged there
        self._follow_readings(trainer, _log_step(trainer), logging=False)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = _log_step(trainer)
        self._follow_readings(trainer, step, logging=False)
        entries = self._new_events(step)
        if entries:
            self._add_events(trainer, step, entries)
        self._seconds_in_callbacks = self._seconds(trainer)
        self.last_summary = self.build_summary()
        if trainer.is_global_zero:
            for writer in tensorboard_writers(trainer.loggers):
                writer.add_text(TIMELINE.SUMMARY, render_markdown(self.last_summary), step)
        if self.summary:
            rank_zero_info(render_text(self.last_summary))

    def _seconds(self, trainer: pl.Trainer) -> dict[str, float]:
        """Seconds in each stability callback's hooks, from a profiler that records
        durations per action (``SimpleProfiler``: ``[Callback]<state_key>.<hook>``)."""
        durations = getattr(trainer.profiler, "recorded_durations", None)
        if not self.timing or not durations:
            return {}
        out: dict[str, float] = {}
        for cb in trainer.callbacks:
            if not type(cb).__module__.startswith("lightning_stability.") or cb is self:
                continue
            prefix = f"[Callback]{cb.state_key}."
            total = sum(sum(d) for name, d in durations.items() if name.startswith(prefix))
            if total:
                name = type(cb).__name__
                out[name] = out.get(name, 0.0) + total
        return out

    def build_summary(self, name: str = "this run") -> RunSummary:
        """The summary of what has been logged so far (the report's
        :func:`~lightning_stability.report.summarize`)."""
        summary = summarize(name, self.run_log)
        summary.seconds_in_callbacks = dict(self._seconds_in_callbacks)
        return summary


_LR_TAGS = (TIMELINE.LR_APPLIED, TIMELINE.LR_SCHEDULE, TIMELINE.LR_FACTOR)


def _learning_rates(lr: Any, factor: float, cut: float) -> tuple[float, float, float]:
    """(applied, scheduled, factor) from the requested ``lr`` (the schedule's value times
    ``cut``, the backoff and stage factors) and the total ``factor`` (with the guard's)."""
    requested = _as_float(lr)
    schedule = requested / cut if cut > 0 else math.nan
    return requested * factor / cut if cut > 0 else math.nan, schedule, factor
