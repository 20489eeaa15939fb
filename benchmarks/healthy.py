"""False alarms on the healthy-run corpus: does the warning layer stay quiet, and do the
actions stay idle, on training runs that a careful practitioner would call healthy?

The corpus (:mod:`benchmarks.scenarios.healthy`) holds 18 configurations spanning model
families (MLP, CNN with and without BatchNorm, residual MLP with LayerNorm, transformer and
GRU char-LMs, an LSTM), optimizers (SGD plain, momentum and Nesterov, Adam, AdamW, RMSprop,
Adagrad), schedules (constant, warm-up + cosine, step decay, OneCycle, ReduceLROnPlateau,
CyclicLR) and regimes (tiny batches, full-batch GD at the edge of stability, zero and
large weight decay, fine-tuning with a frozen backbone, a curriculum, label smoothing,
bf16 autocast, gradient accumulation, gradient clipping, and two runs of 20,000 steps at
their noise floor). Every configuration trains bare without diverging.

It is split by configuration into two halves, each mixing families, optimizers and
schedules: ``calibration`` (defaults may be tuned on it) and ``validation`` (only
reported; a default tuned on calibration is judged here). The two halves are reported
separately.

Every configuration x seed is trained in five modes (:mod:`benchmarks.scenarios.runner`):
``bare`` (nothing of ours), ``warning`` (``stability_callbacks()``, actions off),
``actions`` (``actions="backoff"``), ``staged`` (``actions="staged"``) and ``guard``
(``lr_guard=True``, actions off: the learning-rate guard alone).

Targets, on both halves:
    * no event at WARNING or above (0 runs, 0 events);
    * at most 1 WATCH event per 1000 steps on average;
    * no action fires, so the weights at the end are bit-identical to the bare run's.

    python -m benchmarks.healthy --quick     # short configs, 1 seed, bare+warning (minutes)
    python -m benchmarks.healthy             # everything: 3 seeds x 5 modes (tens of minutes)
    python -m benchmarks.healthy --only eos_fullbatch_digits --modes bare,warning --seeds 1

Writes ``benchmarks/healthy.json`` (summary and one row per run) and the section between
``<!-- healthy:begin -->`` and ``<!-- healthy:end -->`` of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from benchmarks import results_md

HERE = Path(__file__).parent
OUT_JSON = HERE / "healthy.json"
OUT_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- healthy:begin -->", "<!-- healthy:end -->"
MODES = ("bare", "warning", "actions", "staged", "guard")
MONITORED = ("warning", "actions", "staged", "guard")
ACTING = ("actions", "staged", "guard")
SPLITS = ("calibration", "validation")
LEVELS = ("WATCH", "WARNING", "CRITICAL")
WARNING_PLUS = ("WARNING", "CRITICAL")
QUICK_MAX_STEPS = 5000
FIRST = 5  # events and messages kept per run

__all__ = ["main", "run_one", "summarise"]


def _quiet() -> None:
    import lightning.pytorch  # noqa: F401  (importing it resets its loggers' levels)

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _init_worker() -> None:
    import torch

    # the models are tiny: a second thread per worker only contends for the cores
    torch.set_num_threads(1)
    _quiet()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def run_one(task: tuple[str, int, str, int]) -> dict[str, Any]:
    """Train one ``(configuration, seed, mode, max_steps)`` and return its compact row (no
    per-step histories); a run that raises returns a row with ``error`` set."""
    name, seed, mode, max_steps = task
    from benchmarks.scenarios.healthy import HEALTHY
    from benchmarks.scenarios.runner import run_scenario, stability_set

    scenario = HEALTHY[name]
    row: dict[str, Any] = {
        "config": name,
        "split": scenario.split,
        "seed": seed,
        "mode": mode,
        "max_steps": max_steps,
    }
    attached: list[Any] = []

    def factory(mode_: str, scenario_: Any):
        callbacks, missing = stability_set(mode_, scenario_)
        attached.extend(callbacks)
        return callbacks, missing

    try:
        rec = run_scenario(scenario, seed, mode, callbacks_factory=factory)
    except Exception as err:  # one broken run must not hide the others' results
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=5)
        return row

    warning_events = [e for e in rec.events if e["source"] == "early_warning"]
    # actions keep their own event lists; the early warning's listeners may not see them
    action_events = {
        (e["source"], e["step"], e["message"]): e
        for e in rec.events
        if e["source"] not in ("early_warning", "")
    }
    for cb in attached:
        if hasattr(cb, "source_name"):
            for ev in getattr(cb, "events", ()):
                key = (str(ev.source), int(ev.step), str(ev.message))
                action_events.setdefault(
                    key,
                    {
                        "level": ev.level.name,
                        "step": int(ev.step),
                        "message": str(ev.message),
                        "source": str(ev.source),
                    },
                )
    actions = sorted(action_events.values(), key=lambda e: e["step"])
    counts = {lvl: sum(e["level"] == lvl for e in warning_events) for lvl in LEVELS}
    loud = [e for e in warning_events if e["level"] in WARNING_PLUS]
    finite = [x for x in rec.losses if math.isfinite(x)]
    row.update(
        {
            "steps_done": rec.steps_done,
            "reached_max_steps": rec.steps_done >= max_steps,
            "events_by_level": counts,
            "warning_plus": [
                {"step": e["step"], "level": e["level"], "message": e["message"]}
                for e in loud[:FIRST]
            ],
            "watch": [
                {"step": e["step"], "message": e["message"]}
                for e in warning_events
                if e["level"] == "WATCH"
            ][:FIRST],
            "action_events": len(actions),
            "action_messages": [
                f"[{e['source']}] step {e['step']}: {e['message']}" for e in actions[:FIRST]
            ],
            "first_warning_step": rec.first_warning_step,
            "watch_per_1000": 1000 * counts["WATCH"] / max(1, rec.steps_done),
            "start_loss": statistics.median(rec.losses[:5]) if rec.losses else math.nan,
            "final_train_loss": _mean(finite[-50:]),
            "final_val_loss": rec.final_val_loss,
            "non_finite_losses": len(rec.losses) - len(finite),
            "divergence_step": rec.divergence_step,
            "wall_s": rec.wall_s,
            "weights_digest": rec.weights_digest,
            "callbacks": rec.callbacks,
            "missing": rec.missing,
        }
    )
    return row


def _attach_identity(rows: list[dict[str, Any]]) -> None:
    bare = {(r["config"], r["seed"]): r.get("weights_digest") for r in rows if r["mode"] == "bare"}
    for r in rows:
        if r["mode"] == "bare" or "error" in r:
            continue
        ref = bare.get((r["config"], r["seed"]))
        r["bit_identical_to_bare"] = None if ref is None else r["weights_digest"] == ref


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over ``rows``: monitored runs (warning, actions, staged modes), their
    WARNING+ and CRITICAL events, mean WATCH per 1000 steps, acting runs where an action
    fired, bit-identity with bare, and bare runs that diverged (the corpus's own check)."""
    ok = [r for r in rows if "error" not in r]
    mon = [r for r in ok if r["mode"] in MONITORED]
    acting = [r for r in ok if r["mode"] in ACTING]
    bare = [r for r in ok if r["mode"] == "bare"]
    compared = [r for r in mon if r.get("bit_identical_to_bare") is not None]
    loud = sum(r["events_by_level"]["WARNING"] + r["events_by_level"]["CRITICAL"] for r in mon)
    return {
        "runs": len(ok),
        "monitored_runs": len(mon),
        "errors": len(rows) - len(ok),
        "runs_with_warning_plus": sum(bool(r["warning_plus"]) for r in mon),
        "warning_plus_events": loud,
        "critical_events": sum(r["events_by_level"]["CRITICAL"] for r in mon),
        "watch_events": sum(r["events_by_level"]["WATCH"] for r in mon),
        "watch_per_1000_mean": _mean([r["watch_per_1000"] for r in mon]),
        "runs_reaching_max_steps": sum(bool(r["reached_max_steps"]) for r in ok),
        "acting_runs": len(acting),
        "acting_runs_with_action": sum(r["action_events"] > 0 for r in acting),
        "bit_identical": sum(bool(r["bit_identical_to_bare"]) for r in compared),
        "bit_identical_of": len(compared),
        "bare_runs": len(bare),
        "bare_diverged": sum(r["divergence_step"] is not None for r in bare),
    }


def _per_config(rows: list[dict[str, Any]], healthy: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name and "error" not in r]
        mon = [r for r in mine if r["mode"] in MONITORED]
        acting = [r for r in mine if r["mode"] in ACTING]
        compared = [r for r in mon if r.get("bit_identical_to_bare") is not None]

        def final(mode: str, rows_: list[dict[str, Any]] = mine) -> float:
            return _mean([r["final_train_loss"] for r in rows_ if r["mode"] == mode])

        out.append(
            {
                "config": name,
                "split": healthy[name].split,
                "description": healthy[name].description,
                "steps": max((r["max_steps"] for r in mine), default=0),
                "seeds": len({r["seed"] for r in mine}),
                "warning_plus_events_warning_mode": sum(
                    r["events_by_level"]["WARNING"] + r["events_by_level"]["CRITICAL"]
                    for r in mine
                    if r["mode"] == "warning"
                ),
                "runs_with_warning_plus": sum(bool(r["warning_plus"]) for r in mon),
                "monitored_runs": len(mon),
                "watch_per_1000": _mean([r["watch_per_1000"] for r in mon]),
                "acting_runs_with_action": sum(r["action_events"] > 0 for r in acting),
                "acting_runs": len(acting),
                "bit_identical": sum(bool(r["bit_identical_to_bare"]) for r in compared),
                "bit_identical_of": len(compared),
                "bare_diverged": sum(
                    r["divergence_step"] is not None for r in mine if r["mode"] == "bare"
                ),
                "start_loss_bare": _mean([r["start_loss"] for r in mine if r["mode"] == "bare"]),
                "final_loss": {m: final(m) for m in MODES},
                "wall_s": sum(r["wall_s"] for r in mine),
            }
        )
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:.{digits}g}"
    return str(x)


def _summary_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| split | monitored runs | runs with WARNING+ (target 0) | WARNING+ events | CRITICAL "
        "| WATCH / 1000 steps, mean (target <= 1) | runs reaching max_steps | action fired "
        "(target 0) | bit-identical to bare (target all) | bare runs diverged | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split, s in summaries.items():
        lines.append(
            f"| {split} | {s['monitored_runs']} | {s['runs_with_warning_plus']} | "
            f"{s['warning_plus_events']} | {s['critical_events']} | "
            f"{_fmt(s['watch_per_1000_mean'])} | {s['runs_reaching_max_steps']} / {s['runs']} | "
            f"{s['acting_runs_with_action']} / {s['acting_runs']} | "
            f"{s['bit_identical']} / {s['bit_identical_of']} | "
            f"{s['bare_diverged']} / {s['bare_runs']} | {s['errors']} |"
        )
    return lines


def _config_table(configs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| config | split | description | steps | WARNING+ events (warning mode, all seeds) "
        "| runs with WARNING+ | WATCH / 1000 steps | action fired | bit-identical "
        "| final loss bare | final loss actions | final loss staged | final loss guard |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        f = c["final_loss"]
        lines.append(
            f"| `{c['config']}` | {c['split']} | {c['description']} | {c['steps']} | "
            f"{c['warning_plus_events_warning_mode']} | "
            f"{c['runs_with_warning_plus']} / {c['monitored_runs']} | "
            f"{_fmt(c['watch_per_1000'])} | {c['acting_runs_with_action']} / {c['acting_runs']} | "
            f"{c['bit_identical']} / {c['bit_identical_of']} | {_fmt(f['bare'])} | "
            f"{_fmt(f['actions'])} | {_fmt(f['staged'])} | {_fmt(f.get('guard'))} |"
        )
    return lines


def _markdown(payload: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        "## Healthy-run corpus: false alarms",
        "",
        f"Generated by `{payload['command']}` ({payload['seeds']} seed(s), modes "
        f"{', '.join(payload['modes'])}, {payload['wall_s']:.0f} s on {payload['workers']} "
        "worker(s)). Targets on both halves: no WARNING+ event, WATCH <= 1 per 1000 steps, no "
        "action fires, weights bit-identical to the bare run. Monitored runs are the "
        "warning, actions, staged and guard modes.",
        "",
    ]
    if payload["quick"]:
        lines += ["Quick run: short configurations only, one seed; not the full corpus.", ""]
    for split in (*SPLITS, "all"):
        if split not in payload["summary"]:
            continue
        lines += [f"### Summary: {split}", "", *_summary_table({split: payload["summary"][split]})]
        lines.append("")
    lines += ["### Per configuration", "", *_config_table(payload["configs"]), ""]
    loud = [r for r in payload["rows"] if r.get("warning_plus") and r["mode"] == "warning"]
    if loud:
        lines += ["### WARNING+ events (warning mode, first per run)", ""]
        for r in loud:
            e = r["warning_plus"][0]
            lines.append(
                f"- `{r['config']}` seed {r['seed']}, step {e['step']} ({e['level']}): "
                f"{e['message']}"
            )
        lines.append("")
    fired = [r for r in payload["rows"] if r.get("action_events")]
    if fired:
        lines += ["### Actions that fired (first per run)", ""]
        for r in fired:
            lines.append(
                f"- `{r['config']}` seed {r['seed']} {r['mode']}: {r['action_messages'][0]}"
            )
        lines.append("")
    errors = [r for r in payload["rows"] if "error" in r]
    if errors:
        lines += ["### Runs that failed", ""]
        lines += [f"- `{r['config']}` seed {r['seed']} {r['mode']}: {r['error']}" for r in errors]
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(section: str, path: Path = OUT_MD) -> None:
    """Replace the healthy section of ``path`` (markers included) with ``section``."""
    results_md.write_section(path, "healthy", section)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the corpus (see the module docstring) and write the JSON and markdown."""
    from benchmarks.scenarios.healthy import HEALTHY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short configs, 1 seed, bare+warning")
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--modes", default="", help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--split", default="all", choices=(*SPLITS, "all"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    names = [n for n in args.only.split(",") if n] or list(HEALTHY)
    unknown = sorted(set(names) - set(HEALTHY))
    if unknown:
        parser.error(f"--only: unknown configurations {unknown}; choose from {sorted(HEALTHY)}")
    if args.split != "all":
        names = [n for n in names if HEALTHY[n].split == args.split]
    modes = [m for m in args.modes.split(",") if m] or (
        ["bare", "warning"] if args.quick else list(MODES)
    )
    bad = sorted(set(modes) - set(MODES))
    if bad:
        parser.error(f"--modes: unknown modes {bad}; choose from {MODES}")
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    _quiet()
    steps = {n: int(HEALTHY[n].make(0)[4]) for n in names}
    if args.quick:
        names = [n for n in names if steps[n] < QUICK_MAX_STEPS]
    # longest runs first, so that no worker is left with a long run at the end
    tasks = sorted(
        ((n, s, m, steps[n]) for n in names for s in seeds for m in modes),
        key=lambda t: -steps[t[0]],
    )
    print(f"{len(tasks)} runs on {args.workers} worker(s)", flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init_worker) as pool:
        for row in pool.imap_unordered(run_one, tasks, chunksize=1):
            rows.append(row)
            if "error" in row:
                print(f"{row['config']} seed {row['seed']} {row['mode']}: {row['error']}")
                continue
            c = row["events_by_level"]
            print(
                f"[{len(rows):>3}/{len(tasks)}] {row['config']:<34} seed {row['seed']} "
                f"{row['mode']:<8} steps {row['steps_done']:>5}  watch {c['WATCH']:>3}  "
                f"warning {c['WARNING']:>2}  critical {c['CRITICAL']:>2}  "
                f"actions {row['action_events']:>2}  loss {_fmt(row['final_train_loss'])}  "
                f"({row['wall_s']:.1f} s)",
                flush=True,
            )
    order = {n: i for i, n in enumerate(HEALTHY)}
    rows.sort(key=lambda r: (order[r["config"]], r["seed"], MODES.index(r["mode"])))
    _attach_identity(rows)
    summary = {split: summarise([r for r in rows if r["split"] == split]) for split in SPLITS}
    summary = {k: v for k, v in summary.items() if v["runs"] or v["errors"]}
    summary["all"] = summarise(rows)
    payload = {
        "command": " ".join(["python -m benchmarks.healthy", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "seeds": len(seeds),
        "modes": modes,
        "workers": args.workers,
        "wall_s": time.perf_counter() - start,
        "targets": {
            "runs_with_warning_plus": 0,
            "watch_per_1000_mean": "<= 1",
            "acting_runs_with_action": 0,
            "bit_identical": "all",
        },
        "summary": summary,
        "configs": _per_config(rows, HEALTHY),
        "rows": rows,
    }
    OUT_JSON.write_text(json.dumps(payload, indent=1, default=str))
    section = _markdown(payload)
    write_section(section)
    print(section)
    print(f"wrote {OUT_JSON} and the healthy section of {OUT_MD} ({payload['wall_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
