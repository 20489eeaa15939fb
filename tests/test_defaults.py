"""The default set's LRBackoff ramps a cut back after a calm period."""

from __future__ import annotations

import pytest
from helpers import TinyClassifier, classification_data, loader, trainer
from test_actions_events import LrRecorder, ScriptedSource

from lightning_stability import stability_callbacks
from lightning_stability.actions import LRBackoff


def _default_backoff() -> LRBackoff:
    (backoff,) = [cb for cb in stability_callbacks(actions="backoff") if isinstance(cb, LRBackoff)]
    return backoff


def test_default_backoff_recovers():
    backoff = _default_backoff()
    assert backoff.calm_steps == 100 and backoff.recovery_steps == 100


def test_default_backoff_ramps_a_cut_back_after_the_calm_period():
    backoff, lrs = _default_backoff(), LrRecorder()
    t = trainer(max_steps=205, callbacks=[ScriptedSource({1: "warning", 2: "ok"}), backoff, lrs])
    t.fit(TinyClassifier(lr=0.1), loader(classification_data(128), shuffle=False))
    got = lrs.lrs
    assert got[1] == pytest.approx(0.05)
    assert got[100] == pytest.approx(0.05)  # 99 calm steps (from the OK at 2): still cut
    assert 0.05 < got[101] < got[150] < got[199] < 0.1  # geometric ramp
    assert got[200] == pytest.approx(0.1) and got[205] == pytest.approx(0.1)
    assert max(got.values()) <= 0.1 * (1 + 1e-12)  # never above the original lr
