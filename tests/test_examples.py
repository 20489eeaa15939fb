"""The examples run end to end (shortened) and leave the TensorBoard logs they promise."""

import subprocess
import sys
from pathlib import Path

import pytest

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
