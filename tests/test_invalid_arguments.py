"""Bad configuration fails at construction with a message that names the argument and what
it accepts; a module without an optimizer makes the actions step aside, not crash."""

from __future__ import annotations

import math

import pytest
from helpers import TinyClassifier, classification_data, loader, trainer
from test_actions_events import ScriptedSource

from lightning_stability import LRBackoff, Rollback, StagedTraining, stability_callbacks


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_stage_values(bad):
    with pytest.raises(ValueError, match=r"stages: stages\[1\]\['lr_scale'\] must be a finite"):
        StagedTraining(stages=[{}, {"lr_scale": bad}])
    with pytest.raises(ValueError, match=r"'gradient_clip_val'\] must be a finite number > 0"):
        StagedTraining(stages=[{"gradient_clip_val": bad}])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_min_lr_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="min_lr must be a finite number >= 0"):
        LRBackoff(min_lr=bad)


@pytest.mark.parametrize("cls", [LRBackoff, StagedTraining, Rollback])
def test_actions_refuse_level_ok(cls):
    with pytest.raises(ValueError, match="level must be one of 'watch', 'warning', 'critical'"):
        cls(level="ok")


def test_unknown_callback_option_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"sharpness: unknown argument\(s\) \['bogus'\]") as err:
        stability_callbacks(sharpness={"bogus": 1})
    assert "every_n_steps" in str(err.value)
    with pytest.raises(ValueError, match="warning: unknown argument"):
        stability_callbacks(warning={"treshold": 3})


class NoOptimizer(TinyClassifier):
    def configure_optimizers(self):
        return None


@pytest.mark.parametrize(
    "actions",
    [
        lambda: [LRBackoff(calm_steps=2, recovery_steps=2)],
        lambda: [StagedTraining(calm_steps=2)],
        lambda: [LRBackoff(), Rollback()],
    ],
    ids=["backoff", "staged", "backoff+rollback"],
)
def test_a_module_without_an_optimizer_runs_to_the_end(actions):
    t = trainer(max_steps=8, callbacks=[ScriptedSource({2: "warning", 4: "critical"}), *actions()])
    t.fit(NoOptimizer(), loader(classification_data(64)))
    assert t.global_step == 8
