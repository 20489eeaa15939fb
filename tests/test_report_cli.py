"""`lightning-stability report LOGDIR` reads event files back and tells each run's story."""

import math
from pathlib import Path

import pytest
import torch
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from test_dashboard import nan_batch_run
from torch.utils.tensorboard import SummaryWriter

from lightning_stability.cli import main
from lightning_stability.report import (
    TimelineEntry,
    confirmed_max,
    find_runs,
    format_entries,
    load_run,
    render_markdown,
    summarize,
)
from lightning_stability.tensorboard import TIMELINE

SNAPSHOT = Path(__file__).parent / "snapshots" / "report_scripted.md"


def _write_run(path, ratios, levels, events=(), loss=None):
    """A run as the dashboard writes it: readings, the timeline and its text entries."""
    writer = SummaryWriter(str(path))
    for step, (r, lv) in enumerate(zip(ratios, levels)):
        writer.add_scalar("stability/sharpness/eos_ratio", r, step)
        writer.add_scalar(TIMELINE.LEVEL, lv, step)
        writer.add_scalar("train_loss", loss[step] if loss else 1.0 / (step + 1), step)
        writer.add_scalar("other/metric", 0.5, step)  # not ours: must be ignored
    by_step = {}
    for entry in events:
        by_step.setdefault(entry.step, []).append(entry)
    for step, entries in by_step.items():
        writer.add_text(TIMELINE.TEXT, format_entries(entries), step)
    writer.add_text(
        TIMELINE.SETUP,
        "**Stability callbacks attached**: SharpnessMonitor, EarlyWarning, LRBackoff\n\n"
        "**Training loss tag**: `train_loss`",
        0,
    )
    writer.close()


SCRIPTED = [
    # written in the order an action may be recorded before its cause: the report orders
    TimelineEntry(5, "lr_backoff", 2, "learning rate backed off to 0.5x (WARNING event)"),
    TimelineEntry(5, "early_warning", 2, "warning at step 6 (deviation 3.1): eos_ratio 1.4"),
    TimelineEntry(9, "early_warning", 0, "ok at step 10 (deviation 0.2)"),
]


def test_report_reads_back_the_timeline_peaks_and_order(tmp_path, capsys):
    ratios = [0.2, 0.5, 0.9, 1.2, 1.3, 1.4, 1.1, 0.8, 0.6, 0.5, 0.5, 0.4]
    levels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 0, 0]
    loss = [2.0, 1.5, 1.0, 0.8, 0.9, 1.6, 1.2, 0.9, 0.7, 0.6, 0.55, 0.5]
    _write_run(tmp_path / "run_a", ratios, levels, SCRIPTED, loss)
    _write_run(tmp_path / "run_b", [0.1, 0.3, 0.2], [0, 0, 0])

    log = load_run(tmp_path / "run_a")
    assert "other/metric" not in log.scalars and log.loss_tag == "train_loss"
    assert log.attached == ["SharpnessMonitor", "EarlyWarning", "LRBackoff"]
    # causes before the actions of the same step
    assert [(e.step, e.source) for e in log.events] == [
        (5, "early_warning"),
        (5, "lr_backoff"),
        (9, "early_warning"),
    ]
    summary = summarize("run_a", log)
    # 1.4 is one reading; 1.3 is the highest level two consecutive readings reach
    assert summary.values["peak edge-of-stability ratio"] == pytest.approx(1.3)
    assert summary.highest_level == 2 and summary.healthy is False
    assert summary.headline.startswith("Unstable from step 5 (highest level warning)")
    assert "learning rate backed off 1 time (step 5)" in summary.headline
    assert "Result: recovered" in summary.headline
    assert any(
        a.startswith("Learning rate: the edge-of-stability ratio reached 1.3")
        for a in summary.advice
    )
    assert dict(summary.monitored)["gradients"] == "not monitored"

    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out"), "--plain"]) == 0
    printed = capsys.readouterr().out
    assert "Stability summary: run_a" in printed and "Stability summary: run_b" in printed
    report_md = (tmp_path / "out" / "run_a" / "report.md").read_text()
    # the snapshot of what a reader opens (regenerate by deleting the file)
    if not SNAPSHOT.exists():
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(report_md)
    assert report_md == SNAPSHOT.read_text()
    for name in ("loss", "edge_ratio", "level"):
        assert (tmp_path / "out" / "run_a" / f"{name}.png").stat().st_size > 5000
    healthy = (tmp_path / "out" / "run_b" / "report.md").read_text()
    assert "(healthy)" in healthy and "Healthy: the warning level stayed at ok" in healthy


def test_report_of_a_run_with_a_rollback(tmp_path, capsys):
    nan_batch_run(tmp_path, "with_callbacks")
    # the same run without callbacks, under the same loss tag
    data = classification_data(n=320)
    x, y = data.tensors
    x = x.clone()
    x[7 * 32 : 8 * 32] = float("nan")
    t = trainer(max_steps=10, log_every_n_steps=1, logger=TensorBoardLogger(tmp_path, "without"))
    t.fit(TinyClassifier(), loader(torch.utils.data.TensorDataset(x, y), shuffle=False))

    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "(unstable)" in printed and "(not monitored)" in printed

    out = tmp_path / "out" / "with_callbacks__version_0"
    md = (out / "report.md").read_text()
    headline = md.splitlines()[2]
    assert headline.startswith("Unstable from step 7 (highest level critical)")
    assert "rolled back 1 time (step 7)" in headline and "Result: recovered" in headline
    happened = md.split("## What happened")[1].split("##")[0].splitlines()
    order = [line.split(":")[1].strip() for line in happened if line.strip().startswith("- step")]
    assert order[:3] == ["**critical**", "*lr_backoff*", "*rollback*"]
    assert "| highest level | critical |" in md
    assert "Non-finite values at step 7" in md
    for name in ("loss", "level", "learning_rate", "gradients", "meta_state"):
        assert f"![{name.replace('_', ' ')}]({name}.png)" in md
        assert (out / f"{name}.png").stat().st_size > 5000

    bare = (tmp_path / "out" / "without__version_0" / "report.md").read_text()
    assert "Not monitored: no stability callback watched this run" in bare
    assert "diverged unobserved" in bare and "No warnings" not in bare


def test_report_on_a_directory_without_runs_fails_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no TensorBoard runs" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_runs(tmp_path / "missing")


def test_logs_from_before_the_timeline_still_read(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("stability/meta/level", 3, 4)
    writer.add_text("stability/events", "critical at step 5 (deviation 2.0): loss nan", 4)
    writer.add_text("stability/actions", "**rollback**: rolled back to step 2", 4)
    writer.close()
    summary = summarize("old", load_run(tmp_path))
    assert summary.highest_level == 3
    assert [e.source for e in summary.causes] == ["early_warning", "rollback"]
    assert "rolled back 1 time" in render_markdown(summary)


def test_a_single_outlier_does_not_set_the_peak():
    # the run: lambda_max 8.5 -> 4227 -> 0.17 on consecutive checks
    assert confirmed_max([8.0, 8.5, 4227.0, 0.17, 7.9]) == pytest.approx(8.5)
    # a level held for two checks is a peak; invalid (NaN) readings are skipped
    assert confirmed_max([0.5, 1.3, float("nan"), 1.2, 0.4]) == pytest.approx(1.2)
    assert math.isnan(confirmed_max([2.0, float("nan")]))
    from lightning_stability.report import RunLog

    scalars = {"stability/sharpness/eos_ratio": [(0, 0.4), (1, 194.7), (2, 0.5), (3, 0.45)]}
    summary = summarize("outlier", RunLog(scalars=scalars))
    assert summary.values["peak edge-of-stability ratio"] == pytest.approx(0.5)


def test_figures_have_titles_labels_log_scales_thresholds_and_events(tmp_path, monkeypatch):
    import matplotlib.figure

    from lightning_stability.report import RunLog, write_figures

    drawn = {}

    def capture(fig, path, **kwargs):
        (ax,) = fig.axes
        drawn[Path(path).stem] = ax
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    steps = range(10)
    log = RunLog(
        scalars={
            "train_loss": [(s, 2.0 - 0.1 * s) for s in steps],
            "stability/sharpness/eos_ratio": [(s, 0.01 * 2.0**s) for s in steps],
            TIMELINE.LEVEL: [(s, 3.0 if s == 5 else 0.0) for s in steps],
        },
        events=[
            TimelineEntry(5, "early_warning", 3, "critical"),
            TimelineEntry(5, "rollback", 3, "rolled back to step 2"),
        ],
        loss_tag="train_loss",
    )
    written = write_figures(log, tmp_path)
    assert [p.stem for p in written] == ["loss", "edge_ratio", "level"]
    for name, ax in drawn.items():
        assert ax.get_title() and ax.get_xlabel() == "optimizer step" and ax.get_ylabel(), name
        labels = ax.get_legend_handles_labels()[1]
        assert "level -> critical" in labels and "action: rollback" in labels, name
    assert drawn["edge_ratio"].get_yscale() == "log"  # 0.01 to 5: decades
    assert drawn["loss"].get_yscale() == "linear"
    assert "edge (1)" in drawn["edge_ratio"].get_legend_handles_labels()[1]
    ticks = [t.get_text() for t in drawn["level"].get_yticklabels()]
    assert ticks == ["ok", "watch", "warning", "critical"]
