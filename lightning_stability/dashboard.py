"""What a person sees during and after a run: the Stability tab in TensorBoard, reference
lines, actions as text, the level in the progress bar, and the end-of-run summary."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_stability.actions.base import StabilityAction
from lightning_stability.callback_identity import IdentifiedCallback
from lightning_stability.probes.base import STEP_HOOKS, StabilityProbe, write_to_loggers
from lightning_stability.probes.edge import lambda_edge, preconditioned_edge
from lightning_stability.report import SUMMARY_ROWS, RunSummary, print_summary, render_markdown
from lightning_stability.tensorboard import tensorboard_writers, write_layout
from lightning_stability.warning.early_warning import EarlyWarning
from lightning_stability.warning.events import InstabilityEvent, Level

__all__ = ["StabilityDashboard"]

LEVEL_NAMES = {lv: lv.name.lower() for lv in Level}

_SUMMARY_TAGS = frozenset(tag for _, tag, _ in SUMMARY_ROWS)
# what the dashboard reads from probes: the summary's readings and those framing the edge
_PROBE_TAGS = _SUMMARY_TAGS | {
    "stability/sharpness/lambda_max",
    "stability/sharpness/directional",
    "stability/sharpness/preconditioned",
}

_TIMED_HOOKS = (
    *sorted(STEP_HOOKS),
    "on_train_epoch_end",
    "on_validation_epoch_end",
    "on_train_start",
)


class _Peak:
    """Running max / min / mean / last / confirmed max (:func:`confirmed_max`) of one
    reading; non-finite (invalid) readings are skipped."""

    __slots__ = ("confirmed", "count", "last", "max", "min", "previous", "total")

    def __init__(self) -> None:
        self.max, self.min, self.total, self.count, self.last = -math.inf, math.inf, 0.0, 0, 0.0
        self.previous, self.confirmed = math.nan, -math.inf

    def add(self, value: float) -> None:
        self.last = value
        if math.isfinite(value):
            self.max, self.min = max(self.max, value), min(self.min, value)
            self.total += value
            self.count += 1
            if math.isfinite(self.previous):
                self.confirmed = max(self.confirmed, min(self.previous, value))
            self.previous = value

    def get(self, how: str) -> float:
        if how == "last":
            return self.last
        if how == "confirmed_max":
            return self.confirmed if math.isfinite(self.confirmed) else math.nan
        if not self.count:
            return math.nan
        return {"max": self.max, "min": self.min}.get(how, self.total / max(self.count, 1))


class StabilityDashboard(IdentifiedCallback):
    """Shows the stability callbacks' work to a person.

    * writes the "Stability" custom-scalars layout to every TensorBoard logger at fit
      start, and reference lines (``stability/ref/edge`` = 1 for the ratios,
      ``stability/ref/lambda_edge`` for ``lambda_max``/``directional`` and, for Adam/AdamW,
      ``stability/ref/preconditioned_edge`` for ``preconditioned``, both from
      :mod:`~lightning_stability.probes.edge`, the one definition of the edge the ratios
      use; ``stability/ref/watch_threshold``) next to the readings they frame;
    * writes warnings and actions as markdown text (``stability/actions``);
    * adds the current level (``stab``: ok/watch/warning/critical) and edge-of-stability
      ratio (``eos``) to Lightning's progress bar;
    * prints a summary table at the end of ``fit`` (rich if installed): peaks, events,
      actions, and wall time spent in each stability callback.

    Other loggers still receive every scalar; TensorBoard-only features are skipped for
    them. Everything here is rank-0 only and changes nothing in training.

    Args:
        progress_bar: show level and ratio in the progress bar (default True).
        summary: print the summary at the end of ``fit`` (default True).
        timing: measure the time spent in the other stability callbacks' hooks (default
            True; costs two clock reads per hook call).
    """

    def __init__(self, progress_bar: bool = True, summary: bool = True, timing: bool = True):
        super().__init__()
        self.progress_bar = progress_bar
        self.summary = summary
        self.timing = timing
        self.seconds: dict[str, float] = {}
        self.last_summary: RunSummary | None = None
        self._peaks: dict[str, _Peak] = {}
        self._seen: dict[str, int] = {}
        self._probes: list[StabilityProbe] = []
        self._warning: EarlyWarning | None = None
        self._actions: list[StabilityAction] = []
        self._action_events_seen: dict[int, int] = {}
        self._wrapped: list[tuple[Any, str]] = []
        self._ref_step = -1

    # ------------------------------------------------------------------ wiring
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        callbacks = trainer.callbacks
        self._probes = [cb for cb in callbacks if isinstance(cb, StabilityProbe)]
        self._warning = next((cb for cb in callbacks if isinstance(cb, EarlyWarning)), None)
        self._actions = [cb for cb in callbacks if isinstance(cb, StabilityAction)]
        if self.timing:
            for cb in [*self._probes, *self._actions, self._warning]:
                if cb is not None:
                    self._time_hooks(cb)
        bar = trainer.progress_bar_callback
        if self.progress_bar and bar is not None:
            self._wrap(bar, "get_metrics", self._with_stability_metrics)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for obj, name in self._wrapped:
            obj.__dict__.pop(name, None)
        self._wrapped = []

    def _wrap(self, obj: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        # An instance attribute shadows the class method and is removed at teardown.
        setattr(obj, name, make(getattr(obj, name)))
        self._wrapped.append((obj, name))

    def _time_hooks(self, cb: Callback) -> None:
        label = type(cb).__name__
        for hook in _TIMED_HOOKS:
            if getattr(type(cb), hook, None) is getattr(Callback, hook, None):
                continue  # not overridden: nothing to time

            def make(fn: Callable, label: str = label) -> Callable:
                def timed(*args: Any, **kwargs: Any) -> Any:
                    start = time.perf_counter()
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        self.seconds[label] = (
                            self.seconds.get(label, 0.0) + time.perf_counter() - start
                        )

                return timed

            self._wrap(cb, hook, make)

    def _with_stability_metrics(self, get_metrics: Callable) -> Callable:
        def wrapped(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            metrics = get_metrics(trainer, pl_module)
            if self._warning is not None:
                metrics["stab"] = LEVEL_NAMES[self._warning.level]
            ratio = self._latest("stability/sharpness/eos_ratio")
            if ratio is None:
                ratio = self._latest("stability/sharpness/directional_ratio")
            if ratio is not None:
                metrics["eos"] = f"{ratio:.2f}"
            return metrics

        return wrapped

    def _latest(self, key: str) -> float | None:
        for probe in self._probes:
            reading = probe.readings.get(key)
            if reading is not None:
                return reading.value
        return None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            write_layout(trainer.loggers)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        # Only the readings the summary reports are followed, each once per new reading
        # (probes stamp readings at their own step, which need not be this one).
        fresh: dict[str, float] = {}
        for probe in self._probes:
            for key in _PROBE_TAGS.intersection(probe.readings):
                reading = probe.readings[key]
                if self._seen.get(key) != reading.step:
                    self._seen[key] = reading.step
                    fresh[key] = reading.value
        if self._warning is not None:
            fresh["stability/meta/deviation"] = self._warning.deviation
            fresh["stability/meta/level"] = float(self._warning.level)
        for key in ("stability/action/lr_scale", "stability/action/stage"):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                fresh[key] = float(value)
        for key, value in fresh.items():
            self._peaks.setdefault(key, _Peak()).add(value)
        if trainer.is_global_zero:
            self._write_references(trainer, fresh, step)
            self._write_action_events(trainer)

    def _write_references(self, trainer: pl.Trainer, fresh: dict[str, float], step: int) -> None:
        if step == self._ref_step:
            return
        refs: dict[str, float] = {}
        curvature = ("lambda_max", "directional", "preconditioned")
        if any(f"stability/sharpness/{k}" in fresh for k in curvature):
            refs["stability/ref/edge"] = 1.0
            if trainer.optimizers:
                optimizer = trainer.optimizers[0]
                edges = {
                    "stability/ref/lambda_edge": lambda_edge(optimizer),
                    "stability/ref/preconditioned_edge": preconditioned_edge(optimizer),
                }
                refs.update({k: v for k, v in edges.items() if v is not None and math.isfinite(v)})
        if self._warning is not None and step % max(trainer.log_every_n_steps, 1) == 0:
            refs["stability/ref/watch_threshold"] = self._warning.monitor.watch_threshold
        if refs:
            self._ref_step = step
            write_to_loggers(trainer, refs)

    def _write_action_events(self, trainer: pl.Trainer) -> None:
        writers = tensorboard_writers(trainer.loggers)
        for action in self._actions:
            seen = self._action_events_seen.get(id(action), 0)
            new: list[InstabilityEvent] = action.events[seen:]
            self._action_events_seen[id(action)] = len(action.events)
            for event in new:
                for writer in writers:
                    writer.add_text(
                        "stability/actions", f"**{event.source}**: {event.message}", event.step
                    )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_summary = self.build_summary()
        if trainer.is_global_zero:
            self._write_action_events(trainer)
            for writer in tensorboard_writers(trainer.loggers):
                writer.add_text(
                    "stability/summary", render_markdown(self.last_summary), trainer.global_step
                )
            if self.summary:
                self._print(self.last_summary)

    @rank_zero_only
    def _print(self, summary: RunSummary) -> None:
        print_summary(summary)

    def build_summary(self, name: str = "this run") -> RunSummary:
        """The summary of what has been seen so far."""
        rows = [
            (label, self._peaks[tag].get(how))
            for label, tag, how in SUMMARY_ROWS
            if tag in self._peaks and self._peaks[tag].count
        ]
        events: list[tuple[int, str]] = []
        if self._warning is not None:
            events += [(e.step, e.message) for e in self._warning.events]
        for action in self._actions:
            events += [(e.step, f"{e.source}: {e.message}") for e in action.events]
        return RunSummary(
            name=name,
            rows=rows,
            events=sorted(events, key=lambda e: e[0]),
            seconds_in_callbacks=dict(self.seconds),
        )
