"""Calibrating ``EarlyWarning``'s thresholds on the scenario suite by replay.

Every scenario x seed is trained once with the default set and no action (as in
``benchmarks.detection``), recording at which batch each probe reading arrived. The
warning layer (``MetaStateMonitor`` + ``LevelTracker``, the pure-Python core of
``EarlyWarning``) is then replayed on those readings with other thresholds, which costs
milliseconds instead of a training run per setting. With actions off the readings do not
depend on the thresholds, except that WATCH tightens the sharpness probe's cadence; the
replay at the defaults is checked against the live run and the number of runs whose first
warning differs is reported.

Reported per setting: recall, median lead and false alarms as in ``benchmarks.detection``;
the largest deviation on the stable runs; and the largest CUSUM value on the stable runs
with no alarm threshold, which is the margin ``cusum_threshold`` leaves.

    python -m benchmarks.calibration [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from benchmarks.detection import detector_stats
from benchmarks.scenarios.registry import SCENARIOS
from benchmarks.scenarios.runner import RunRecord, run_scenario
from lightning_stability.probes.base import Reading
from lightning_stability.warning.assessment import MetaStateMonitor
from lightning_stability.warning.events import Level
from lightning_stability.warning.levels import LevelTracker

OUT = Path(__file__).with_name("calibration.json")

# (label, MetaStateMonitor kwargs, LevelTracker kwargs); the first is the defaults
SETTINGS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("defaults (cusum 4/8)", {}, {}),
    ("no cusum", {"cusum_threshold": None}, {}),
    ("no cusum, warning_threshold 7", {"cusum_threshold": None, "warning_threshold": 7.0}, {}),
    ("no cusum, warning_threshold 6", {"cusum_threshold": None, "warning_threshold": 6.0}, {}),
    *[
        (f"cusum {d:g}/{h:g}", {"cusum_drift": d, "cusum_threshold": h}, {})
        for d in (2.0, 3.0, 3.5, 4.0, 5.0)
        for h in (4.0, 8.0, 16.0)
        if (d, h) != (4.0, 8.0)
    ],
]


def replay(
    arrivals: Mapping[str, list[tuple[int, int, float]]],
    batches: int,
    monitor_kwargs: dict[str, Any],
    tracker_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The warning layer on recorded readings: the steps of WARNING-or-above events, the
    largest deviation and the largest CUSUM value."""
    monitor = MetaStateMonitor(**monitor_kwargs)
    tracker = LevelTracker(**tracker_kwargs)
    pointer = dict.fromkeys(arrivals, 0)
    current: dict[str, Reading] = {}
    steps: list[int] = []
    max_dev = max_cusum = 0.0
    for batch in range(batches):
        for key, series in arrivals.items():
            while pointer[key] < len(series) and series[pointer[key]][0] <= batch:
                _, step, value = series[pointer[key]]
                current[key] = Reading(value, step)
                pointer[key] += 1
        step = batch + 1  # EarlyWarning runs after the optimizer step
        a = monitor.assess(current, step, tracker.level)
        max_dev = max(max_dev, a.deviation)
        if monitor.cusum is not None:
            max_cusum = max(max_cusum, monitor.cusum.value)
        new = tracker.update(step, a.proposed, a.hold, a.hard)
        if new is not None and new >= Level.WARNING:
            steps.append(step)
    return {"warning_steps": steps, "max_deviation": max_dev, "max_cusum": max_cusum}


def _replayed(run: RunRecord, steps: list[int]) -> RunRecord:
    return dataclasses.replace(run, warning_steps=steps)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed per scenario")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    torch.set_num_threads(1)  # tiny models: see benchmarks.detection

    start = time.perf_counter()
    seeds = range(1 if args.quick else 5)
    runs = [
        run_scenario(s, seed, "warning", keep_history=True)
        for s in SCENARIOS.values()
        for seed in seeds
    ]
    recorded = time.perf_counter() - start

    table = []
    for label, mkw, tkw in SETTINGS:
        replays = [replay(r.arrivals, len(r.losses), mkw, tkw) for r in runs]  # type: ignore[attr-defined]
        stats = detector_stats(
            [_replayed(r, p["warning_steps"]) for r, p in zip(runs, replays)],
            lambda r: r.warning_steps,
        )
        stable = [p for r, p in zip(runs, replays) if r.kind == "stable"]
        table.append(
            {
                "setting": label,
                "monitor": mkw,
                "tracker": tkw,
                **stats,
                "stable_max_deviation": max(p["max_deviation"] for p in stable),
            }
        )

    # the replay at the defaults against the live runs
    defaults = [replay(r.arrivals, len(r.losses), {}, {}) for r in runs]  # type: ignore[attr-defined]
    mismatches = sum(
        (p["warning_steps"][:1] or [None]) != (r.warning_steps[:1] or [None])
        for r, p in zip(runs, defaults)
    )
    # the CUSUM's own margin: its largest value on stable runs with no alarm threshold
    margin = [
        replay(r.arrivals, len(r.losses), {"cusum_threshold": math.inf}, {})["max_cusum"]  # type: ignore[attr-defined]
        for r in runs
        if r.kind == "stable"
    ]
    payload = {
        "command": "python -m benchmarks.calibration" + (" --quick" if args.quick else ""),
        "seeds": len(seeds),
        "runs": len(runs),
        "recording_s": recorded,
        "replay_first_warning_mismatches": mismatches,
        "stable_max_cusum_unthresholded": max(margin),
        "table": table,
    }
    OUT.write_text(json.dumps(payload, indent=2))
    print(
        f"{len(runs)} runs recorded in {recorded:.0f} s; replay at the defaults differs from the live run's first warning in {mismatches}"
    )
    print(f"largest CUSUM (drift 4, no threshold) on stable runs: {max(margin):.2f}")
    print("| setting | recall | median lead | false alarms | before onset | stable max deviation |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(
            f"| {row['setting']} | {row['recall']:.3g} | {row['median_lead']} | "
            f"{row['false_alarms']}/{row['stable_runs']} | {row['early_false_alarms']}/"
            f"{row['diverging_runs']} | {row['stable_max_deviation']:.2f} |"
        )
    print(f"wrote {OUT}")
    return payload


if __name__ == "__main__":
    main()
