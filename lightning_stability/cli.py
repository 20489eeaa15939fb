"""``lightning-stability`` command line: ``lightning-stability report LOGDIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_stability.report import (
    LEVEL_NAMES,
    RunSummary,
    describe,
    find_runs,
    format_row,
    load_run,
    render_markdown,
    render_text,
    summarize,
    write_figures,
)

_VERDICT = {
    True: ("healthy", "green"),
    False: ("unstable", "red"),
    None: ("not monitored", "yellow"),
}
_LEVEL_STYLE = ("green", "yellow", "dark_orange", "bold red")


def _print_rich(summary: RunSummary, files: str) -> bool:
    """The report for a terminal, with rich; False when rich is not installed."""
    try:
        from rich.console import Console, Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        return False
    verdict, colour = _VERDICT[summary.healthy]
    parts: list = [Text(summary.headline)]
    monitored = Table(show_header=False, box=None, padding=(0, 1))
    for aspect, status in summary.monitored:
        monitored.add_row(aspect, Text(status, style="dim" if status == "not monitored" else ""))
    parts += [Text("\nMonitored", style="bold"), monitored]
    if summary.causes:
        timeline = Table(show_header=True, box=None, padding=(0, 1))
        timeline.add_column("step", justify="right")
        timeline.add_column("what")
        for e in summary.causes:
            if e.is_cause:
                level = LEVEL_NAMES[e.level]
                what = Text(f"{level.upper()}: ", style=_LEVEL_STYLE[e.level]) + Text(
                    describe(e, 400)
                )
            else:
                what = Text(f"  -> {e.source}: ", style="cyan") + Text(describe(e, 400))
            timeline.add_row(str(e.step), what)
        parts += [
            Text("\nWhat happened (causes, then the actions they triggered)", "bold"),
            timeline,
        ]
    if summary.rows:
        readings = Table(show_header=False, box=None, padding=(0, 1))
        readings.add_column(justify="left")
        readings.add_column(justify="right")
        for label, value in summary.rows:
            readings.add_row(label, format_row(label, value))
        parts += [Text("\nReadings", style="bold"), readings]
    if summary.advice:
        parts.append(Text("\nAdvice for the next run", style="bold"))
        parts += [Text(f"- {a}") for a in summary.advice]
    parts.append(Text(f"\n{files}", style="dim"))
    title = f"Stability report: {summary.name} ({verdict})"
    Console().print(Panel(Group(*parts), title=title, border_style=colour, title_align="left"))
    return True


def report(logdir: str, out: str | None = None, plain: bool = False) -> int:
    """Report on every run under ``logdir``: print it (rich in a terminal when installed,
    else plain text), and write ``report.md`` and its figures into ``out`` (default
    ``<logdir>/stability_report/<run>``)."""
    root = Path(logdir)
    runs = find_runs(root)
    out_root = Path(out) if out else root / "stability_report"
    for run in runs:
        name = str(run.relative_to(root)) if run != root else root.name
        log = load_run(run)
        summary = summarize(name, log)
        target = out_root / name.replace("/", "__")
        target.mkdir(parents=True, exist_ok=True)
        try:
            figures = write_figures(log, target)
        except ImportError:
            figures = []
        (target / "report.md").write_text(render_markdown(summary, figures))
        files = f"wrote {target / 'report.md'} and {len(figures)} figures"
        if not figures:
            files += " (install matplotlib for figures)"
        if plain or not _print_rich(summary, files):
            print(render_text(summary))
            print(files + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-stability", description="Stability reports from TensorBoard logs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="tell the story of each run under LOGDIR")
    rep.add_argument("logdir", metavar="LOGDIR")
    rep.add_argument("--out", default=None, help="output folder (default LOGDIR/stability_report)")
    rep.add_argument("--plain", action="store_true", help="plain text, without rich")
    args = parser.parse_args(argv)
    try:
        return report(args.logdir, args.out, plain=args.plain)
    except FileNotFoundError as err:
        print(f"lightning-stability: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
