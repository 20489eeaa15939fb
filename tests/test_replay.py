"""benchmarks.replay: replaying a recorded run through the configuration that ran it gives
its events exactly; another configuration gives its own; the summary counts by hand."""

from __future__ import annotations

import functools

import pytest

from benchmarks.replay import evaluate, record_run, replay
from lightning_stability.warning import BandShape, EarlyWarning, LossBand


@functools.cache
def _recorded(name: str, seed: int):
    return record_run("scenario", name, seed)


@pytest.mark.parametrize(("name", "seed"), [("lr_too_high", 0), ("label_noise_burst", 1)])
def test_replaying_the_recorded_configuration_gives_its_events_exactly(name, seed):
    run = _recorded(name, seed)
    assert run["events"], "the run raised events to compare"
    assert replay(run, EarlyWarning()) == [tuple(e) for e in run["events"]]


def test_another_configuration_gives_its_own_events():
    """The band without its start band (lag=0) warns lr_too_high seed 0 only after it has
    diverged (step 79); the default warns before."""
    run = _recorded("lr_too_high", 0)
    default = evaluate([run], EarlyWarning)
    old = evaluate([run], lambda: EarlyWarning(loss_band=LossBand(shape=BandShape(lag=0))))
    assert default["diverging"]["recall"] == 1.0 and default["diverging"]["median_lead"] > 0
    assert old["diverging"]["recall"] == 0.0 and old["missed"] == [("lr_too_high", 0)]


def _synthetic(kind: str, losses: list[float], **extra) -> dict:
    run = {
        "kind": kind, "name": "synthetic", "seed": 0, "split": "calibration",
        "scenario_kind": "diverging", "onset": 0, "gradual": True, "divergence_step": None,
        "losses": losses, "steps": list(range(1, len(losses) + 1)), "epoch_starts": [0],
        "arrivals": {"stability/loss/value": [(i, i + 1, v) for i, v in enumerate(losses)]},
    }  # fmt: skip
    run.update(extra)
    return run


def test_summary_counts_by_hand():
    """A flat loss: no event. A loss that jumps x20 at batch 200 and stays: warned at the
    step the band sees it leave (two trailing medians outside), detected before the
    divergence step we declare (210), lead 210 minus that loss index."""
    flat = _synthetic("healthy", [1.0] * 500)
    jump = _synthetic("scenario", [1.0] * 200 + [20.0] * 100, divergence_step=210)
    summary = evaluate([flat, jump], EarlyWarning)
    assert summary["healthy"]["calibration"] == {
        "runs": 1, "runs_with_warning": 0, "watch_per_1000_steps": 0.0
    }  # fmt: skip
    first = next(s - 1 for s, lv in replay(jump, EarlyWarning()) if lv in ("WARNING", "CRITICAL"))
    assert 200 <= first <= 205
    assert summary["diverging"] == {"runs": 1, "recall": 1.0, "median_lead": 210 - first}
    late = _synthetic("scenario", [1.0] * 200 + [20.0] * 100, divergence_step=first - 1)
    assert evaluate([late], EarlyWarning)["missed"] == [("synthetic", 0)]
