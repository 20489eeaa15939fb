"""Stability summaries: built from TensorBoard event files (``lightning-stability report``)
or from the live callbacks at the end of ``fit``, and rendered as a table, markdown and
PNG plots."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RunSummary",
    "confirmed_max",
    "find_runs",
    "load_run",
    "render_markdown",
    "render_table",
    "summarize_scalars",
    "write_plots",
]

LEVEL_NAMES = ("ok", "watch", "warning", "critical")

# (label, tag, reduction) for the peak/last rows of a summary. Curvature peaks are
# "confirmed" maxima (see ``confirmed_max``): a single outlying check must not set them.
SUMMARY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("peak edge-of-stability ratio", "stability/sharpness/eos_ratio", "confirmed_max"),
    ("peak lambda_max", "stability/sharpness/lambda_max", "confirmed_max"),
    ("peak directional ratio", "stability/sharpness/directional_ratio", "confirmed_max"),
    ("peak gradient norm", "stability/grad/norm", "max"),
    ("mean clip rate", "stability/grad/clip_rate", "mean"),
    ("peak batch loss", "stability/loss/tail_max", "max"),
    ("lowest CKA to previous check", "stability/cka/min", "min"),
    ("peak meta-state deviation", "stability/meta/deviation", "max"),
    ("highest level", "stability/meta/level", "max"),
    ("final learning-rate scale", "stability/action/lr_scale", "last"),
    ("highest stage", "stability/action/stage", "max"),
    ("lowest audit LR margin", "stability/audit/optimisation/lr_margin", "min"),
)


@dataclass
class RunSummary:
    """What a run's stability looked like.

    Attributes:
        name: the run's name (its directory relative to the log root, or "live").
        rows: ``(label, value)`` pairs for the readings that were present.
        events: ``(step, text)`` pairs: warnings and actions in order.
        seconds_in_callbacks: wall time spent in each stability callback (live runs only).
    """

    name: str
    rows: list[tuple[str, float]] = field(default_factory=list)
    events: list[tuple[int, str]] = field(default_factory=list)
    seconds_in_callbacks: dict[str, float] = field(default_factory=dict)


def confirmed_max(values: Iterable[float]) -> float:
    """The largest level that two consecutive valid readings both reach:
    ``max_i min(v_i, v_{i+1})`` over the finite readings in order (NaN readings, which
    are invalid, are dropped first, so a confirmation may span one).

    A reading on its own never sets the peak: an outlier between two ordinary readings
    (lambda_max 8.5, 4227, 0.17) contributes only the ordinary level, while a run that
    really sits at a level for two checks reports it. NaN with fewer than two readings.
    """
    finite = [float(v) for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return math.nan
    return max(min(a, b) for a, b in itertools.pairwise(finite))


def _reduce(values: list[float], how: str) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if how == "last":
        return values[-1]
    if how == "confirmed_max":
        return confirmed_max(values)
    if not finite:
        return math.nan
    if how == "max":
        return max(finite)
    if how == "min":
        return min(finite)
    return sum(finite) / len(finite)


def summarize_scalars(
    name: str,
    scalars: Mapping[str, list[tuple[int, float]]],
    events: Iterable[tuple[int, str]] = (),
) -> RunSummary:
    """A :class:`RunSummary` from scalar series ``tag -> [(step, value), ...]``."""
    rows = [
        (label, _reduce([v for _, v in scalars[tag]], how))
        for label, tag, how in SUMMARY_ROWS
        if scalars.get(tag)
    ]
    return RunSummary(name=name, rows=rows, events=sorted(events))


def find_runs(logdir: str | os.PathLike) -> list[Path]:
    """Directories under ``logdir`` that hold TensorBoard event files, sorted.

    Raises:
        FileNotFoundError: ``logdir`` does not exist or holds no event files.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"LOGDIR {str(root)!r} is not a directory")
    runs = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    if not runs:
        raise FileNotFoundError(
            f"no TensorBoard runs under {str(root)!r}: no events.out.tfevents.* files found"
        )
    return runs


def load_run(
    run_dir: str | os.PathLike,
) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, str]]]:
    """Read a run's ``stability/`` scalars and text events back from its event files."""
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    acc = EventAccumulator(str(run_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    tags = acc.Tags()
    scalars = {
        tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)]
        for tag in tags.get("scalars", [])
        if tag.startswith("stability/")
    }
    events: list[tuple[int, str]] = []
    for tag in tags.get("tensors", []):
        if not tag.startswith("stability/") or tag.startswith("stability/summary"):
            continue  # the end-of-run summary is not an event
        for e in acc.Tensors(tag):
            values = e.tensor_proto.string_val
            if values:
                events.append((e.step, values[0].decode("utf-8", errors="replace")))
    return scalars, events


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def render_table(summary: RunSummary) -> str:
    """The summary as a plain-text table (what the CLI and ``fit`` print; rich renders it
    with colour when available)."""
    width = max([len(label) for label, _ in summary.rows] + [20])
    lines = [f"Stability summary: {summary.name}", "-" * (width + 14)]
    lines += [f"{label:<{width}}  {_fmt(value):>10}" for label, value in summary.rows]
    if summary.seconds_in_callbacks:
        lines.append("-" * (width + 14))
        lines += [
            f"{'time in ' + name:<{width}}  {secs:>9.2f}s"
            for name, secs in summary.seconds_in_callbacks.items()
        ]
    lines.append("-" * (width + 14))
    if summary.events:
        lines.append(f"{len(summary.events)} events:")
        lines += [f"  step {step:>7}: {text.splitlines()[0]}" for step, text in summary.events]
    else:
        lines.append("no warnings, no actions")
    return "\n".join(lines)


def print_summary(summary: RunSummary) -> None:
    """Print with rich if it is installed, else as plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional
        print(render_table(summary))
        return
    table = Table(title=f"Stability summary: {summary.name}")
    table.add_column("reading")
    table.add_column("value", justify="right")
    for label, value in summary.rows:
        table.add_row(label, _fmt(value))
    for name, secs in summary.seconds_in_callbacks.items():
        table.add_row(f"time in {name}", f"{secs:.2f} s")
    console = Console()
    console.print(table)
    if summary.events:
        events = Table(title="Events")
        events.add_column("step", justify="right")
        events.add_column("what")
        for step, text in summary.events:
            events.add_row(str(step), text.splitlines()[0])
        console.print(events)
    else:
        console.print("no warnings, no actions")


def render_markdown(summary: RunSummary, plots: Iterable[Path] = ()) -> str:
    """The summary as a markdown report."""
    lines = [f"# Stability report: {summary.name}", "", "| reading | value |", "|---|---:|"]
    lines += [f"| {label} | {_fmt(value)} |" for label, value in summary.rows]
    lines += ["", "## Events", ""]
    if summary.events:
        lines += [f"- step {step}: {text.splitlines()[0]}" for step, text in summary.events]
    else:
        lines.append("No warnings, no actions.")
    plots = list(plots)
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


PLOTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("stability/loss/value", "stability/loss/tail_max")),
    (
        "edge_of_stability",
        ("stability/sharpness/eos_ratio", "stability/sharpness/directional_ratio"),
    ),
    ("gradients", ("stability/grad/norm", "stability/grad/clip_threshold")),
    ("meta_state", ("stability/meta/deviation", "stability/meta/level")),
)


def write_plots(
    scalars: Mapping[str, list[tuple[int, float]]],
    events: Iterable[tuple[int, str]],
    outdir: str | os.PathLike,
) -> list[Path]:
    """One PNG per group of readings that the run has, with events as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    event_steps = sorted({step for step, _ in events})
    written = []
    for name, tags in PLOTS:
        present = [t for t in tags if scalars.get(t)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for tag in present:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, label=tag.removeprefix("stability/"), lw=1)
        for step in event_steps:
            ax.axvline(step, color="tab:red", alpha=0.35, lw=0.8)
        if name == "edge_of_stability":
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
