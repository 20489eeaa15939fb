"""Per-epoch cost of RepresentationDriftMonitor on the reference task.

One check (probe forward in eval mode + debiased CKA of every watched layer against the
previous and the first check) is timed inside the callback; an epoch of bare training is
timed by a callback around the epoch (in quick mode over ``limit_train_batches`` batches
and scaled to the full epoch). The figure is ``check seconds / epoch seconds``: the
fraction added to each epoch by the default once-per-epoch check. An end-to-end ratio
(with / bare, same process, alternating runs) is printed as a cross-check.

    python -m benchmarks.drift --quick      # 10-batch epochs, 2 repeats
    python -m benchmarks.drift              # full epochs

Writes ``benchmarks/drift.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.reference import reference_dataloader, reference_module
from lightning_stability.probes.drift import RepresentationDriftMonitor

OUT = Path(__file__).with_name("drift.json")


class _TimedMonitor(RepresentationDriftMonitor):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check_seconds: list[float] = []

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        start = time.perf_counter()
        values = super().measure(trainer, pl_module)
        self.check_seconds.append(time.perf_counter() - start)
        return values


class _EpochTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Registered before the monitor, so its epoch-end check is not counted here.
        self.seconds.append(time.perf_counter() - self._start)


def _fit(callbacks: list[Callback], epochs: int, batches: int | float, seed: int = 0) -> float:
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(reference_module(), reference_dataloader(seed=seed))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10-batch epochs, 2 repeats")
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    epochs = 2
    batches: int | float = 10 if args.quick else 1.0
    repeats = args.repeats or (2 if args.quick else 3)
    steps_per_epoch = len(reference_dataloader())

    _fit([], epochs=1, batches=3)  # warm-up: imports, allocator, first-call costs
    bare_s, with_s, epoch_s, check_s = [], [], [], []
    layers: list[str] = []
    for i in range(repeats):
        for use in (False, True) if i % 2 == 0 else (True, False):
            timer = _EpochTimer()
            if use:
                monitor = _TimedMonitor(probe_size=args.probe_size, source="train")
                with_s.append(_fit([timer, monitor], epochs, batches))
                check_s.extend(monitor.check_seconds)
                layers = monitor.layer_names
            else:
                bare_s.append(_fit([timer], epochs, batches))
                epoch_s.extend(timer.seconds)
    measured_batches = steps_per_epoch if batches == 1.0 else int(batches)
    epoch_full = statistics.median(epoch_s) * steps_per_epoch / measured_batches
    check = statistics.median(check_s)
    result = {
        "task": "reference char-LM (benchmarks/reference.py)",
        "quick": args.quick,
        "probe_size": args.probe_size,
        "layers": layers,
        "steps_per_epoch": steps_per_epoch,
        "check_s": check,
        "epoch_s": epoch_full,
        "per_epoch_overhead_pct": 100.0 * check / epoch_full,
        "end_to_end_ratio": statistics.median(with_s) / statistics.median(bare_s),
        "end_to_end_epochs": epochs,
        "end_to_end_batches_per_epoch": measured_batches,
        "all_check_s": check_s,
        "all_epoch_s": epoch_s,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"{'probe':>6} {'layers':>6} {'check s':>8} {'epoch s':>8} {'per-epoch':>10} {'e2e':>6}")
    print(
        f"{args.probe_size:>6} {len(layers):>6} {check:8.3f} {epoch_full:8.2f} "
        f"{result['per_epoch_overhead_pct']:9.1f}% {result['end_to_end_ratio']:6.3f}"
    )
    OUT.write_text(json.dumps(result, indent=2))
    print(f"wrote {OUT}")
    return result


if __name__ == "__main__":
    main()
