"""The example YAML configures every stability callback through LightningCLI."""

import sys
import warnings
from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from cli import main  # noqa: E402
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from lightning.fabric.utilities.rank_zero import LightningDeprecationWarning  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

import lightning_stability as ls  # noqa: E402


def test_example_config_parses_and_fits(tmp_path):
    config = yaml.safe_load((EXAMPLES / "stability.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(
        [
            "fit",
            "--config",
            str(path),
            "--trainer.max_steps=30",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    by_type = {type(cb): cb for cb in cli.trainer.callbacks}
    assert by_type[ls.SharpnessMonitor].k == 2
    assert by_type[ls.LRBackoff].factor == 0.5
    assert by_type[ls.LossMonitor].quantile == 0.95
    assert by_type[ls.RepresentationDriftMonitor].probe_size == 128
    assert cli.trainer.global_step == 30
    assert "stability/sharpness/directional" in cli.trainer.callback_metrics
    assert list(tmp_path.rglob("events.out.tfevents.*"))


GROUPED = """
trainer:
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  callbacks:
    - class_path: lightning_stability.SharpnessMonitor
      init_args:
        cadence:
          every_n_steps: 500
          adaptive: false
        estimator:
          k: 2
          dtype: float64
        measures:
          trace: true
    - class_path: lightning_stability.EarlyWarning
      init_args:
        levels:
          patience: 3
        trend:
          tau: 0.7
        edge:
          margin: 0.3
    - class_path: lightning_stability.RepresentationDriftMonitor
      init_args:
        cadence:
          every_n_steps: 50
        probe:
          probe_size: 128
    - class_path: lightning_stability.PerturbationAudit
      init_args:
        audit:
          horizon: 5
          dimensions: [optimization]
"""


def test_grouped_yaml_instantiates_the_same_settings_as_python(tmp_path):
    path = tmp_path / "grouped.yaml"
    path.write_text(GROUPED)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LightningDeprecationWarning)
        cli = LightningCLI(
            DigitsClassifier,
            DigitsDataModule,
            args=["--config", str(path), f"--trainer.default_root_dir={tmp_path}"],
            run=False,
        )
    by_type = {type(cb): cb for cb in cli.trainer.callbacks}
    sharpness = by_type[ls.SharpnessMonitor]
    expected = ls.SharpnessMonitor(
        cadence=ls.SharpnessCadence(every_n_steps=500, adaptive=False),
        estimator=ls.SharpnessEstimator(k=2, dtype="float64"),
        measures=ls.SharpnessMeasures(trace=True),
    )
    assert (sharpness.cadence, sharpness.estimator, sharpness.measures) == (
        expected.cadence,
        expected.estimator,
        expected.measures,
    )
    assert sharpness.every_n_steps == 500 and sharpness.k == 2 and sharpness.trace
    warning = by_type[ls.EarlyWarning]
    assert warning.level_policy == ls.LevelPolicy(patience=3)
    assert warning.monitor.trend_config == ls.TrendTest(tau=0.7)
    assert warning.monitor.edge_config == ls.EdgeRule(margin=0.3)
    drift = by_type[ls.RepresentationDriftMonitor]
    assert drift.cadence == ls.DriftCadence(every_n_steps=50)
    assert drift.probe_size == 128
    audit = by_type[ls.PerturbationAudit]
    assert audit.config == ls.AuditConfig(horizon=5, dimensions=("optimization",))
