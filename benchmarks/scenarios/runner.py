"""Running one scenario with one set of callbacks, and recording what happened.

Modes (what :func:`stability_set` attaches):
    ``"bare"``: nothing of ours.
    ``"probes"``: every measuring callback that is available.
    ``"warning"``: the probes plus ``EarlyWarning`` (actions off).
    ``"actions"``: the above plus the actions (LR backoff and rollback).
    ``"staged"``: the default set with ``actions="staged"`` (staged training and rollback).
    ``"guard"``: the default set with actions off and ``lr_guard=True`` (the LR guard alone).

Imports are lazy: a callback that does not exist (yet) or cannot be built for a task is
left out and named in :attr:`RunRecord.missing`, so that its columns read "n/a" instead of
being invented.

Lightning's own detectors run on every run, passively: :class:`RecordingSpikeDetection`
records the step at which ``SpikeDetection`` would raise instead of raising, and
:class:`RecordingEarlyStopping` the step at which ``EarlyStopping(divergence_threshold=...)``
would stop instead of stopping. Recording on the same run (rather than separate runs that
really stop) compares all detectors on the same loss trajectory, and a detector that
neither changes weights nor data cannot change that trajectory.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import pkgutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, SpikeDetection
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from benchmarks.reference import quiet_trainer
from benchmarks.scenarios.divergence import divergence_step
from benchmarks.scenarios.registry import Scenario
from lightning_stability.probes.config import DriftCadence, SharpnessCadence
from lightning_stability.vocabulary import SHARPNESS_CRITICAL, SHARPNESS_LAMBDA_MAX

__all__ = [
    "MODES",
    "RecordingEarlyStopping",
    "RecordingSpikeDetection",
    "RunRecord",
    "run_scenario",
    "stability_set",
]

MODES = ("bare", "probes", "warning", "actions", "staged", "guard")
MONITORED = ("warning", "actions", "staged", "guard")
PROBES = {
    "SharpnessMonitor": "lightning_stability.probes.sharpness",
    "GradientMonitor": "lightning_stability.probes.gradients",
    "LossMonitor": "lightning_stability.probes.loss",
    "RepresentationDriftMonitor": "lightning_stability.probes.drift",
}
WARNING = {"EarlyWarning": "lightning_stability.warning.early_warning"}
# composed when there is no default set; staged training is the alternative to backoff
ACTIONS = ("LRBackoff", "Rollback")
OVERRIDES: dict[str, dict[str, Any]] = {
    # the scenario runs last a few hundred steps, shorter than the defaults' check intervals
    "SharpnessMonitor": {"cadence": SharpnessCadence(every_n_steps=50)},
    # by steps only: most scenario epochs are shorter than the default's 500-step spacing
    "RepresentationDriftMonitor": {"cadence": DriftCadence(every_n_steps=50, every_n_epochs=0)},
}
CallbacksFactory = Callable[[str, Scenario], tuple[list[Callback], list[str]]]


@dataclass
class RunRecord:
    """What one run of a scenario produced.

    ``losses[i]`` is the training loss of optimizer step ``i``; steps are optimizer steps.
    ``first_warning_step`` is the first step at which ``EarlyWarning`` reached WARNING or
    above, as the loss index of the batch at whose end it was raised (``None``: never, or
    no ``EarlyWarning`` attached, see ``missing``);
    ``warning_steps``, ``spike_detection_steps`` and ``early_stopping_steps`` list every
    step at which each detector fired.
    """

    scenario: str
    seed: int
    mode: str
    kind: str
    lr_scale: float = 1.0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    divergence_step: int | None = None
    first_warning_step: int | None = None
    warning_steps: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    spike_detection_step: int | None = None
    spike_detection_steps: list[int] = field(default_factory=list)
    early_stopping_step: int | None = None
    early_stopping_steps: list[int] = field(default_factory=list)
    early_stopping_reason: str | None = None
    readings: dict[str, dict[str, float]] = field(default_factory=dict)
    final_val_loss: float = math.nan
    wall_s: float = 0.0
    callbacks: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    steps_done: int = 0
    weights_digest: str = ""
    action_events: list[dict[str, Any]] = field(default_factory=list)
    critical_over_lambda: list[float] = field(default_factory=list)

    @property
    def warning_available(self) -> bool:
        return self.mode in MONITORED and "EarlyWarning" in self.callbacks

    def to_json(self, history: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; per-step histories only when ``history``."""
        out = asdict(self)
        if not history:
            for key in ("losses", "lrs", "val_losses"):
                out.pop(key)
        return out


class RecordingSpikeDetection(SpikeDetection):
    """Lightning's ``SpikeDetection`` (same arguments and statistics) that records the steps
    at which it would raise ``TrainingSpikeException`` instead of raising; like the
    original, a spike is kept out of its running mean."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spike_steps: list[int] = []
        self._step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self._step = trainer.global_step - 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _handle_spike(self, fabric: Any, batch_idx: int) -> None:
        self.spike_steps.append(self._step)


class RecordingEarlyStopping(EarlyStopping):
    """``EarlyStopping(monitor, divergence_threshold=...)`` that records the first step at
    which it would stop for divergence or a non-finite metric (and every later such check),
    and lets the run go on.
    Patience is effectively off: it is the divergence check being compared."""

    def __init__(self, monitor: str = "val_loss", divergence_threshold: float = math.inf) -> None:
        super().__init__(
            monitor=monitor,
            divergence_threshold=divergence_threshold,
            patience=10**9,
            check_finite=True,
            strict=False,
        )
        self.fired_step: int | None = None
        self.fired_steps: list[int] = []
        self.fired_reason: str | None = None
        self._step = 0

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        self._step = max(0, trainer.global_step - 1)
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        should_stop, _ = super()._evaluate_stopping_criteria(current)
        if should_stop:
            if self.stopping_reason in (
                EarlyStoppingReason.DIVERGENCE_THRESHOLD,
                EarlyStoppingReason.NON_FINITE_METRIC,
            ):
                self.fired_steps.append(self._step)
                if self.fired_step is None:
                    self.fired_step = self._step
                    self.fired_reason = self.stopping_reason.name.lower()
            self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        return False, None


class _Recorder(Callback):
    """Collects the per-step loss and learning rate, validation losses, the readings every
    probe publishes, and the early warning's level."""

    def __init__(self, warning: Any | None) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.val_losses: list[tuple[int, float]] = []
        self.history: dict[str, list[tuple[int, float]]] = {}
        # (batch index at which it was first seen, its step, its value): what EarlyWarning
        # saw at each batch, for replaying the warning offline (benchmarks.replay)
        self.arrivals: dict[str, list[tuple[int, int, float]]] = {}
        # the optimizer step at each batch's end and the batches that begin an epoch: the
        # rest of what EarlyWarning saw (benchmarks.replay)
        self.steps: list[int] = []
        self.epoch_starts: list[int] = []
        self.warning = warning
        self.level_step: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_starts.append(len(self.losses))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()) if loss is not None else math.nan)
        self.steps.append(int(trainer.global_step))
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
        for cb in trainer.callbacks:
            for key, reading in (getattr(cb, "readings", None) or {}).items():
                series = self.history.setdefault(key, [])
                if not series or series[-1][0] != reading.step:
                    series.append((int(reading.step), float(reading.value)))
                    self.arrivals.setdefault(key, []).append(
                        (len(self.losses) - 1, int(reading.step), float(reading.value))
                    )
        level = getattr(self.warning, "level", None)
        if self.level_step is None and level is not None and int(level) >= 2:
            self.level_step = trainer.global_step - 1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics["val_loss"])
        self.val_losses.append((max(0, trainer.global_step - 1), value))


def _find_class(package: str, name: str, module_hint: str | None = None) -> type | None:
    """``name`` from ``module_hint``, the package's exports, or any of its submodules."""
    candidates = [module_hint] if module_hint else []
    candidates.append(package)
    for mod_name in candidates:
        try:
            cls = getattr(importlib.import_module(mod_name), name, None)
        except ImportError:
            cls = None
        if cls is not None:
            return cls
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        return None
    for info in pkgutil.iter_modules(pkg.__path__, package + "."):
        try:
            cls = getattr(importlib.import_module(info.name), name, None)
        except Exception:
            continue
        if cls is not None:
            return cls
    return None


def _build(cls: type, scenario: Scenario) -> Callback:
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "layers" in params and scenario.layers:
        kwargs["layers"] = list(scenario.layers)
    kwargs.update({k: v for k, v in OVERRIDES.get(cls.__name__, {}).items() if k in params})
    return cls(**kwargs)


def _default_set(mode: str, scenario: Scenario) -> list[Callback] | None:
    """``stability_callbacks()`` (the one-line default set) for ``"warning"`` (actions
    ``"none"``), ``"actions"`` (``"backoff"`` with rollback) or ``"staged"``, with drift on
    for the scenario's layers and the scenario's check intervals; ``None`` when it does not
    exist."""
    try:
        from lightning_stability.defaults import stability_callbacks
    except ImportError:
        return None
    params = inspect.signature(stability_callbacks).parameters
    options: dict[str, Any] = {
        "actions": {"actions": "backoff", "staged": "staged"}.get(mode, "none"),
        "sharpness": dict(OVERRIDES["SharpnessMonitor"]),
        "drift": {**OVERRIDES["RepresentationDriftMonitor"], "layers": list(scenario.layers)},
        "dashboard": False,  # a view; the runs have no logger
        "lr_guard": mode == "guard",
    }
    return stability_callbacks(**{k: v for k, v in options.items() if k in params})


def stability_set(mode: str, scenario: Scenario) -> tuple[list[Callback], list[str]]:
    """The project's callbacks for ``mode`` (see the module docstring); returns
    ``(callbacks, missing)`` where ``missing`` names what was wanted but is not importable
    or could not be built, with the reason.

    ``"warning"`` and ``"actions"`` use the default set, ``stability_callbacks()``, when it
    exists; otherwise (and for ``"probes"``) the callbacks are composed one by one with
    their defaults except for :data:`OVERRIDES` and the scenario's layers.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    missing: list[str] = []
    if mode in MONITORED:
        try:
            default = _default_set(mode, scenario)
        except Exception as err:  # a default set that cannot be built for this task
            default = None
            missing.append(f"stability_callbacks ({type(err).__name__}: {err})")
        if default is not None:
            return default, missing
    wanted: list[tuple[str, str, str | None]] = []
    if mode != "bare":
        wanted += [(n, "lightning_stability.probes", m) for n, m in PROBES.items()]
    if mode in MONITORED:
        wanted += [(n, "lightning_stability.warning", m) for n, m in WARNING.items()]
    if mode == "actions":
        wanted += [(n, "lightning_stability.actions", None) for n in ACTIONS]
    callbacks: list[Callback] = []
    for name, package, hint in wanted:
        cls = _find_class(package, name, hint)
        if cls is None:
            missing.append(f"{name} (not importable)")
            continue
        try:
            callbacks.append(_build(cls, scenario))
        except Exception as err:  # a callback that cannot be built for this task
            missing.append(f"{name} ({type(err).__name__}: {err})")
    return callbacks, missing


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's and buffer's bytes, in ``state_dict`` order: equal
    digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        # flattened first: a 0-d buffer (BatchNorm's num_batches_tracked) cannot be viewed
        # as bytes; the bytes of every other tensor are the same either way
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def critical_over_lambda(history: dict[str, list[tuple[int, float]]]) -> list[float]:
    """Every finite ``critical`` reading over the latest finite ``lambda_max`` reading at
    or before its step (both in loss / parameter^2)."""
    lam = sorted((s, v) for s, v in history.get(SHARPNESS_LAMBDA_MAX, []) if math.isfinite(v))
    out = []
    for step, value in history.get(SHARPNESS_CRITICAL, []):
        before = [v for s, v in lam if s <= step]
        if math.isfinite(value) and before and before[-1] > 0:
            out.append(value / before[-1])
    return out


def _summarise(history: dict[str, list[tuple[int, float]]], until: int | None):
    """Per reading key: its median over the run, its maximum, and its last value at or
    before ``until`` (the divergence step; the run's end when ``None``)."""
    out: dict[str, dict[str, float]] = {}
    for key, series in history.items():
        values = [v for _, v in series if math.isfinite(v)]
        before = [v for s, v in series if until is None or s <= until]
        if not values:
            continue
        out[key] = {
            "median": float(torch.tensor(values).median()),
            "max": max(values),
            "last_before_divergence": before[-1] if before else math.nan,
        }
    return out


def run_scenario(
    scenario: Scenario,
    seed: int,
    mode: str = "bare",
    callbacks_factory: CallbacksFactory | None = None,
    lr_scale: float = 1.0,
    keep_history: bool = False,
) -> RunRecord:
    """Train ``scenario`` for ``seed`` with the callbacks of ``mode`` and record the run.

    ``callbacks_factory(mode, scenario) -> (callbacks, missing)`` replaces
    :func:`stability_set`. With ``keep_history`` the record also carries the readings'
    per-step series in ``record.history`` (for plots), and ``record.arrivals`` (the batch at
    which each reading arrived), ``record.steps`` (the optimizer step at each batch's end)
    and ``record.epoch_starts`` (the batches that begin an epoch), for replays.
    """
    pl.seed_everything(seed, verbose=False)
    module, train_loader, val_loader, extra, max_steps = scenario.make(seed, lr_scale)
    ours, missing = (callbacks_factory or stability_set)(mode, scenario)
    warning = next((c for c in ours if type(c).__name__ == "EarlyWarning"), None)
    record = RunRecord(scenario.name, seed, mode, scenario.kind, lr_scale=lr_scale)
    record.callbacks = [type(c).__name__ for c in ours]
    record.missing = missing

    def on_event(event: Any, trainer: Any = None, pl_module: Any = None) -> None:
        level = getattr(event, "level", None)
        record.events.append(
            {
                "level": getattr(level, "name", str(level)),
                "step": int(getattr(event, "step", -1)),
                "signals": list(getattr(event, "signals", ())),
                "message": str(getattr(event, "message", "")),
                "deviation": float(getattr(event, "deviation", math.nan)),
                "source": str(getattr(event, "source", "")),
            }
        )
        if level is not None and int(level) >= 2:
            # An event is raised at the end of a batch, when trainer.global_step has already
            # counted that batch's optimizer step: it belongs to loss index step - 1, the
            # index divergence and band-exit steps use.
            index = int(event.step) - 1
            record.warning_steps.append(index)
            if record.first_warning_step is None:
                record.first_warning_step = index

    if warning is not None and hasattr(warning, "subscribe"):
        warning.subscribe(on_event)
    spike = RecordingSpikeDetection()
    stopper = RecordingEarlyStopping("val_loss", scenario.divergence_threshold)
    recorder = _Recorder(warning)
    trainer = quiet_trainer(
        max_steps=max_steps,
        num_sanity_val_steps=0,
        val_check_interval=scenario.val_every,
        check_val_every_n_epoch=None,
        callbacks=[*extra, *ours, spike, stopper, recorder],
        deterministic=True,
        default_root_dir=tempfile.mkdtemp(prefix="scenario-"),  # nothing lands in the cwd
        **scenario.trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    record.wall_s = time.perf_counter() - start
    record.steps_done = int(trainer.global_step)
    for cb in ours:  # what the actions did, from their own event lists
        if hasattr(cb, "source_name"):
            record.action_events += [
                {
                    "level": e.level.name,
                    "step": int(e.step),
                    "message": str(e.message),
                    "source": str(e.source),
                }
                for e in getattr(cb, "events", ())
            ]
    record.weights_digest = weights_digest(module)
    record.losses, record.lrs, record.val_losses = (
        recorder.losses,
        recorder.lrs,
        recorder.val_losses,
    )
    record.divergence_step = divergence_step(record.losses, scenario.rule)
    if record.first_warning_step is None and recorder.level_step is not None:
        record.first_warning_step = recorder.level_step
        record.warning_steps = [recorder.level_step]
    record.spike_detection_step = spike.spike_steps[0] if spike.spike_steps else None
    record.spike_detection_steps = list(spike.spike_steps)
    record.early_stopping_step = stopper.fired_step
    record.early_stopping_steps = list(stopper.fired_steps)
    record.early_stopping_reason = stopper.fired_reason
    record.final_val_loss = record.val_losses[-1][1] if record.val_losses else math.nan
    record.readings = _summarise(recorder.history, record.divergence_step)
    record.critical_over_lambda = critical_over_lambda(recorder.history)
    if keep_history:
        record.history = recorder.history  # type: ignore[attr-defined]
        record.arrivals = recorder.arrivals  # type: ignore[attr-defined]
        record.steps = recorder.steps  # type: ignore[attr-defined]
        record.epoch_starts = recorder.epoch_starts  # type: ignore[attr-defined]
    return record
