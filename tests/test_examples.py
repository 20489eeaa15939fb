"""The examples run end to end (shortened) and leave the TensorBoard logs they promise."""

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_stability.report import find_runs, load_run
from lightning_stability.tensorboard import LAYOUT_TAG, read_layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "args"),
    [("quickstart.py", ["--epochs", "2"]), ("feedback_loop.py", ["--steps", "150"])],
)
def test_example_runs_and_logs(tmp_path, script, args):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args, "--logdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "without callbacks" in out.stdout and "with callbacks" in out.stdout
    for name in ("without", "with_callbacks"):
        assert list((tmp_path / name).rglob("events.out.tfevents.*")), name
    if script == "quickstart.py":
        # the tab's loss chart shows both runs: the bare run logs the same loss tag
        (guarded,) = find_runs(tmp_path / "with_callbacks")
        (bare,) = find_runs(tmp_path / "without")
        acc = EventAccumulator(str(guarded))
        acc.Reload()
        (layout,) = acc.Tensors(LAYOUT_TAG)
        loss_chart = read_layout(layout.tensor_proto.string_val[0])["Stability"][0]
        assert loss_chart.tags[0] in load_run(bare).scalars
        assert "summary: this run" in out.stdout
