"""`lightning-stability report LOGDIR` reads event files back and summarises them."""

import math

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_stability.cli import main
from lightning_stability.report import confirmed_max, find_runs, load_run, summarize_scalars


def _write_run(path, ratios, levels, text_step=7):
    writer = SummaryWriter(str(path))
    for step, (r, lv) in enumerate(zip(ratios, levels)):
        writer.add_scalar("stability/sharpness/eos_ratio", r, step)
        writer.add_scalar("stability/meta/level", lv, step)
        writer.add_scalar("stability/loss/value", 1.0 / (step + 1), step)
        writer.add_scalar("train_loss", 0.5, step)  # not ours: must be ignored
    writer.add_text("stability/events", "warning: eos_ratio 1.4 above 1.2", text_step)
    writer.close()


def test_report_reads_back_peaks_and_events(tmp_path, capsys):
    _write_run(tmp_path / "run_a", ratios=[0.2, 0.9, 1.4, 1.1], levels=[0, 1, 2, 1])
    _write_run(tmp_path / "run_b", ratios=[0.1, 0.3], levels=[0, 0], text_step=1)

    scalars, events = load_run(tmp_path / "run_a")
    assert "train_loss" not in scalars
    assert [v for _, v in scalars["stability/sharpness/eos_ratio"]] == pytest.approx(
        [0.2, 0.9, 1.4, 1.1]
    )
    assert events == [(7, "warning: eos_ratio 1.4 above 1.2")]
    summary = dict(summarize_scalars("run_a", scalars, events).rows)
    # 1.4 is one reading; 1.1 is the highest level two consecutive readings reach
    assert summary["peak edge-of-stability ratio"] == pytest.approx(1.1)
    assert summary["highest level"] == 2

    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "run_a" in printed and "run_b" in printed
    report_md = (tmp_path / "out" / "run_a" / "report.md").read_text()
    assert "| peak edge-of-stability ratio | 1.1 |" in report_md
    assert "step 7: warning" in report_md
    assert (tmp_path / "out" / "run_a" / "edge_of_stability.png").stat().st_size > 1000
    assert (tmp_path / "out" / "run_a" / "loss.png").exists()


def test_report_on_a_directory_without_runs_fails_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no TensorBoard runs" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_runs(tmp_path / "missing")


def test_a_single_outlier_does_not_set_the_peak():
    # the run: lambda_max 8.5 -> 4227 -> 0.17 on consecutive checks
    assert confirmed_max([8.0, 8.5, 4227.0, 0.17, 7.9]) == pytest.approx(8.5)
    # a level held for two checks is a peak; invalid (NaN) readings are skipped
    assert confirmed_max([0.5, 1.3, float("nan"), 1.2, 0.4]) == pytest.approx(1.2)
    assert math.isnan(confirmed_max([2.0, float("nan")]))
    scalars = {"stability/sharpness/eos_ratio": [(0, 0.4), (1, 194.7), (2, 0.5), (3, 0.45)]}
    summary = dict(summarize_scalars("outlier", scalars).rows)
    assert summary["peak edge-of-stability ratio"] == pytest.approx(0.5)
