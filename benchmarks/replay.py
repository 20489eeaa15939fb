"""Replay the early warning offline on recorded runs: what a change to the warning layer
does to the healthy corpus (calibration and validation halves, reported apart) and to the
scenario suite, in seconds instead of the hour the full benchmarks take.

    python -m benchmarks.replay record            # every corpus and suite run, once
    python -m benchmarks.replay evaluate          # seconds
    python -m benchmarks.replay evaluate --factory mymodule:make_warning

``record`` trains every healthy configuration (3 seeds) and every scenario (5 seeds) once
with the warning set (probes and ``EarlyWarning``, no actions) and keeps, for each batch,
the loss, the optimizer step, the epoch boundaries and the probe readings as
``EarlyWarning`` saw them (JSON files in ``benchmarks/.replay/``, not tracked).
``evaluate`` feeds them through a fresh ``EarlyWarning`` (or the one ``--factory``
builds) and reports WARNING-or-above runs and WATCH events per 1000 steps on each half of
the corpus, false alarms on the suite's stable runs, and recall and lead on its diverging
runs by the rules of ``benchmarks.detection``.

Limits: the readings are those of the recorded runs. A warning layer that asks for closer
measurement at other steps would have seen other curvature readings, and nothing here acts
on a run; ``benchmarks.healthy`` and ``benchmarks.detection`` remain the measure. Replaying
the configuration that was recorded reproduces its events exactly (``tests/test_replay.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
CACHE = HERE / ".replay"
HEALTHY_SEEDS = 3
SCENARIO_SEEDS = 5

__all__ = ["evaluate", "record_run", "replay"]


def record_run(kind: str, name: str, seed: int) -> dict[str, Any]:
    """Train one healthy configuration (``kind="healthy"``) or scenario
    (``kind="scenario"``) in warning mode and return what its ``EarlyWarning`` saw."""
    from benchmarks.scenarios.healthy import HEALTHY
    from benchmarks.scenarios.registry import SCENARIOS
    from benchmarks.scenarios.runner import run_scenario

    scenario = (HEALTHY if kind == "healthy" else SCENARIOS)[name]
    rec = run_scenario(scenario, seed, "warning", keep_history=True)
    return {
        "kind": kind,
        "name": name,
        "seed": seed,
        "split": scenario.split,
        "scenario_kind": scenario.kind,
        "onset": scenario.onset,
        "gradual": scenario.gradual,
        "divergence_step": rec.divergence_step,
        "losses": rec.losses,
        "steps": rec.steps,  # type: ignore[attr-defined]
        "epoch_starts": rec.epoch_starts,  # type: ignore[attr-defined]
        "arrivals": rec.arrivals,  # type: ignore[attr-defined]
        "events": [(e["step"], e["level"]) for e in rec.events if e["source"] == "early_warning"],
    }


def replay(run: dict[str, Any], warning: Any) -> list[tuple[int, str]]:
    """``(step, level name)`` of every event ``warning`` (a fresh ``EarlyWarning``) raises
    on the recorded run, evaluated once per optimizer step as in training."""
    from lightning_stability.probes.base import Reading

    arriving: dict[int, list[tuple[str, int, float]]] = defaultdict(list)
    for key, series in run["arrivals"].items():
        for batch, step, value in series:
            arriving[int(batch)].append((key, int(step), float(value)))
    epoch_starts = set(run["epoch_starts"])
    latest: dict[str, Any] = {}
    events: list[tuple[int, str]] = []
    last_step = None
    for batch, step in enumerate(run["steps"]):
        if batch in epoch_starts:
            warning.monitor.band.new_epoch()
        for key, at, value in arriving.get(batch, ()):
            latest[key] = Reading(value, at)
        if step == last_step:
            continue  # an accumulating micro-batch: no optimizer step yet
        last_step = step
        a = warning.monitor.assess(dict(latest), step, warning.tracker.level)
        new = warning.tracker.update(step, a.proposed, a.hold, a.hard, a.ruled, a.worse)
        if new is not None:
            warning.monitor.issued()
            events.append((step, new.name))
    return events


def _first_warning(events: Iterable[tuple[int, str]], onset: int) -> int | None:
    """The loss index of the first WARNING-or-above at or after ``onset`` (an event at
    step ``s`` was raised at the end of the batch with loss index ``s - 1``)."""
    return next(
        (s - 1 for s, level in events if level in ("WARNING", "CRITICAL") and s - 1 >= onset),
        None,
    )


def evaluate(runs: Iterable[dict[str, Any]], factory: Callable[[], Any]) -> dict[str, Any]:
    """Replay every run through ``factory()`` and summarise as described above."""
    healthy: dict[str, dict[str, float]] = defaultdict(
        lambda: {"runs": 0, "warned": 0, "watch": 0, "steps": 0}
    )
    stable_alarms = stable_runs = 0
    detected: list[dict[str, Any]] = []
    for run in runs:
        events = replay(run, factory())
        if run["kind"] == "healthy":
            half = healthy[run["split"]]
            half["runs"] += 1
            half["warned"] += any(level in ("WARNING", "CRITICAL") for _, level in events)
            half["watch"] += sum(level == "WATCH" for _, level in events)
            half["steps"] += len(run["losses"])
        elif run["scenario_kind"] == "stable":
            stable_runs += 1
            stable_alarms += _first_warning(events, 0) is not None
        else:
            first = _first_warning(events, run["onset"])
            div = run["divergence_step"]
            hit = first is not None and div is not None and first <= div
            detected.append(
                {"name": run["name"], "seed": run["seed"], "gradual": run["gradual"],
                 "first": first, "divergence": div, "lead": div - first if hit else None}
            )  # fmt: skip

    def rate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        leads = [r["lead"] for r in rows if r["lead"] is not None]
        return {
            "runs": len(rows),
            "recall": len(leads) / len(rows) if rows else float("nan"),
            "median_lead": statistics.median(leads) if leads else None,
        }

    return {
        "healthy": {
            split: {
                "runs": int(h["runs"]),
                "runs_with_warning": int(h["warned"]),
                "watch_per_1000_steps": 1000 * h["watch"] / h["steps"] if h["steps"] else 0.0,
            }
            for split, h in sorted(healthy.items())
        },
        "stable_false_alarms": f"{stable_alarms} / {stable_runs}",
        "diverging": rate(detected),
        "gradual": rate([r for r in detected if r["gradual"]]),
        "missed": [(r["name"], r["seed"]) for r in detected if r["lead"] is None],
    }


def _record_task(task: tuple[str, str, int]) -> str:
    kind, name, seed = task
    path = CACHE / f"{kind}__{name}__{seed}.json"
    if not path.exists():
        path.write_text(json.dumps(record_run(kind, name, seed)))
    return path.name


def _init_worker() -> None:
    from benchmarks.healthy import _init_worker as init

    init()


def _factory(spec: str) -> Callable[[], Any]:
    if not spec:
        from lightning_stability.warning import EarlyWarning

        return EarlyWarning
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("record", "evaluate"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--factory", default="", help="module:function returning a fresh EarlyWarning"
    )
    args = parser.parse_args(argv)
    if args.command == "record":
        from benchmarks.scenarios.healthy import HEALTHY
        from benchmarks.scenarios.registry import SCENARIOS

        CACHE.mkdir(exist_ok=True)
        tasks = [("healthy", n, s) for n in HEALTHY for s in range(HEALTHY_SEEDS)]
        tasks += [("scenario", n, s) for n in SCENARIOS for s in range(SCENARIO_SEEDS)]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.workers, initializer=_init_worker) as pool:
            for i, name in enumerate(pool.imap_unordered(_record_task, tasks), 1):
                print(f"[{i:3d}/{len(tasks)}] {name}", flush=True)
        return None
    runs = [json.loads(p.read_text()) for p in sorted(CACHE.glob("*.json"))]
    if not runs:
        parser.error(f"no recorded runs in {CACHE}: run `python -m benchmarks.replay record`")
    summary = evaluate(runs, _factory(args.factory))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
