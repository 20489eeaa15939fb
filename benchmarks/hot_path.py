"""Per-step cost of the default set on a small fast model: wall-time ratio and microseconds.

The task is a digits MLP (64-64-64-10, SGD with momentum, batch 64, one torch thread) whose
training step takes a few milliseconds on a CPU, so that what the callbacks do on every
step (Python, host synchronisation, logging) is not hidden behind a large model's step.

Three measurements:

* **wall ratio**: ``Trainer.fit`` of ``--steps`` optimizer steps with ``stability_callbacks()``
  against a bare run, alternating (bare, with, bare, with, ...) in one process after a
  warm-up; the ratio is median(with) / median(bare). Both runs have the same in-memory
  logger (writes are counted, nothing is stored), so the logging cadence is exercised.
* **hooks**: one more run of each under Lightning's ``SimpleProfiler``; every callback hook
  Lightning calls is timed (``[Callback]<name>.<hook>``), and the total per optimizer step
  is reported in microseconds per callback and per hook.
* **components**: the warning layer's parts, timed by replaying the readings the profiled
  run published (each step's readings, as ``EarlyWarning`` saw them) through fresh
  instances of each part: the meta-state's observation, the robust baselines, the trend
  indicators, the CUSUM, the loss band, the rules and the level tracker. Microseconds per
  step, best of ``--replays`` replays.

The actions' step boundary is measured in a second profiled run with ``actions="backoff"``
(LR backoff and rollback), which has no events on this healthy run: what it costs is the
boundary itself.

    python -m benchmarks.hot_path              # 300 steps, 5 pairs
    python -m benchmarks.hot_path --quick      # 150 steps, 3 pairs

Writes ``benchmarks/hot_path.json`` and the ``hotpath`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.profilers import SimpleProfiler

from benchmarks import results_md
from benchmarks.reference import quiet_trainer
from benchmarks.scenarios.tasks import MLP, digits_data, seeded_loader

OUT = Path(__file__).with_name("hot_path.json")
RESULTS = Path(__file__).with_name("RESULTS.md")


class CountingLogger(Logger):
    """A logger that accepts every write and keeps only counts (no I/O)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.values = 0

    @property
    def name(self) -> str:
        return "counting"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.writes += 1
        self.values += len(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def _module_and_loader(seed: int) -> tuple[pl.LightningModule, Any]:
    train, _ = digits_data(seed)
    module = MLP(64, 10, hidden=64, depth=2, lr=0.05, optimizer="sgd", momentum=0.9)
    return module, seeded_loader(train, 64, seed)


class _Readings(Callback):
    """Records, at every batch end, the readings ``EarlyWarning`` assessed (its probes'
    latest readings), for the component replay."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, tuple[float, int]]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        merged: dict[str, tuple[float, int]] = {}
        for cb in trainer.callbacks:
            if type(cb).__name__ == "EarlyWarning":
                for probe in cb.probes:
                    merged.update({k: (r.value, r.step) for k, r in probe.readings.items()})
        self.steps.append((trainer.global_step, merged))


def fit(
    callbacks: list[Callback],
    steps: int,
    seed: int = 0,
    profiler: SimpleProfiler | None = None,
    log_every_n_steps: int = 50,
) -> float:
    """Seconds spent in ``Trainer.fit`` for ``steps`` optimizer steps."""
    pl.seed_everything(seed, verbose=False)
    module, loader = _module_and_loader(seed)
    trainer = quiet_trainer(
        max_steps=steps,
        logger=CountingLogger(),
        log_every_n_steps=log_every_n_steps,
        callbacks=callbacks,
        profiler=profiler,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


def default_set(**options: Any) -> list[Callback]:
    from lightning_stability.defaults import stability_callbacks

    return stability_callbacks(**options)


def wall_ratio(factory: Callable[[], list[Callback]], steps: int, pairs: int) -> dict[str, Any]:
    bare, with_cb = [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for use in order:
            (with_cb if use else bare).append(fit(factory() if use else [], steps))
    ratio = statistics.median(with_cb) / statistics.median(bare)
    return {
        "ratio": ratio,
        "overhead_pct": 100.0 * (ratio - 1.0),
        "bare_ms_per_step": 1e3 * statistics.median(bare) / steps,
        "with_ms_per_step": 1e3 * statistics.median(with_cb) / steps,
        "bare_s": bare,
        "with_s": with_cb,
    }


_HOOK = re.compile(r"^\[Callback\](?P<cb>[A-Za-z_]\w*).*\.(?P<hook>\w+)$")


def hook_costs(
    factory: Callable[[], list[Callback]], steps: int, extra: list[Callback] | None = None
) -> dict[str, Any]:
    """Microseconds per optimizer step in each callback hook, from ``SimpleProfiler``."""
    profiler = SimpleProfiler(dirpath=tempfile.mkdtemp(prefix="hot_path-"), filename="profile")
    callbacks = factory()
    fit([*callbacks, *(extra or [])], steps, profiler=profiler)
    # hooks a callback overrides (Lightning calls the others too, as no-ops)
    ours = {
        (type(cb).__name__, hook)
        for cb in callbacks
        for hook in dir(Callback)
        if hook.startswith("on_") and getattr(type(cb), hook) is not getattr(Callback, hook)
    }
    per_hook: dict[str, float] = {}
    per_callback: dict[str, float] = defaultdict(float)
    for action, durations in profiler.recorded_durations.items():
        match = _HOOK.match(action)
        if match is None or (match["cb"], match["hook"]) not in ours:
            continue
        if match["hook"] in ("setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start"):
            continue  # once per fit, not per step
        # the median call times the calls per step: one slow call (a preempted process on
        # a shared machine) does not move it
        us = 1e6 * statistics.median(durations) * len(durations) / steps
        per_hook[f"{match['cb']}.{match['hook']}"] = us
        per_callback[match["cb"]] += us
    step_s = profiler.recorded_durations.get("run_training_batch", [])
    return {
        "per_callback_us": dict(sorted(per_callback.items(), key=lambda kv: -kv[1])),
        "per_hook_us": dict(sorted(per_hook.items(), key=lambda kv: -kv[1])),
        "total_us": sum(per_callback.values()),
        "training_batch_ms": 1e3 * statistics.median(step_s) if step_s else math.nan,
    }


def component_costs(
    recorded: list[tuple[int, dict[str, tuple[float, int]]]], replays: int
) -> dict[str, float]:
    """Microseconds per step of each part of ``EarlyWarning``'s assessment, replaying the
    recorded readings through fresh instances (best of ``replays``)."""
    from lightning_stability.probes.base import Reading
    from lightning_stability.warning.assessment import MetaStateMonitor
    from lightning_stability.warning.baseline import RobustBaseline
    from lightning_stability.warning.cusum import Cusum
    from lightning_stability.warning.indicators import TrendIndicator
    from lightning_stability.warning.levels import LevelTracker
    from lightning_stability.warning.loss_band import LossBand
    from lightning_stability.warning.metastate import MetaState
    from lightning_stability.warning.rules import LOSS_KEY, HardRules

    steps = [(s, {k: Reading(v, rs) for k, (v, rs) in r.items()}) for s, r in recorded]
    n = len(steps)
    # the streams each part sees: the observations of every step
    meta = MetaState()
    observed = [(s, meta.observe(r, s), r) for s, r in steps]
    best: dict[str, float] = {}

    def timed(name: str, run: Callable[[], None]) -> None:
        for _ in range(replays):
            start = time.perf_counter()
            run()
            us = 1e6 * (time.perf_counter() - start) / n
            best[name] = min(best.get(name, math.inf), us)

    def observe() -> None:
        m = MetaState()
        for s, r in steps:
            m.observe(r, s)

    def baselines() -> None:
        bases: dict[str, RobustBaseline] = {}
        for _, obs, _ in observed:
            for o in obs:
                if not math.isfinite(o.value):
                    continue
                b = bases.get(o.key)
                if b is None:
                    b = bases[o.key] = RobustBaseline(64, 20, o.spec.min_scale)
                b.score(o.value)
                if o.fresh:
                    b.update(o.value)

    def indicators() -> None:
        trends: dict[str, TrendIndicator] = {}
        for _, obs, _ in observed:
            for o in obs:
                if o.spec.trend and o.fresh and math.isfinite(o.value):
                    trends.setdefault(o.key, TrendIndicator()).update(o.value)

    def band() -> None:
        b = LossBand()
        last = -1
        for _, r in steps:
            reading = r.get(LOSS_KEY)
            if reading is not None and reading.step != last:
                last = reading.step
                b.update(float(reading.value))

    def rules() -> None:
        from lightning_stability.warning.loss_band import BandEvidence

        h = HardRules()
        none = BandEvidence()
        for _, obs, r in observed:
            h.check(obs, r, none)

    def cusum() -> None:
        c = Cusum(5.0, 12.0)
        for i in range(n):
            c.update(float(i % 7))

    def levels() -> None:
        from lightning_stability.warning.events import Level

        t = LevelTracker()
        for s, _, _ in observed:
            t.update(s, Level.OK, Level.OK, False, Level.OK, False)

    def assess() -> None:
        m = MetaStateMonitor()
        for s, r in steps:
            m.assess(r, s)

    for name, run in (
        ("meta-state observe", observe),
        ("robust baselines (score + update)", baselines),
        ("trend indicators", indicators),
        ("loss band", band),
        ("hard rules", rules),
        ("CUSUM", cusum),
        ("level tracker", levels),
        ("assess (all of the above but the tracker)", assess),
    ):
        timed(name, run)
    return best


def _table(payload: dict[str, Any]) -> str:
    w = payload["wall"]
    lines = [
        "# Hot path: the default set on a small fast model",
        "",
        f"Generated by `python -m benchmarks.hot_path{' --quick' if payload['quick'] else ''}` "
        f"({payload['task']}; {payload['steps']} steps, {payload['pairs']} bare/with pairs, "
        f"torch threads {payload['torch_threads']}). Figures depend on the machine and its "
        "load; regenerate rather than quote.",
        "",
        "| | bare ms/step | default set ms/step | ratio |",
        "|---|---|---|---|",
        f"| wall time (median of pairs) | {w['bare_ms_per_step']:.3f} | "
        f"{w['with_ms_per_step']:.3f} | {w['ratio']:.3f} |",
        "",
        "Time in the callbacks' hooks per optimizer step (Lightning's `SimpleProfiler`, one "
        f"profiled run; the profiled bare training batch takes "
        f"{payload['hooks']['bare_training_batch_ms']:.3f} ms):",
        "",
        "| callback | hook | µs/step |",
        "|---|---|---|",
    ]
    for section in ("default", "backoff"):
        hooks = payload["hooks"][section]["per_hook_us"]
        for key, us in hooks.items():
            cb, hook = key.split(".", 1)
            lines.append(f"| {cb} ({section}) | {hook} | {us:.1f} |")
        lines.append(
            f"| **total ({section})** | | **{payload['hooks'][section]['total_us']:.1f}** |"
        )
    lines += [
        "",
        "EarlyWarning's assessment by part, replaying the profiled run's readings (µs/step, "
        "best of the replays):",
        "",
        "| part | µs/step |",
        "|---|---|",
    ]
    for name, us in payload["components_us"].items():
        lines.append(f"| {name} | {us:.1f} |")
    return "\n".join(lines)


def write_results(text: str) -> None:
    results_md.write_section(RESULTS, "hotpath", text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 steps, 3 pairs")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = args.steps or (150 if args.quick else 300)
    pairs = args.pairs or (3 if args.quick else 5)

    fit([], 20)  # warm-up: imports, allocator, first-call costs
    fit(default_set(), 20)
    wall = wall_ratio(default_set, steps, pairs)
    print(
        f"wall: bare {wall['bare_ms_per_step']:.3f} ms/step, default set "
        f"{wall['with_ms_per_step']:.3f} ms/step, ratio {wall['ratio']:.3f}"
    )
    bare_profile = hook_costs(lambda: [], steps)
    recorder = _Readings()
    hooks = {
        "default": hook_costs(default_set, steps, extra=[recorder]),
        "backoff": hook_costs(lambda: default_set(actions="backoff"), steps),
        "bare_training_batch_ms": bare_profile["training_batch_ms"],
    }
    for section in ("default", "backoff"):
        print(f"hooks ({section}), µs per step:")
        for key, us in hooks[section]["per_hook_us"].items():
            print(f"  {key:<55} {us:8.1f}")
        print(f"  {'total':<55} {hooks[section]['total_us']:8.1f}")
    components = component_costs(recorder.steps, args.replays)
    print("EarlyWarning parts, µs per step:")
    for name, us in components.items():
        print(f"  {name:<55} {us:8.1f}")
    payload = {
        "task": "digits MLP 64-64-64-10, SGD momentum 0.9, batch 64",
        "steps": steps,
        "pairs": pairs,
        "quick": args.quick,
        "torch_threads": torch.get_num_threads(),
        "wall": wall,
        "hooks": hooks,
        "components_us": components,
    }
    if not args.no_write:
        OUT.write_text(json.dumps(payload, indent=2))
        write_results(_table(payload))
        print(f"wrote {OUT} and the hotpath section of {RESULTS}")
    return payload


if __name__ == "__main__":
    main()
