"""``lightning-stability`` command line: ``lightning-stability report LOGDIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_stability.report import (
    find_runs,
    load_run,
    print_summary,
    render_markdown,
    summarize_scalars,
    write_plots,
)


def report(logdir: str, out: str | None = None) -> int:
    """Summarise every run under ``logdir``: print a table, write ``report.md`` and PNG plots
    into ``out`` (default ``<logdir>/stability_report``)."""
    root = Path(logdir)
    runs = find_runs(root)
    out_root = Path(out) if out else root / "stability_report"
    for run in runs:
        name = str(run.relative_to(root)) if run != root else root.name
        scalars, events = load_run(run)
        summary = summarize_scalars(name, scalars, events)
        print_summary(summary)
        target = out_root / name.replace("/", "__")
        plots = write_plots(scalars, events, target)
        (target / "report.md").write_text(render_markdown(summary, plots))
        print(f"wrote {target / 'report.md'} and {len(plots)} plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-stability", description="Stability reports from TensorBoard logs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="summarise the runs under LOGDIR")
    rep.add_argument("logdir", metavar="LOGDIR")
    rep.add_argument("--out", default=None, help="output folder (default LOGDIR/stability_report)")
    args = parser.parse_args(argv)
    try:
        return report(args.logdir, args.out)
    except FileNotFoundError as err:
        print(f"lightning-stability: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
