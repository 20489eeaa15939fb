"""Grouped configuration: the flat keywords of the previous release still work, warn with
the grouped form, and give the same configuration; the defaults set warns about nothing."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

import lightning_stability as ls
from lightning_stability import (
    AuditConfig,
    BandDamage,
    BandLeaving,
    BandShape,
    Baselines,
    DeviationThresholds,
    DriftCadence,
    DriftLimits,
    DriftProbe,
    EdgeRule,
    LevelPolicy,
    LossBand,
    SharpnessCadence,
    SharpnessEstimator,
    SharpnessMeasures,
    TrendTest,
)
from lightning_stability.vocabulary import DIMENSIONS, LEVEL_NAMES, Level
from lightning_stability.warning import events


def _settings(obj: object, names: list[str]) -> dict[str, object]:
    return {n: getattr(obj, n) for n in names}


def test_sharpness_flat_keywords_warn_with_the_grouped_form_and_configure_the_same():
    with pytest.deprecated_call(match=r"pass cadence=SharpnessCadence\(every_n_steps=500\)"):
        old = ls.SharpnessMonitor(every_n_steps=500)
    new = ls.SharpnessMonitor(cadence=SharpnessCadence(every_n_steps=500))
    names = ["every_n_steps", "directional_every_n_steps", "k", "tol", "max_iter", "dtype"]
    assert _settings(old, names) == _settings(new, names)
    assert (old.cadence, old.estimator, old.measures) == (new.cadence, new.estimator, new.measures)


def test_sharpness_flat_keywords_across_groups_and_positionally():
    with pytest.deprecated_call(
        match=r"estimator=SharpnessEstimator\(k=2, max_iter=40, dtype='float64'\)"
    ):
        old = ls.SharpnessMonitor(
            every_n_steps=50, k=2, max_iter=40, trace=True, adaptive=False, dtype="float64"
        )
    new = ls.SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=50, adaptive=False),
        estimator=SharpnessEstimator(k=2, max_iter=40, dtype="float64"),
        measures=SharpnessMeasures(trace=True),
    )
    assert (old.cadence, old.estimator, old.measures) == (new.cadence, new.estimator, new.measures)
    with pytest.deprecated_call(match="every_n_steps"):
        positional = ls.SharpnessMonitor(50, 2)
    assert (positional.every_n_steps, positional.k) == (50, 2)


def test_warning_flat_keywords_map_onto_their_groups():
    with pytest.deprecated_call(match=r"trend=TrendTest\(tau=0.7\)"):
        old = ls.EarlyWarning(
            watch_threshold=6.0, patience=3, window=32, trend_tau=0.7, eos_margin=0.3
        )
    new = ls.EarlyWarning(
        deviation=DeviationThresholds(watch_threshold=6.0),
        levels=LevelPolicy(patience=3),
        baselines=Baselines(window=32),
        trend=TrendTest(tau=0.7),
        edge=EdgeRule(margin=0.3),
    )
    for monitor in (old.monitor, new.monitor):
        assert monitor.watch_threshold == 6.0 and monitor.window == 32
    assert old.monitor.trend_args == new.monitor.trend_args
    assert old.monitor.rules.eos_margin == new.monitor.rules.eos_margin == 0.3
    assert old.tracker.patience == new.tracker.patience == 3


def test_loss_band_drift_and_audit_flat_keywords():
    with pytest.deprecated_call(match=r"leaving=BandLeaving\(confirm=3\)"):
        band = LossBand(window=32, confirm=3, sustain=5)
    assert (band.shape, band.leaving, band.damage) == (
        BandShape(window=32),
        BandLeaving(confirm=3),
        BandDamage(sustain=5),
    )
    assert (band.window, band.confirm, band.sustain) == (32, 3, 5)

    with pytest.deprecated_call(match=r"probe=DriftProbe\(probe_size=128\)"):
        drift = ls.RepresentationDriftMonitor(probe_size=128, every_n_steps=50, chunk_size=32)
    grouped = ls.RepresentationDriftMonitor(
        cadence=DriftCadence(every_n_steps=50),
        probe=DriftProbe(probe_size=128),
        limits=DriftLimits(chunk_size=32),
    )
    names = ["probe_size", "every_n_steps", "every_n_epochs", "min_steps", "chunk_size", "seed"]
    assert _settings(drift, names) == _settings(grouped, names)

    with pytest.deprecated_call(match=r"audit=AuditConfig\(horizon=5\)"):
        audit = ls.PerturbationAudit(horizon=5)
    assert audit.config == ls.PerturbationAudit(audit=AuditConfig(horizon=5)).config


def test_lr_backoff_patience_is_a_deprecated_alias_of_calm_steps():
    with pytest.deprecated_call(match="pass calm_steps=7"):
        old = ls.LRBackoff(patience=7)
    new = ls.LRBackoff(calm_steps=7)
    assert old.calm_steps == new.calm_steps == old.patience == 7


def test_old_audit_dimension_spellings_warn_and_map_onto_the_vocabulary():
    with pytest.deprecated_call(match="optimization"):
        config = AuditConfig(dimensions=("optimisation", "signal"))
    assert config.dimensions == ("optimization", "learning_signal")
    assert set(AuditConfig().dimensions) == set(DIMENSIONS)


def test_unknown_keywords_are_refused():
    with pytest.raises(TypeError, match="every_n_stepz"):
        ls.SharpnessMonitor(every_n_stepz=5)
    with pytest.raises(TypeError, match="bogus"):
        ls.LRBackoff(bogus=1)
    with pytest.raises(ValueError, match="cadence must be a SharpnessCadence"):
        ls.SharpnessMonitor(cadence=SharpnessEstimator())


def test_configs_are_frozen_and_validated_once():
    config = SharpnessCadence()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.every_n_steps = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"every_n_steps must be an integer >= 1, got 0"):
        SharpnessCadence(every_n_steps=0)
    with pytest.raises(ValueError, match=r"backend must be one of \('native', 'pyhessian'\)"):
        SharpnessEstimator(backend="scipy")


def test_the_default_set_and_its_dict_options_raise_no_deprecation():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        ls.stability_callbacks(actions="backoff", lr_guard=True)
        ls.stability_callbacks(actions="staged")
        flat = ls.stability_callbacks(
            sharpness={"every_n_steps": 10, "k": 2},
            drift={"probe_size": 32, "every_n_steps": 20},
            warning={"trend_tau": 0.7, "patience": 3},
        )
        grouped = ls.stability_callbacks(
            sharpness={
                "cadence": SharpnessCadence(every_n_steps=10),
                "estimator": SharpnessEstimator(k=2),
            },
            drift={"probe": DriftProbe(probe_size=32), "cadence": DriftCadence(every_n_steps=20)},
            warning={"trend": TrendTest(tau=0.7), "levels": LevelPolicy(patience=3)},
        )
    by_type = {type(c): c for c in flat}
    other = {type(c): c for c in grouped}
    assert by_type[ls.SharpnessMonitor].cadence == other[ls.SharpnessMonitor].cadence
    assert by_type[ls.SharpnessMonitor].estimator == other[ls.SharpnessMonitor].estimator
    assert (
        by_type[ls.RepresentationDriftMonitor].probe == other[ls.RepresentationDriftMonitor].probe
    )
    assert by_type[ls.EarlyWarning].level_policy == other[ls.EarlyWarning].level_policy
    assert by_type[ls.EarlyWarning].monitor.trend_args == other[ls.EarlyWarning].monitor.trend_args


def test_one_set_of_level_names():
    assert tuple(level.name.lower() for level in Level) == LEVEL_NAMES
    assert LEVEL_NAMES == ("ok", "watch", "warning", "critical")
    assert [int(level) for level in Level] == [0, 1, 2, 3]
    assert ls.Level is Level
    assert events.Level is Level
