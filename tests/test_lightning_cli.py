"""The example YAML configures every stability callback through LightningCLI."""

import sys
from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from cli import main  # noqa: E402

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
