"""Two instances of one callback class in one Trainer: each has its own checkpoint entry and
gets its own state back on resume, whether their arguments differ or are identical."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_actions_events import ScriptedSource
from torch import nn

import lightning_stability
from lightning_stability import (
    AuditConfig,
    Baselines,
    DriftCadence,
    EarlyWarning,
    GradientMonitor,
    InstabilityEvent,
    Level,
    LossMonitor,
    LRBackoff,
    LRGuard,
    PerturbationAudit,
    RepresentationDriftMonitor,
    Rollback,
    SharpnessCadence,
    SharpnessEstimator,
    SharpnessMeasures,
    SharpnessMonitor,
    StabilityDashboard,
    StagedTraining,
    stability_callbacks,
)
from lightning_stability.actions import TrainingSnapshot
from lightning_stability.actions.adaptive_clip import AdaptiveGradientClipping

STEPS = 4  # steps before the checkpoint; one epoch of the loader below
MARK = 1234.5


def _sharpness(every: int) -> SharpnessMonitor:
    return SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=every, adaptive=False),
        estimator=SharpnessEstimator(max_iter=5),
        measures=SharpnessMeasures(directional=False, critical=False, preconditioned=False),
    )


def _drift(every: int) -> RepresentationDriftMonitor:
    return RepresentationDriftMonitor(
        cadence=DriftCadence(every_n_steps=every, every_n_epochs=100),
        probe_inputs=torch.randn(16, 10, generator=torch.Generator().manual_seed(1)),
        layers=["net.0"],
    )


def _audit(horizon: int) -> PerturbationAudit:
    return PerturbationAudit(
        audit=AuditConfig(horizon=horizon, dimensions=("optimization",)), num_batches=1
    )


def _mark_event(cb: Any) -> None:
    cb.events.append(InstabilityEvent(Level.WATCH, -1, message="mark"))


def _marked_events(state: dict[str, Any]) -> bool:
    return "'mark'" in repr(state["events"])


def _mark_count(attr: str) -> tuple[Callable[[Any], None], Callable[[dict[str, Any]], bool]]:
    def mark(cb: Any) -> None:
        setattr(cb, attr, getattr(cb, attr) + 1000)

    return mark, lambda state: state[attr] >= 1000


def _mark_window(name: str) -> tuple[Callable[[Any], None], Callable[[dict[str, Any]], bool]]:
    return (
        lambda cb: getattr(cb, name).update(MARK),
        lambda state: MARK in state[name]["values"],
    )


_EVENT_MARK = (_mark_event, _marked_events)

# class -> (an instance, an instance with other arguments), then how to mark the second
# instance's state and how to see the mark in a state dict; the second instance is built
# by the first factory when both get the same arguments.
Factory = Callable[[], Callback]
CASES: dict[type, tuple[Factory, Factory, Any, Any]] = {
    GradientMonitor: (
        lambda: GradientMonitor(window=5),
        lambda: GradientMonitor(window=9),
        *_mark_window("norm_window"),
    ),
    LossMonitor: (
        lambda: LossMonitor(window=5),
        lambda: LossMonitor(window=9),
        *_mark_window("loss_window"),
    ),
    SharpnessMonitor: (
        lambda: _sharpness(2),
        lambda: _sharpness(3),
        *_mark_count("num_checks"),
    ),
    RepresentationDriftMonitor: (
        lambda: _drift(2),
        lambda: _drift(3),
        *_mark_count("num_checks"),
    ),
    PerturbationAudit: (
        lambda: _audit(2),
        lambda: _audit(3),
        lambda cb: cb.history.append({"step": -1, "values": {"mark": MARK}}),
        lambda state: any(h["values"].get("mark") == MARK for h in state["history"]),
    ),
    EarlyWarning: (
        lambda: EarlyWarning(baselines=Baselines(window=32)),
        lambda: EarlyWarning(baselines=Baselines(window=48)),
        *_EVENT_MARK,
    ),
    LRBackoff: (
        lambda: LRBackoff(factor=0.5),
        lambda: LRBackoff(factor=0.25),
        *_EVENT_MARK,
    ),
    StagedTraining: (
        lambda: StagedTraining(calm_steps=100),
        lambda: StagedTraining(calm_steps=50),
        *_EVENT_MARK,
    ),
    Rollback: (
        lambda: Rollback(every=2),
        lambda: Rollback(every=3),
        *_EVENT_MARK,
    ),
    LRGuard: (
        lambda: LRGuard(margin=0.5),
        lambda: LRGuard(margin=0.25),
        *_EVENT_MARK,
    ),
    AdaptiveGradientClipping: (
        lambda: AdaptiveGradientClipping(z=2.5, warmup=2),
        lambda: AdaptiveGradientClipping(z=3.0, warmup=2),
        *_mark_window("history"),
    ),
}


def _stateful(cls: Any) -> bool:
    # what Lightning counts as stateful when it checks the keys
    return (
        isinstance(cls, type)
        and issubclass(cls, Callback)
        and cls.state_dict is not Callback.state_dict
    )


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(_same, x, y))
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return x == y


def test_every_exported_stateful_callback_is_covered():
    exported = {getattr(lightning_stability, name) for name in lightning_stability.__all__}
    stateful = {cls for cls in exported if _stateful(cls)}
    assert stateful, "no stateful callback found"
    assert stateful <= set(CASES), sorted(c.__name__ for c in stateful - set(CASES))


class _Mark(Callback):
    """Marks ``target``'s state at the last step before the checkpoint is written."""

    def __init__(self, target: Callback, mark: Callable[[Any], None]) -> None:
        self.target, self.mark = target, mark

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == STEPS:
            self.mark(self.target)


def _received(callbacks: list[Callback]) -> dict[int, dict[str, Any]]:
    """Record the state Lightning hands each callback on restore."""
    got: dict[int, dict[str, Any]] = {}
    for cb in callbacks:
        original = cb.load_state_dict

        def record(state: dict[str, Any], cb: Callback = cb, original: Any = original) -> None:
            got[id(cb)] = copy.deepcopy(state)
            original(state)

        cb.load_state_dict = record  # type: ignore[method-assign]
    return got


def _fit(callbacks: list[Callback], max_steps: int, tmp_path: Path, ckpt_path: str | None = None):
    t = trainer(
        max_steps=max_steps,
        callbacks=[
            ScriptedSource({}),
            *callbacks,
            ModelCheckpoint(dirpath=tmp_path, save_last=True),
        ],
        enable_checkpointing=True,
    )
    t.fit(
        TinyClassifier(),
        loader(classification_data(64), batch_size=16, shuffle=False),
        ckpt_path=ckpt_path,
    )
    return t


@pytest.mark.parametrize("same", [False, True], ids=["other-args", "same-args"])
@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_two_instances_save_and_resume(cls, same, tmp_path):
    make_a, make_other, mark, marked = CASES[cls]
    make_b = make_a if same else make_other
    a, b = make_a(), make_b()
    assert a.state_key != b.state_key
    _fit([a, b, _Mark(b, mark)], STEPS, tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert a.state_key in saved and b.state_key in saved
    assert not marked(saved[a.state_key]) and marked(saved[b.state_key])

    a2, b2 = make_a(), make_b()
    got = _received([a2, b2])
    _fit([a2, b2], STEPS + 2, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    for old, new in ((a, a2), (b, b2)):
        assert new.state_key == old.state_key
        assert _same(got[id(new)], saved[old.state_key])
    assert marked(b2.state_dict()) and not marked(a2.state_dict())


def test_identical_copies_are_numbered_in_list_order(tmp_path):
    first, second, third = LossMonitor(), LossMonitor(), LossMonitor()
    other = LossMonitor(window=7)
    t = trainer(max_steps=1, callbacks=[third, other, first, second])
    t.fit(TinyClassifier(), loader(classification_data(32)))
    base = LossMonitor().identity_key()
    assert third.state_key == base
    assert first.state_key == base[:-1] + ", 'instance': 1}"
    assert second.state_key == base[:-1] + ", 'instance': 2}"
    assert other.state_key == other.identity_key() != base


def test_default_set_and_an_extra_gradient_monitor_resume(tmp_path):
    def build() -> list[Callback]:
        return [
            *stability_callbacks(sharpness={"every_n_steps": 2, "max_iter": 5}, actions="staged"),
            GradientMonitor(),
        ]

    cbs = build()
    extra, default = cbs[-1], next(cb for cb in cbs if isinstance(cb, GradientMonitor))
    assert default is not extra and default.state_key != extra.state_key
    _fit(cbs, STEPS, tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    keys = [cb.state_key for cb in cbs if _stateful(type(cb))]
    assert len(set(keys)) == len(keys) and set(keys) <= set(saved)

    resumed = build()
    got = _received(resumed)
    t = _fit(resumed, STEPS + 2, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    assert t.global_step == STEPS + 2
    for old, new in zip(cbs, resumed):
        if _stateful(type(old)):
            assert new.state_key == old.state_key
            assert _same(got[id(new)], saved[old.state_key])


def test_checkpoint_with_class_name_keys_still_loads(tmp_path):
    """A checkpoint written when callbacks were keyed by class name: the first instance of
    a class reads the old entry, a second copy starts fresh; nothing fails."""
    a, b, warning = GradientMonitor(window=5), GradientMonitor(window=5), EarlyWarning()
    _fit([a, b, warning], STEPS, tmp_path)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    callbacks = ckpt["callbacks"]
    old = {
        "GradientMonitor": callbacks.pop(a.state_key),
        "EarlyWarning": callbacks.pop(warning.state_key),
    }
    callbacks.pop(b.state_key)
    callbacks.update(old)
    torch.save(ckpt, tmp_path / "old.ckpt")

    a2, b2, warning2 = GradientMonitor(window=5), GradientMonitor(window=5), EarlyWarning()
    got = _received([a2, b2, warning2])
    with pytest.warns(UserWarning, match="GradientMonitor"):  # Lightning: an entry it did not match
        _fit([a2, b2, warning2], STEPS + 1, tmp_path, ckpt_path=str(tmp_path / "old.ckpt"))
    assert _same(got[id(a2)], old["GradientMonitor"])
    assert _same(got[id(warning2)], old["EarlyWarning"])
    assert id(b2) not in got


def test_rollback_snapshot_with_class_name_keys_restores_the_action():
    """A rollback snapshot checkpointed when actions were keyed by class name."""
    backoff = LRBackoff()
    state = backoff.state_dict()
    state["backoffs"] = 3
    module = nn.Linear(2, 2)
    snapshot = TrainingSnapshot(
        step=0,
        module=module.state_dict(),
        optimizers=[],
        schedulers=[],
        callbacks={"LRBackoff": state},
    )
    fake = SimpleNamespace(optimizers=[], lr_scheduler_configs=[], precision_plugin=None)
    snapshot.restore(fake, module, {backoff.state_key: backoff})
    assert backoff.backoffs == 3


def test_dashboard_key_is_distinct_per_copy():
    first, second = StabilityDashboard(), StabilityDashboard()
    assert first.state_key != second.state_key


def test_keys_before_setup_avoid_live_copies():
    """Before setup (when the Trainer checks keys at construction) a copy of a callback
    that already ran in another Trainer takes a number the other does not hold."""
    used = LossMonitor()
    trainer(max_steps=1, callbacks=[used]).fit(TinyClassifier(), loader(classification_data(32)))
    fresh = LossMonitor()
    assert fresh.state_key != used.state_key
    pl.Trainer(accelerator="cpu", logger=False, callbacks=[used, fresh])  # no duplicate-key error
