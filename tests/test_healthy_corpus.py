"""The healthy-run corpus: its shape (splits, kinds, long runs) and real short fits of a few
cheap configurations."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from helpers import trainer

from benchmarks.healthy import summarise, write_section
from benchmarks.scenarios.healthy import HEALTHY, CurriculumSampler


def test_corpus_shape():
    assert len(HEALTHY) >= 14
    assert all(s.kind == "healthy" for s in HEALTHY.values())
    assert all(name == s.name for name, s in HEALTHY.items())
    splits = [s.split for s in HEALTHY.values()]
    assert set(splits) == {"calibration", "validation"}
    assert splits.count("calibration") >= 6 and splits.count("validation") >= 6


def test_two_long_runs():
    # building a long configuration is cheap: only its loaders and a tiny model
    long = [n for n in ("long_synthetic_adamw", "long_digits_sgd_cosine") if n in HEALTHY]
    assert len(long) == 2
    for name in long:
        assert HEALTHY[name].make(0)[4] >= 20_000


@pytest.mark.parametrize(
    "name", ["mlp_momentum_step_decay", "cnn_adagrad_curriculum", "eos_fullbatch_regression"]
)
def test_config_builds_and_fits(name):
    pl.seed_everything(0, verbose=False)
    module, train, val, extra, max_steps = HEALTHY[name].build(0, 1.0)
    assert max_steps >= 600
    t = trainer(max_steps=5, limit_val_batches=1, callbacks=extra, deterministic=False)
    t.fit(module, train, val)
    assert t.global_step == 5
    assert "train_loss" in t.callback_metrics


def test_curriculum_sampler_is_easy_first_and_independent_of_iteration_count():
    sampler = CurriculumSampler(10, easy=[1, 3, 5], switch_epoch=2, seed=0)
    first = list(sampler)
    assert len(first) == 10 and set(first) == {1, 3, 5}
    assert list(sampler) == first  # a second iteration of the same epoch: same order
    sampler.set_epoch(2)
    assert sorted(sampler) == list(range(10))


def test_summary_counts_and_markdown_section(tmp_path):
    def row(mode, loud=False, watch=0, digest="a", acted=0):
        return {
            "config": "c",
            "split": "calibration",
            "seed": 0,
            "mode": mode,
            "max_steps": 1000,
            "steps_done": 1000,
            "reached_max_steps": True,
            "events_by_level": {"WATCH": watch, "WARNING": int(loud), "CRITICAL": 0},
            "warning_plus": [{"step": 3, "level": "WARNING", "message": "m"}] if loud else [],
            "action_events": acted,
            "watch_per_1000": float(watch),
            "divergence_step": None,
            "bit_identical_to_bare": None if mode == "bare" else digest == "a",
        }

    s = summarise(
        [row("bare"), row("warning", loud=True, watch=2), row("actions", digest="b", acted=1)]
    )
    assert s["monitored_runs"] == 2 and s["runs_with_warning_plus"] == 1
    assert s["warning_plus_events"] == 1 and s["watch_per_1000_mean"] == 1.0
    assert s["acting_runs_with_action"] == 1 and (s["bit_identical"], s["bit_identical_of"]) == (
        1,
        2,
    )

    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nother text\n")
    write_section("<!-- healthy:begin -->\nfirst\n<!-- healthy:end -->\n", md)
    write_section("<!-- healthy:begin -->\nsecond\n<!-- healthy:end -->\n", md)
    text = md.read_text()
    assert text.startswith("# Results\n\nother text\n")
    assert "second" in text and "first" not in text and text.count("healthy:begin") == 1
