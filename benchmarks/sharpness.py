"""Cost of SharpnessMonitor on the reference task.

1. Wall-time overhead as a ratio with / without the callback, for three Lanczos
   cadences, measured in one process with ``benchmarks.overhead.measure`` (alternating
   bare and instrumented runs). From each ratio it also derives the extra seconds per check
   and the overhead projected at the default cadence, since a short quick run holds only
   a few checks.
2. Hessian-vector products per check with Lanczos warm-started from the previous check's
   eigenvectors against a cold (random) start, on the same run.
3. What one product costs against one training forward and backward pass on the reference
   batch (``--products`` measures only this and adds it to the existing JSON): exact
   (double backward through the math attention kernel, as the monitor runs it) and
   finite-difference. A check cannot cost less than its products.

    python -m benchmarks.sharpness --quick     # a few minutes on 2 cores
    python -m benchmarks.sharpness

Writes ``benchmarks/sharpness.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.overhead import measure, timed_fit
from benchmarks.reference import quiet_trainer, reference_dataloader, reference_module
from lightning_stability import SharpnessCadence, SharpnessEstimator, SharpnessMeasures
from lightning_stability.estimators.finite_difference_hvp import FiniteDifferenceHessian
from lightning_stability.estimators.hvp import HessianOperator
from lightning_stability.probes.sharpness import SharpnessMonitor

OUT = Path(__file__).with_name("sharpness.json")


def _monitor(
    every: int,
    directional_every: int | None = SharpnessCadence.directional_every_n_steps,
    *,
    directional: bool = False,
    warm_start: bool = True,
    preconditioned: bool = True,
) -> SharpnessMonitor:
    # Directional readings off by default: this measures the Lanczos checks' cadence alone.
    return SharpnessMonitor(
        cadence=SharpnessCadence(
            every_n_steps=every, directional_every_n_steps=directional_every, adaptive=False
        ),
        estimator=SharpnessEstimator(warm_start=warm_start),
        measures=SharpnessMeasures(directional=directional, preconditioned=preconditioned),
    )


class _Products(Callback):
    """Collects the products of every Lanczos check of ``monitor`` (placed after it)."""

    def __init__(self, monitor: SharpnessMonitor) -> None:
        self.monitor = monitor
        self.per_check: list[int] = []
        self._checks = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor.num_checks != self._checks:
            self._checks = self.monitor.num_checks
            self.per_check.append(self.monitor.last_products)


def products_per_check(every: int, steps: int, warm: bool, preconditioned: bool) -> list[int]:
    pl.seed_everything(0, verbose=False)
    monitor = _monitor(every, warm_start=warm, preconditioned=preconditioned)
    counter = _Products(monitor)
    trainer = quiet_trainer(
        max_steps=steps,
        callbacks=[monitor, counter],
    )
    trainer.fit(reference_module(), reference_dataloader(seed=0))
    return counter.per_check


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def product_cost(repeats: int = 7) -> dict[str, float]:
    """Seconds of one training forward and backward pass, one exact and one
    finite-difference Hessian-vector product on the reference batch, and the products in
    units of the first."""
    pl.seed_everything(0, verbose=False)
    module = reference_module()
    module.train()
    batch = next(iter(reference_dataloader(seed=0)))
    params = [p for p in module.parameters() if p.requires_grad]

    def loss() -> torch.Tensor:
        return module.training_step(batch, 0)

    step = _median_seconds(lambda: torch.autograd.grad(loss(), params), repeats)
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), HessianOperator(loss, params) as op:
        graph = _median_seconds(lambda: (op.close(), op.gradient()), repeats)
        exact = _median_seconds(lambda: op.matvec(v), repeats)
    with FiniteDifferenceHessian(loss, params) as fd:
        finite = _median_seconds(lambda: fd.matvec(v), repeats)
    return {
        "forward_backward_s": step,
        "gradient_graph_s": graph,
        "exact_product_s": exact,
        "finite_difference_product_s": finite,
        "exact_product_steps": exact / step,
        "finite_difference_product_steps": finite / step,
        "gradient_graph_steps": graph / step,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, 3 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--products", action="store_true", help="only the cost of one product (item 3)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.products:
        cost = product_cost()
        print(json.dumps(cost, indent=2))
        payload = json.loads(OUT.read_text()) if OUT.exists() else {}
        payload["product_cost"] = cost
        OUT.write_text(json.dumps(payload, indent=2))
        print(f"wrote the product cost into {OUT}")
        return payload
    steps = 40 if args.quick else 300
    repeats = 2 if args.quick else 5
    cadences = (5, 10, 20) if args.quick else (25, 100, SharpnessMonitor().every_n_steps)
    directional_every = 10 if args.quick else SharpnessMonitor().directional_every_n_steps

    timed_fit([], steps=5)  # warm-up
    overhead: dict[str, Any] = {}
    print(
        f"{'reading':>24} {'checks':>6} {'bare s':>8} {'with s':>8} {'overhead':>9} {'s/check':>8}"
    )
    settings = [(f"lanczos every {c}", c, lambda c=c: [_monitor(c)]) for c in cadences]
    settings.append(
        (
            f"directional every {directional_every}",
            directional_every,
            lambda: [_monitor(10**9, directional_every, directional=True)],
        )
    )
    for name, every, factory in settings:
        r = measure(factory, steps, repeats)
        checks = steps // every
        bare = statistics.median(r["bare_s"])
        extra = statistics.median(r["with_s"]) - bare
        r["checks"] = checks
        r["seconds_per_check"] = extra / checks if checks else 0.0
        r["seconds_per_step_bare"] = bare / steps
        overhead[name] = r
        print(
            f"{name:>24} {checks:>6} {bare:8.2f} {statistics.median(r['with_s']):8.2f} "
            f"{r['overhead_pct']:8.1f}% {r['seconds_per_check']:8.3f}"
        )
    lanczos = [overhead[n] for n, _, _ in settings[:-1]]
    directional = overhead[settings[-1][0]]
    per_check = statistics.median(r["seconds_per_check"] for r in lanczos)
    per_step = statistics.median(r["seconds_per_step_bare"] for r in overhead.values())
    default = SharpnessMonitor()
    projected = 100.0 * (
        per_check / (default.every_n_steps * per_step)
        + directional["seconds_per_check"] / (default.directional_every_n_steps * per_step)
    )
    print(
        f"projected overhead of the defaults (Lanczos every {default.every_n_steps}, "
        f"directional + critical every {default.directional_every_n_steps}): {projected:.1f}%"
    )

    every = cadences[0]
    products: dict[str, Any] = {}
    print(f"\n{'preconditioner':>14} {'start':>5} {'HVPs/check (after the first)':>30}")
    for preconditioned in (False, True):
        for warm in (True, False):
            counts = products_per_check(every, steps, warm, preconditioned)
            later = counts[1:] or counts
            name = f"{'lanczos+preconditioned' if preconditioned else 'lanczos'}/{'warm' if warm else 'cold'}"
            products[name] = {"per_check": counts, "mean_after_first": statistics.mean(later)}
            print(
                f"{'yes' if preconditioned else 'no':>14} {'warm' if warm else 'cold':>5} "
                f"{statistics.mean(later):30.1f}"
            )
    payload = {
        "task": "reference char-LM (benchmarks/reference.py), AdamW",
        "torch_threads": torch.get_num_threads(),
        "bare_seconds_per_step": per_step,
        "quick": args.quick,
        "steps": steps,
        "overhead": overhead,
        "defaults": {
            "every_n_steps": default.every_n_steps,
            "directional_every_n_steps": default.directional_every_n_steps,
        },
        "projected_overhead_pct_at_defaults": projected,
        "hvps_per_check": products,
        "product_cost": product_cost(),
    }
    OUT.write_text(json.dumps(payload, indent=2))
    print(f"wrote {OUT}")
    return payload


if __name__ == "__main__":
    main()
