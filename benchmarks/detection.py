"""Early warning and rescue on the scenario suite, against Lightning's own detectors.

For every scenario x seed the run is trained once with the warning layer on and actions
off ("warning" mode: probes + ``EarlyWarning``; the probes do not change training, so its
loss trajectory is the bare run's) and once with actions on ("actions" mode). Lightning's
``SpikeDetection`` and ``EarlyStopping(divergence_threshold=...)`` ride along on every run
in a recording form (see :mod:`benchmarks.scenarios.runner`).

Reported per scenario: how many seeds diverged (rule in
:mod:`benchmarks.scenarios.divergence`), the first warning step, the divergence step and the
lead time (divergence - first warning; a warning counts as a detection when it comes at or
before the divergence step); recall and median lead over the diverging runs; false alarms
(runs with a warning) on the stable scenarios; the same for the two Lightning baselines;
separately for the gradual scenarios (``Scenario.gradual``: an early warning is possible),
recall and median lead, with "median lead >= 20 steps" as the target, and for the shock
scenarios (an LR jump or corrupted batches), the share of runs warned no later than the
step at which the loss first leaves its band
(:func:`benchmarks.scenarios.divergence.band_exit_step`, computed from the run's own
losses); with actions on, the rescue rate (diverging runs that no longer diverge) and the final
validation loss against the best fixed learning rate (full mode: a bare sweep of the base
learning rate x {1, 1/3, 1/10, 1/30}); with the learning-rate guard alone ("guard" mode,
``--no-guard`` skips it), the runs that still diverge and the runs it clamped. A column
whose callback is not available reads
"n/a". A section of ``RESULTS.md`` between ``<!-- healthy:begin -->`` and
``<!-- healthy:end -->`` (written by another benchmark) is kept, at the end.

    python -m benchmarks.detection --quick      # < 3 minutes on 2 cores
    python -m benchmarks.detection              # full: 5 seeds and the learning-rate sweep
    python -m benchmarks.detection --workers 1  # in this process, one run after another

The runs (scenario x seed x mode x learning-rate scale) are independent and seeded; with
``--workers N`` (default 2) they are trained in a pool of N processes, one torch thread
each, and the results are the same as with ``--workers 1``.

Writes ``benchmarks/detection.json``, ``benchmarks/RESULTS.md`` and loss plots with the
warning markers in ``benchmarks/plots/``.
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
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks import results_md
from benchmarks.scenarios.divergence import DivergenceRule, band_exit_step
from benchmarks.scenarios.perturbations import CorruptedLoader, LRJump
from benchmarks.scenarios.registry import SCENARIOS, Scenario
from benchmarks.scenarios.runner import RunRecord, run_scenario, stability_set

HERE = Path(__file__).parent
OUT_JSON = HERE / "detection.json"
OUT_MD = HERE / "RESULTS.md"
PLOTS = HERE / "plots"
LR_SWEEP = (1.0, 1 / 3, 1 / 10, 1 / 30)
PLOT_KEYS = (
    "stability/meta/deviation",
    "stability/sharpness/eos_ratio",
    "stability/grad/norm",
    "stability/cka/min",
    "stability/loss/tail_q",
)
TABLE_KEYS = (
    "stability/sharpness/eos_ratio",
    "stability/sharpness/lambda_max",
    "stability/grad/norm",
    "stability/grad/update_ratio",
    "stability/loss/var",
    "stability/cka/min",
    "stability/meta/deviation",
)
NA = "n/a"
GRADUAL_LEAD_TARGET = 20

Task = tuple[str, int, str, float, bool]
"""``(scenario, seed, mode, lr_scale, keep_history)``: one training run."""


def _quiet() -> None:
    """Lightning's console noise off (in the main process and in every worker)."""
    import lightning.pytorch  # noqa: F401  (importing it resets its loggers' levels)

    warnings.filterwarnings("ignore", module="lightning")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _init_worker() -> None:
    # the models are tiny: a second thread buys nothing and, on a busy machine, its
    # spin-waiting multiplies every step's time
    torch.set_num_threads(1)
    _quiet()


def run_task(task: Task) -> tuple[Task, RunRecord | str]:
    """Train one run; returns ``(task, record)``, or ``(task, "TypeName: message")`` when the
    run raised. The record keeps its per-step histories (``record.history``, for the
    plots) when ``keep_history`` is set."""
    name, seed, mode, lr_scale, keep_history = task
    try:
        record = run_scenario(
            SCENARIOS[name], seed, mode, lr_scale=lr_scale, keep_history=keep_history
        )
    except Exception as err:  # one broken run must not hide the others' results
        return task, f"{type(err).__name__}: {err}"
    return task, record


def _tasks(
    names: list[str], seeds: list[int], has_actions: bool, quick: bool, guard: bool = False
) -> list[Task]:
    """Every run the report needs, in the order the sequential path trains them."""
    tasks: list[Task] = []
    for name in names:
        for seed in seeds:
            tasks.append((name, seed, "warning", 1.0, seed == 0))
            if has_actions:
                tasks.append((name, seed, "actions", 1.0, False))
            if guard:
                tasks.append((name, seed, "guard", 1.0, False))
            if not quick:
                tasks += [(name, seed, "bare", k, False) for k in LR_SWEEP[1:]]
    return tasks


def _run_pool(tasks: list[Task], workers: int) -> dict[Task, RunRecord | str]:
    """Train ``tasks`` in a pool of ``workers`` spawned processes, the longest first (by
    steps, a run with probes counting double a bare one) so that no worker is left with a
    long run at the end."""
    steps = {name: int(SCENARIOS[name].make(0)[4]) for name in {t[0] for t in tasks}}
    order = sorted(tasks, key=lambda t: -steps[t[0]] * (1 if t[2] == "bare" else 2))
    results: dict[Task, RunRecord | str] = {}
    print(f"{len(tasks)} runs on {workers} workers", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        for task, result in pool.imap_unordered(run_task, order, chunksize=1):
            results[task] = result
            name, seed, mode, lr_scale, _ = task
            done = result if isinstance(result, str) else f"{result.wall_s:.1f} s"
            print(
                f"[{len(results):>3}/{len(tasks)}] {name:<24} seed {seed} {mode:<8} "
                f"lr x{lr_scale:.3g}  ({done})",
                flush=True,
            )
    return results


def _first_from(steps: list[int], onset: int) -> int | None:
    """The first firing at or after the perturbation's onset (earlier ones are false
    alarms: nothing had gone wrong yet)."""
    return next((s for s in sorted(steps) if s >= onset), None)


def _onset(run: RunRecord) -> int:
    return SCENARIOS[run.scenario].onset if run.scenario in SCENARIOS else 0


DETECTORS = {
    "EarlyWarning": lambda r: r.warning_steps,
    "SpikeDetection (Lightning)": lambda r: r.spike_detection_steps,
    "EarlyStopping(divergence_threshold) (Lightning)": lambda r: r.early_stopping_steps,
}


_TYPES: dict[str, str] = {}


def scenario_type(scenario: Scenario) -> str:
    """``"gradual"`` (``scenario.gradual``), ``"shock"`` (a diverging scenario whose run
    contains an :class:`LRJump` or a :class:`CorruptedLoader`: the instability starts at a
    step, with nothing to see before it) or ``"-"`` (stable runs, and diverging ones that are
    neither). Found by building the scenario once for seed 0."""
    if scenario.name not in _TYPES:
        kind = "-"
        if scenario.gradual:
            kind = "gradual"
        elif scenario.kind == "diverging":
            _, train, _, extra, _ = scenario.make(0)
            if isinstance(train, CorruptedLoader) or any(isinstance(c, LRJump) for c in extra):
                kind = "shock"
        _TYPES[scenario.name] = kind
    return _TYPES[scenario.name]


def _type(run: RunRecord) -> str:
    return scenario_type(SCENARIOS[run.scenario]) if run.scenario in SCENARIOS else "-"


def shock_stats(runs: list[RunRecord], steps_of) -> dict[str, Any]:
    """On the shock runs whose loss leaves its band at or after the onset: the share in
    which the detector fired between the onset and that band exit (inclusive)."""
    eligible = []
    for r in runs:
        if r.kind == "diverging" and _type(r) == "shock":
            exit_step = band_exit_step(r.losses, _onset(r))
            if exit_step is not None:
                eligible.append((r, exit_step))
    hits = [
        (fired := _first_from(steps_of(r), _onset(r))) is not None and fired <= exit_step
        for r, exit_step in eligible
    ]
    return {
        "runs": len(eligible),
        "warned_by_band_exit": sum(hits) / len(hits) if hits else math.nan,
    }


def _lead(detect: int | None, diverge: int | None) -> int | None:
    return None if detect is None or diverge is None else diverge - detect


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return NA if math.isnan(x) else f"{x:.{digits}g}"
    return str(x)


def detector_stats(runs: list[RunRecord], steps_of) -> dict[str, Any]:
    """Recall, median lead and false alarms of one detector (``steps_of(run)`` lists the
    steps at which it fired). A diverging run counts as detected when the detector fires
    between the perturbation's onset and the divergence step; firings before the onset
    are counted as early false alarms; any firing on a stable run is a false alarm."""
    diverging = [r for r in runs if r.kind == "diverging" and r.divergence_step is not None]
    stable = [r for r in runs if r.kind == "stable"]
    leads = [_lead(_first_from(steps_of(r), _onset(r)), r.divergence_step) for r in diverging]
    hits = [lead for lead in leads if lead is not None and lead >= 0]
    return {
        "recall": len(hits) / len(diverging) if diverging else math.nan,
        "detected_any_time": sum(lead is not None for lead in leads),
        "median_lead": statistics.median(hits) if hits else math.nan,
        "early_false_alarms": sum(any(s < _onset(r) for s in steps_of(r)) for r in diverging),
        "false_alarms": sum(bool(steps_of(r)) for r in stable),
        "stable_runs": len(stable),
        "diverging_runs": len(diverging),
    }


def _finite_end(run: RunRecord) -> bool:
    """The run ended with a finite training loss and a finite last validation loss."""
    return bool(run.losses) and math.isfinite(run.losses[-1]) and math.isfinite(run.final_val_loss)


def _rescue_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rescue targets: of the runs that diverge without actions, the fraction that end
    with a finite loss with actions on, and the fraction whose final validation loss is
    within 10% of the best fixed learning rate's (full mode); on stable runs, the fraction
    whose final validation loss with actions is within 1% of the run without."""
    diverged = [r for r in rows if r["kind"] == "diverging" and r["divergence_step"] is not None]
    stable = [r for r in rows if r["kind"] == "stable"]

    def within(value: Any, reference: Any, tol: float) -> bool:
        ok = isinstance(value, float) and isinstance(reference, float)
        return ok and math.isfinite(value) and value <= reference * (1 + tol)

    def share(flags: list[bool]) -> float:
        return sum(flags) / len(flags) if flags else math.nan

    with_best = [r for r in diverged if isinstance(r["best_fixed_lr_val"], float)]
    return {
        "diverged_runs": len(diverged),
        "finite_rate": share([r["final_loss_finite_on"] is True for r in diverged]),
        "within_10pct_of_best_lr": share(
            [within(r["final_val_on"], r["best_fixed_lr_val"], 0.10) for r in with_best]
        )
        if with_best
        else NA,
        "stable_runs": len(stable),
        "stable_within_1pct": share(
            [within(r["final_val_on"], r["final_val_off"], 0.01) for r in stable]
        ),
    }


def _guard_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The learning-rate guard alone (no other action): per scenario, runs that diverge
    without it and with it, runs it clamped, and mean final validation losses; on stable
    runs, runs it clamped and runs whose final validation loss moved by more than 1%."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == name and r["guard_clamps"] != NA]
        if not mine:
            continue
        out[name] = {
            "kind": mine[0]["kind"],
            "runs": len(mine),
            "diverged_without": sum(r["divergence_step"] is not None for r in mine),
            "diverged_with": sum(r["divergence_step_guard"] is not None for r in mine),
            "clamped_runs": sum(r["guard_clamps"] > 0 for r in mine),
            "moved_over_1pct": sum(
                not (
                    math.isfinite(r["final_val_guard"])
                    and math.isfinite(r["final_val_off"])
                    and abs(r["final_val_guard"] - r["final_val_off"])
                    <= 0.01 * abs(r["final_val_off"])
                )
                for r in mine
            ),
            "final_val_off": [r["final_val_off"] for r in mine],
            "final_val_guard": [r["final_val_guard"] for r in mine],
        }
    return out


def _guard_lines(guard: dict[str, Any]) -> list[str]:
    if not guard:
        return []
    lines = [
        "## Learning-rate guard alone (`lr_guard=True`, no other action)",
        "",
        "Runs per scenario that diverge without the guard and with it, runs in which it "
        "clamped at least one step, and runs whose final validation loss moved by more than "
        "1% against the run without it.",
        "",
        "| scenario | kind | diverged without | diverged with guard | clamped runs | "
        "final val moved > 1% |",
        "|---|---|---|---|---|---|",
    ]
    for name, g in guard.items():
        lines.append(
            f"| `{name}` | {g['kind']} | {g['diverged_without']} / {g['runs']} | "
            f"{g['diverged_with']} / {g['runs']} | {g['clamped_runs']} / {g['runs']} | "
            f"{g['moved_over_1pct']} / {g['runs']} |"
        )
    return [*lines, ""]


def _plot(scenario: Scenario, warn: RunRecord, act: RunRecord | None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    PLOTS.mkdir(exist_ok=True)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax.plot(warn.losses, lw=0.8, label="loss (actions off)")
    if act is not None:
        ax.plot(act.losses, lw=0.8, alpha=0.7, label="loss (actions on)")
    ax.set_yscale("log")
    marks = [
        (warn.divergence_step, "red", "divergence"),
        (_first_from(warn.warning_steps, 0), "orange", "EarlyWarning"),
        (_first_from(warn.spike_detection_steps, 0), "purple", "SpikeDetection"),
        (_first_from(warn.early_stopping_steps, 0), "grey", "EarlyStopping"),
    ]
    for step, colour, label in marks:
        if step is not None:
            ax.axvline(step, color=colour, ls="--", lw=1, label=f"{label} @ {step}")
    ax.set_ylabel("training loss")
    ax.set_title(f"{scenario.name} (seed {warn.seed}): {scenario.description}", fontsize=9)
    ax.legend(fontsize=7)
    history = getattr(warn, "history", {})
    for key in PLOT_KEYS:
        series = history.get(key)
        if not series:
            continue
        steps, values = zip(*series)
        scale = statistics.median([abs(v) for v in values if math.isfinite(v)] or [1.0]) or 1.0
        bx.plot(steps, [v / scale for v in values], lw=0.8, label=f"{key} / median")
    bx.set_yscale("symlog")
    bx.set_xlabel("optimizer step")
    if bx.lines:
        bx.legend(fontsize=7)
    else:
        bx.text(0.5, 0.5, "no probe readings available", ha="center", transform=bx.transAxes)
    fig.tight_layout()
    path = PLOTS / f"{scenario.name}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _rescue_lines(rescue: dict[str, Any]) -> list[str]:
    if not rescue:
        return []
    return [
        f"Of the {rescue['diverged_runs']} runs that diverge without actions, the fraction that "
        f"end with a finite loss with actions on: {_fmt(rescue['finite_rate'])} (target >= 0.9); "
        "the fraction that "
        "end with a validation loss within 10% of the best fixed learning rate's: "
        f"{_fmt(rescue['within_10pct_of_best_lr'])} (target >= 0.9; full mode only). "
        f"Fraction of the {rescue['stable_runs']} stable runs whose final validation loss with "
        f"actions is within 1% of the run without: {_fmt(rescue['stable_within_1pct'])} "
        "(target 1).",
        "",
    ]


def _markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Scenario suite: detection and rescue",
        "",
        f"Generated by `{payload['command']}` "
        f"({payload['seeds']} seed(s) per scenario, {payload['wall_s']:.0f} s). Figures depend on "
        "the machine and its load; regenerate rather than quote.",
        "",
        f"Divergence rule: {payload['rule']}.",
        "",
        f"Missing callbacks (their columns read {NA}): {', '.join(payload['missing']) or 'none'}.",
        "",
        f"Runs that failed: {'; '.join(payload['errors']) or 'none'}.",
        "",
        "## Detectors (actions off)",
        "",
        "A diverging run is detected when the detector fires between the perturbation's "
        "onset and the divergence step (lead = divergence - first such firing).",
        "",
        "| detector | recall | detected at any time | median lead (steps) | false alarms "
        "(stable runs) | fired before onset (diverging runs) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in payload["detectors"].items():
        if s is None:
            lines.append(f"| {name} | {NA} | {NA} | {NA} | {NA} | {NA} |")
            continue
        lines.append(
            f"| {name} | {_fmt(s['recall'])} ({s['diverging_runs']} diverging runs) | "
            f"{s['detected_any_time']} | {_fmt(s['median_lead'])} | "
            f"{s['false_alarms']} / {s['stable_runs']} | "
            f"{s['early_false_alarms']} / {s['diverging_runs']} |"
        )
    lines += [
        "",
        *_type_lines(payload.get("by_type", {})),
        "## Runs",
        "",
        "Detector columns: first firing at or after the perturbation's onset. Type: gradual, "
        "shock or -; band exit: the step at which a shock run's loss first leaves its band.",
        "",
        "| scenario | type | seed | diverged at | band exit | EarlyWarning | lead | "
        "SpikeDetection | EarlyStopping | rescued | final val (off) | final val (on) | "
        "best fixed lr val |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        lines.append(
            "| "
            + " | ".join(
                _fmt(row[k])
                for k in (
                    "scenario",
                    "type",
                    "seed",
                    "divergence_step",
                    "band_exit_step",
                    "first_warning_step",
                    "lead",
                    "spike_detection_step",
                    "early_stopping_step",
                    "rescued",
                    "final_val_off",
                    "final_val_on",
                    "best_fixed_lr_val",
                )
            )
            + " |"
        )
    lines += [
        "",
        "## Rescue (actions on)",
        "",
        f"Rescue rate: {_fmt(payload['rescue_rate'])} "
        f"(diverging runs that no longer diverge with the actions attached).",
        "",
        *_rescue_lines(payload.get("rescue", {})),
        *_guard_lines(payload.get("guard", {})),
        "## Probe readings per scenario (seed 0, actions off)",
        "",
        "Median over the run / last value at or before the divergence step (the run's end "
        "when it did not diverge).",
        "",
        "| scenario | " + " | ".join(k.removeprefix("stability/") for k in TABLE_KEYS) + " |",
        "|---|" + "---|" * len(TABLE_KEYS),
    ]
    for name, readings in payload["readings"].items():
        cells = []
        for key in TABLE_KEYS:
            r = readings.get(key)
            cells.append(
                NA if r is None else f"{_fmt(r['median'])} / {_fmt(r['last_before_divergence'])}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _critical_lines(payload.get("critical_bound", {}))
    lines += ["", "## Scenarios", ""]
    for s in SCENARIOS.values():
        kind = s.kind if scenario_type(s) == "-" else f"{s.kind}, {scenario_type(s)}"
        lines.append(f"- `{s.name}` ({kind}): {s.description}")
    return "\n".join(lines) + "\n"


CRITICAL_BOUND = 100.0
"""No ``critical`` reading may exceed this multiple of ``lambda_max`` (issue 18)."""


def _critical_summary(runs: list[Any]) -> dict[str, Any]:
    """``critical / lambda_max`` over every reading of ``runs``: count, largest, and how
    many exceed :data:`CRITICAL_BOUND`."""
    ratios = [x for r in runs for x in r.critical_over_lambda]
    return {
        "readings": len(ratios),
        "max": max(ratios) if ratios else math.nan,
        "median": statistics.median(ratios) if ratios else math.nan,
        "above_bound": sum(x > CRITICAL_BOUND for x in ratios),
    }


def _critical_lines(bound: dict[str, Any]) -> list[str]:
    if not bound:
        return []
    lines = [
        "",
        "## Critical sharpness against lambda_max (actions off, every seed)",
        "",
        "`critical` (curvature along the last update implied by its critical step) over the "
        "latest `lambda_max` before it; target: no reading above "
        f"{CRITICAL_BOUND:g}x. On a quadratic the ratio is at most 1 for any optimizer.",
        "",
        f"| scenario | readings | median | max | above {CRITICAL_BOUND:g}x |",
        "|---|---|---|---|---|",
    ]
    for name, row in bound.items():
        lines.append(
            f"| {name} | {row['readings']} | {_fmt(row['median'])} | {_fmt(row['max'])} | "
            f"{row['above_bound']} |"
        )
    total = sum(row["above_bound"] for row in bound.values())
    count = sum(row["readings"] for row in bound.values())
    lines += ["", f"Readings above {CRITICAL_BOUND:g}x: {total} of {count}."]
    return lines


def _type_lines(by_type: dict[str, Any]) -> list[str]:
    lines = [
        "## Gradual and shock scenarios",
        "",
        "Gradual scenarios (the instability builds up over many steps): recall and median "
        f"lead over their diverging runs (target: median lead >= {GRADUAL_LEAD_TARGET} steps). "
        "Shock scenarios (an LR jump or corrupted batches): the share of runs in which the "
        "detector fired between the onset and the step at which the loss first leaves its "
        "band (median + max(5 MAD-sigma, 5%) of the 100 losses before the step; "
        "`band_exit_step` in `benchmarks/scenarios/divergence.py`).",
        "",
        "| detector | gradual: recall | gradual: median lead (steps) | shock: warned by band "
        "exit |",
        "|---|---|---|---|",
    ]
    for name in DETECTORS:
        g, k = by_type.get("gradual", {}).get(name), by_type.get("shock", {}).get(name)
        recall = NA if g is None else f"{_fmt(g['recall'])} ({g['diverging_runs']} runs)"
        lead = NA if g is None else _fmt(g["median_lead"])
        shock = NA if k is None else f"{_fmt(k['warned_by_band_exit'])} ({k['runs']} runs)"
        lines.append(f"| {name} | {recall} | {lead} | {shock} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, no lr sweep")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per scenario")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--no-guard", action="store_true", help="skip the runs with the learning-rate guard alone"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="processes training runs in parallel (1: none)"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"--only: unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    seeds = list(range(args.seeds or (1 if args.quick else 5)))
    if args.workers < 1:
        parser.error("--workers: at least 1")
    _init_worker()  # the same settings as the workers' (the sequential path trains here)

    start = time.perf_counter()
    first = SCENARIOS[names[0]]
    _, missing_warning = stability_set("warning", first)
    action_cbs, missing_actions = stability_set("actions", first)
    has_actions = any(
        type(c).__name__ in ("LRBackoff", "StagedTraining", "Rollback") for c in action_cbs
    )
    missing = sorted(set(missing_warning) | set(missing_actions))
    runs: list[RunRecord] = []
    rows: list[dict[str, Any]] = []
    readings: dict[str, Any] = {}
    errors: list[str] = []
    guard_cbs, _ = stability_set("guard", first)
    has_guard = not args.no_guard and any(type(c).__name__ == "LRGuard" for c in guard_cbs)
    tasks = _tasks(names, seeds, has_actions, args.quick, has_guard)
    results = _run_pool(tasks, args.workers) if args.workers > 1 else {}

    def get(task: Task) -> RunRecord | None:
        """The task's record (trained now on the sequential path); ``None``, with the
        error recorded, when the run raised."""
        if task not in results:
            results[task] = run_task(task)[1]
        result = results[task]
        if isinstance(result, str):
            name, seed, mode, lr_scale, _ = task
            sweep = f" lr x{lr_scale:.3g}" if lr_scale != 1.0 else ""
            errors.append(f"{name} seed {seed} {mode}{sweep}: {result}")
            print(errors[-1], flush=True)
            return None
        return result

    for name in names:
        scenario = SCENARIOS[name]
        for seed in seeds:
            warn = get((name, seed, "warning", 1.0, seed == 0))
            if warn is None:
                continue
            runs.append(warn)
            act = get((name, seed, "actions", 1.0, False)) if has_actions else None
            if act is not None:
                runs.append(act)
            guarded = get((name, seed, "guard", 1.0, False)) if has_guard else None
            best = math.nan
            if not args.quick:
                vals = [warn.final_val_loss]
                for k in LR_SWEEP[1:]:
                    swept = get((name, seed, "bare", k, False))
                    if swept is not None:
                        vals.append(swept.final_val_loss)
                finite = [v for v in vals if math.isfinite(v)]
                best = min(finite) if finite else math.nan
            diverged = warn.divergence_step is not None
            onset = scenario.onset
            kind = scenario_type(scenario)
            exit_step = band_exit_step(warn.losses, onset) if kind == "shock" else None
            rows.append(
                {
                    "scenario": name,
                    "kind": scenario.kind,
                    "type": kind,
                    "seed": seed,
                    "divergence_step": warn.divergence_step,
                    "band_exit_step": exit_step,
                    "first_warning_step": _first_from(warn.warning_steps, onset)
                    if warn.warning_available
                    else NA,
                    "lead": _lead(_first_from(warn.warning_steps, onset), warn.divergence_step)
                    if warn.warning_available
                    else NA,
                    "spike_detection_step": _first_from(warn.spike_detection_steps, onset),
                    "early_stopping_step": _first_from(warn.early_stopping_steps, onset),
                    "rescued": (act.divergence_step is None if diverged else "-")
                    if act is not None
                    else NA,
                    "final_val_off": warn.final_val_loss,
                    "final_val_on": act.final_val_loss if act is not None else NA,
                    "best_fixed_lr_val": best if not args.quick else NA,
                    "divergence_step_actions_on": act.divergence_step if act else NA,
                    "final_loss_finite_on": _finite_end(act) if act is not None else NA,
                    "divergence_step_guard": guarded.divergence_step if guarded else NA,
                    "final_val_guard": guarded.final_val_loss if guarded else NA,
                    "guard_clamps": sum(
                        e["source"] == "lr_guard" and e["level"] != "OK"
                        for e in guarded.action_events
                    )
                    if guarded
                    else NA,
                    "wall_s": warn.wall_s,
                }
            )
            print(
                f"{name:<24} seed {seed}  diverged at {_fmt(warn.divergence_step):>4}  "
                f"warning {_fmt(rows[-1]['first_warning_step']):>4}  "
                f"spike {_fmt(rows[-1]['spike_detection_step']):>4}  "
                f"early-stop {_fmt(rows[-1]['early_stopping_step']):>4}  "
                f"rescued {_fmt(rows[-1]['rescued']):>5}  ({warn.wall_s:.1f} s)",
                flush=True,
            )
            if seed == 0:
                readings[name] = warn.readings
                if not args.no_plots:
                    _plot(scenario, warn, act)
    off = [r for r in runs if r.mode == "warning"]
    has_warning = any(r.warning_available for r in off)
    detectors = {
        name: detector_stats(off, steps_of) if has_warning or name != "EarlyWarning" else None
        for name, steps_of in DETECTORS.items()
    }
    by_type = {
        "gradual": {
            name: detector_stats([r for r in off if _type(r) == "gradual"], steps_of)
            if has_warning or name != "EarlyWarning"
            else None
            for name, steps_of in DETECTORS.items()
        },
        "shock": {
            name: shock_stats(off, steps_of) if has_warning or name != "EarlyWarning" else None
            for name, steps_of in DETECTORS.items()
        },
    }
    rescuable = [r for r in rows if r["kind"] == "diverging" and r["divergence_step"] is not None]
    rescue_rate = (
        sum(r["rescued"] is True for r in rescuable) / len(rescuable)
        if has_actions and rescuable
        else math.nan
    )
    rule = DivergenceRule()
    critical_bound = {
        name: _critical_summary([r for r in off if r.scenario == name])
        for name in dict.fromkeys(r.scenario for r in off)
    }
    payload = {
        "critical_bound": critical_bound,
        "rescue": _rescue_summary(rows) if has_actions else {},
        "guard": _guard_summary(rows) if has_guard else {},
        "command": " ".join(["python -m benchmarks.detection", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "seeds": len(seeds),
        "wall_s": time.perf_counter() - start,
        "rule": (
            f"non-finite loss, or the {rule.smooth}-step trailing median of the loss above "
            f"{rule.factor}x its running minimum (floored at {rule.floor_frac} x the first "
            f"median) for {rule.patience} consecutive steps; the step reported is the first "
            "of that stretch"
        ),
        "missing": missing,
        "errors": errors,
        "detectors": detectors,
        "by_type": by_type,
        "rescue_rate": rescue_rate,
        "rows": rows,
        "readings": readings,
        "runs": [r.to_json() for r in runs],
    }
    OUT_JSON.write_text(json.dumps(payload, indent=1, default=str))
    # every other benchmark's marked section is kept, after the suite's body
    OUT_MD.write_text(_markdown(payload) + results_md.marked_sections(OUT_MD))
    print(_markdown(payload).split("## Runs")[0])
    print(f"wrote {OUT_JSON}, {OUT_MD} ({payload['wall_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
