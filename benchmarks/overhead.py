"""Wall-time overhead of the callbacks on the reference task, as a ratio against a bare run.

Runs alternate (bare, with, bare, with, ...) in one process after a warm-up, so that drift
in machine load hits both sides alike; the reported ratio is median(with) / median(bare).

    python -m benchmarks.overhead --quick          # < 2 minutes on 2 cores
    python -m benchmarks.overhead                  # full
    python -m benchmarks.overhead --only grad+loss,default

Writes ``benchmarks/overhead.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.reference import quiet_trainer, reference_dataloader, reference_module
from lightning_stability import DriftCadence, DriftProbe

OUT = Path(__file__).with_name("overhead.json")


def _registry() -> dict[str, Callable[[], list[Callback]]]:
    """Named callback sets. Each factory imports lazily so that one missing piece does not
    stop the others from being measured."""
    reg: dict[str, Callable[[], list[Callback]]] = {}

    def drift() -> list[Callback]:
        from lightning_stability.probes.drift import RepresentationDriftMonitor

        # Quick runs are shorter than an epoch: check by steps so that checks happen.
        return [
            RepresentationDriftMonitor(
                cadence=DriftCadence(every_n_steps=50), probe=DriftProbe(source="train")
            )
        ]

    reg["drift"] = drift

    def sharpness() -> list[Callback]:
        from lightning_stability.probes.sharpness import SharpnessMonitor

        return [SharpnessMonitor()]

    reg["sharpness"] = sharpness

    def grad_loss() -> list[Callback]:
        from lightning_stability.probes import GradientMonitor, LossMonitor

        return [GradientMonitor(), LossMonitor()]

    reg["grad+loss"] = grad_loss

    def default() -> list[Callback]:
        from lightning_stability.defaults import stability_callbacks

        # The one-line default set exactly as a user gets it; its target is under 5%.
        return stability_callbacks()

    reg["default"] = default
    return reg


def timed_fit(callbacks: list[Callback], steps: int, seed: int = 0) -> float:
    """Seconds spent in ``Trainer.fit`` for ``steps`` optimizer steps of the reference task."""
    pl.seed_everything(seed, verbose=False)
    module = reference_module()
    trainer = quiet_trainer(
        max_steps=steps,
        callbacks=callbacks,
    )
    loader = reference_dataloader(seed=seed)
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


def measure(
    factory: Callable[[], list[Callback]], steps: int, repeats: int
) -> dict[str, float | list[float]]:
    bare, with_cb = [], []
    for i in range(repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        for use in order:
            (with_cb if use else bare).append(timed_fit(factory() if use else [], steps))
    ratio = statistics.median(with_cb) / statistics.median(bare)
    return {
        "ratio": ratio,
        "overhead_pct": 100.0 * (ratio - 1.0),
        "bare_s": bare,
        "with_s": with_cb,
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, 3 repeats")
    parser.add_argument("--only", default="", help="comma-separated names from the registry")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Full runs are long enough to include the default set's sparse checks (a Lanczos check
    # every 2500 steps, a directional one every 1000); quick runs see only per-step costs.
    steps = args.steps or (60 if args.quick else 2500)
    repeats = args.repeats or (3 if args.quick else 2)
    registry = _registry()
    names = [n for n in args.only.split(",") if n] or list(registry)
    unknown = sorted(set(names) - set(registry))
    if unknown:
        parser.error(f"--only: unknown names {unknown}; choose from {sorted(registry)}")

    timed_fit([], steps=5)  # warm-up: imports, allocator, first-call costs
    results: dict[str, dict] = {}
    print(f"{'callbacks':<24} {'bare s':>8} {'with s':>8} {'overhead':>9}")
    for name in names:
        r = measure(registry[name], steps, repeats)
        results[name] = r
        print(
            f"{name:<24} {statistics.median(r['bare_s']):8.2f} "
            f"{statistics.median(r['with_s']):8.2f} {r['overhead_pct']:8.1f}%"
        )
    payload = {
        "task": "reference char-LM (benchmarks/reference.py)",
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "results": results,
    }
    OUT.write_text(json.dumps(payload, indent=2))
    print(f"wrote {OUT}")
    return results


if __name__ == "__main__":
    main()
