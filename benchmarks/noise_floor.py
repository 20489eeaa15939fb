"""Noise floor of each curvature key on the reference char-LM.

A reading that changes between checks means something only if the change is above what
the measurement itself produces at fixed weights. This trains the reference model
(``benchmarks.reference``, AdamW) for ``--steps`` steps with a SharpnessMonitor whose only
check falls on the last step (probe batch A), then, at those same weights, checks again:

* ``same batch``: probe batch A, a new random start (estimator noise alone);
* ``other batch``: probe batches B1..Bn drawn from the training set (estimator plus
  probe-batch noise: what two checks of a real run differ by when nothing changed).

Each check is warm-started from batch A's eigenvectors, as in a run. For a scalar key the
floor is the relative difference ``|x - x_A| / |x_A|``; ``shift`` (principal-angle sine)
and ``flattening`` (``ln(lambda_A / lambda)``) are differences already and are reported
as they are. Median and max over the repeats.

    python -m benchmarks.noise_floor            # 1 + 2 x repeats checks of the char-LM

Writes ``benchmarks/noise_floor.json`` and the section between
``<!-- noise-floor:begin -->`` and ``<!-- noise-floor:end -->`` of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks import results_md
from benchmarks.reference import VOCAB, quiet_trainer, reference_dataloader, reference_module
from lightning_stability import SharpnessCadence, SharpnessEstimator
from lightning_stability.probes.sharpness import SharpnessMonitor

HERE = Path(__file__).parent
OUT_JSON = HERE / "noise_floor.json"
OUT_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- noise-floor:begin -->", "<!-- noise-floor:end -->"
SCALAR_KEYS = (
    "lambda_max",
    "eos_ratio",
    "preconditioned",
    "directional",
    "directional_ratio",
    "critical",
)
DIFF_KEYS = ("shift", "flattening")


class _KeepWeightsBefore(Callback):
    """Keeps the monitor's copy of the weights before the last step (for ``critical``)."""

    def __init__(self, monitor: SharpnessMonitor) -> None:
        self.monitor = monitor
        self.weights: list[torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor._weights_before is not None:
            self.weights = [w.clone() for w in self.monitor._weights_before]


def _lm_loss(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    # The module's training_step logs, which Lightning refuses outside its loop.
    x, y = batch
    return torch.nn.functional.cross_entropy(module(x).reshape(-1, VOCAB), y.reshape(-1))


def _strip(values: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("sharpness/"): v for k, v in values.items()}


def run(steps: int, repeats: int, k: int, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, workers=True)
    module = reference_module()
    loader = reference_dataloader(seed=seed)
    monitor = SharpnessMonitor(
        cadence=SharpnessCadence(
            every_n_steps=steps, directional_every_n_steps=steps, adaptive=False
        ),
        estimator=SharpnessEstimator(k=k, seed=seed),
        loss_fn=_lm_loss,
    )
    keep = _KeepWeightsBefore(monitor)
    trainer = quiet_trainer(
        max_steps=steps,
        callbacks=[keep, monitor],
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    train_s = time.perf_counter() - start
    reference = _strip(
        {k2.removeprefix("stability/"): r.value for k2, r in monitor.readings.items()}
    )
    batch_a = monitor._batches
    vecs_a, lam_a = monitor._valid_eigvecs, monitor._prev_lambda
    others = []
    for i, batch in enumerate(iter(reference_dataloader(seed=seed + 1000))):
        if i >= repeats:
            break
        others.append([batch])

    def check(batches: list) -> dict[str, float]:
        monitor._batches = batches
        monitor._weights_before = keep.weights
        monitor._eigvecs = monitor._valid_eigvecs = vecs_a
        monitor._prev_lambda = lam_a
        return _strip(monitor.measure(trainer, module, check=True, directional=True))

    start = time.perf_counter()
    same = [check(batch_a) for _ in range(repeats)]
    other = [check(b) for b in others]
    check_s = (time.perf_counter() - start) / (2 * repeats)

    def floors(rows: list[dict[str, float]]) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for key in SCALAR_KEYS + DIFF_KEYS:
            if key in DIFF_KEYS:
                diffs = [abs(r[key]) for r in rows if key in r]
            else:
                ref = reference.get(key)
                if ref is None or not math.isfinite(ref) or ref == 0:
                    continue
                diffs = [abs(r[key] - ref) / abs(ref) for r in rows if key in r]
            finite = [d for d in diffs if math.isfinite(d)]
            out[key] = {
                "median": statistics.median(finite) if finite else None,
                "max": max(finite) if finite else None,
                "valid": len(finite),
                "runs": len(rows),
            }
        return out

    return {
        "config": {"steps": steps, "repeats": repeats, "k": k, "seed": seed},
        "reference": reference,
        "same_batch": floors(same),
        "other_batch": floors(other),
        "train_seconds": train_s,
        "seconds_per_check": check_s,
        "same_rows": same,
        "other_rows": other,
    }


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry["median"] is None:
        return "n/a"
    return f"{entry['median']:.2g} / {entry['max']:.2g} ({entry['valid']}/{entry['runs']})"


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        BEGIN,
        "## Noise floor of the curvature keys (reference char-LM)",
        "",
        f"Generated by `python -m benchmarks.noise_floor --steps {cfg['steps']} --repeats "
        f"{cfg['repeats']} --k {cfg['k']}`: the reference char-LM (AdamW lr 1e-3) trained "
        f"{cfg['steps']} steps, then checked again at the same weights, {cfg['repeats']} times "
        "on the same probe batch with new random starts and once on each of as many other "
        "training batches (warm-started from the first check, as in a run). Scalar keys: "
        "relative difference to the first check; `shift` and `flattening` as published. "
        "Cells: median / max (valid readings / checks). "
        f"{result['seconds_per_check']:.1f} s per check.",
        "",
        "| key | value at first check | same batch, new start | other probe batch |",
        "|---|---:|---:|---:|",
    ]
    for key in SCALAR_KEYS + DIFF_KEYS:
        ref = result["reference"].get(key)
        shown = f"{ref:.4g}" if isinstance(ref, float) and math.isfinite(ref) else "n/a"
        lines.append(
            f"| `{key}` | {shown} | {_cell(result['same_batch'].get(key))} "
            f"| {_cell(result['other_batch'].get(key))} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def write_results(result: dict[str, Any]) -> None:
    OUT_JSON.write_text(json.dumps(result, indent=2, default=float) + "\n")
    results_md.write_section(OUT_MD, "noise-floor", markdown(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    result = run(args.steps, args.repeats, args.k, args.seed)
    write_results(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
