"""A training run under FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) on two CPU
gloo processes, or its single-process reference, writing what it saw as JSON per rank.

Run by ``tests/test_fsdp.py`` in a subprocess with a clean environment::

    python tests/fsdp_run.py OUT_DIR --mode fsdp|single [--steps N] [--rollback-at S]

Both modes see the same batches in the same order: the sampler is our own (every rank
takes the same contiguous half of each global batch), so a single process with the full
global batch computes the gradient the two ranks average.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_stability import stability_callbacks
from lightning_stability.actions import Rollback
from lightning_stability.estimators.sharding import all_finite, local_shard
from lightning_stability.probes import GradientMonitor, SharpnessMonitor

GLOBAL_BATCH = 32
WORLD = 2


def data(n: int = 512, d: int = 8, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


class RankSlices(Sampler[int]):
    """Global batch ``b`` is indices ``[b*G, (b+1)*G)``; rank ``r`` of ``world`` takes the
    ``r``-th contiguous part of it (``world=1``: all of it)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        per = GLOBAL_BATCH // self.world
        for b in range(self.n // GLOBAL_BATCH):
            start = b * GLOBAL_BATCH + self.rank * per
            yield from range(start, start + per)

    def __len__(self) -> int:
        return (self.n // GLOBAL_BATCH) * (GLOBAL_BATCH // self.world)


class Model(pl.LightningModule):
    def __init__(self, sharded: bool, nan_at: int) -> None:
        super().__init__()
        self.nan_at = nan_at
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
        )
        self.sharded = sharded

    def configure_model(self) -> None:
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.trainer.global_step == self.nan_at:
            loss = loss * float("nan")  # a damaged step: the rollback's cue
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size
        ds = data()
        sampler = RankSlices(len(ds), self.trainer.global_rank, world)
        return DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_state(trainer, pl_module) -> dict[str, Any]:
    """Clones of this rank's weight shards and optimizer state (local shards)."""
    return {
        "weights": [local_shard(p).detach().clone() for p in pl_module.parameters()],
        "optimizer": [
            {k: local_shard(v).clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
            for s in trainer.optimizers[0].state.values()
        ],
    }


def same_state(a: dict[str, Any], b: dict[str, Any]) -> dict[str, bool]:
    weights = len(a["weights"]) == len(b["weights"]) and all(
        torch.equal(x, y) for x, y in zip(a["weights"], b["weights"])
    )
    optimizer = len(a["optimizer"]) == len(b["optimizer"]) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a["optimizer"], b["optimizer"])
    )
    return {"weights_equal": weights, "optimizer_equal": optimizer}


def event_list(trainer) -> list[list[Any]]:
    """Every event of the early warning and of the actions, as plain values."""
    out = []
    for cb in trainer.callbacks:
        for e in getattr(cb, "events", None) or []:
            out.append([type(cb).__name__, int(e.step), str(e.level), str(e.source), e.message])
    return out


class Record(Callback):
    """Collects readings and states; writes ``rank<r>.json`` at the end of fit.

    At every step where :class:`Rollback` takes a snapshot it keeps its own clone of the
    local shards and optimizer state; when a rollback happens it compares the restored
    state with the clone taken at the step rolled back to."""

    def __init__(self, out: Path, every: int) -> None:
        self.out = out
        self.every = every
        self.grad_norms: dict[int, float] = {}
        self.clip_events: dict[int, float] = {}
        self.lambdas: dict[int, float] = {}
        self.states: dict[int, dict[str, Any]] = {}
        self.rollbacks: list[dict[str, Any]] = []
        self.published: dict[int, list[str]] = {}
        self.subset_lambdas: dict[int, float] = {}
        self.grads_kept: dict[int, bool] = {}
        self._grads: list[Any] = []
        self.seen = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.states[trainer.global_step] = local_state(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        mon = next(cb for cb in trainer.callbacks if isinstance(cb, GradientMonitor))
        reading = mon.readings.get("stability/grad/norm")
        if reading is not None and reading.step == trainer.global_step:
            self.grad_norms[trainer.global_step] = reading.value
        clip = mon.readings.get("stability/grad/clip_event")
        if clip is not None and clip.step == trainer.global_step:
            self.clip_events[trainer.global_step] = clip.value
        self._grads = [
            None if p.grad is None else local_shard(p.grad).clone() for p in pl_module.parameters()
        ]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        sharp = next(cb for cb in trainer.callbacks if isinstance(cb, SharpnessMonitor))
        reading = sharp.readings.get("stability/sharpness/lambda_max")
        if reading is not None:
            self.lambdas[reading.step] = reading.value
        keys = [
            key
            for cb in trainer.callbacks
            for key, r in getattr(cb, "readings", {}).items()
            if r.step == step and ("sharpness" in key or "cka" in key)
        ]
        if keys:
            self.published[step] = sorted(set(self.published.get(step, [])) | set(keys))
        subset = [cb for cb in trainer.callbacks if isinstance(cb, SharpnessMonitor)][1]
        reading = subset.readings.get("stability/sharpness/lambda_max")
        if reading is not None:
            self.subset_lambdas[reading.step] = reading.value
        if step % self.every == 0:  # the monitors measured at this step: .grad as it was
            now = [None if p.grad is None else local_shard(p.grad) for p in pl_module.parameters()]
            self.grads_kept[step] = all(
                (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                for a, b in zip(now, self._grads)
            )
        rb = next(cb for cb in trainer.callbacks if isinstance(cb, Rollback))
        if rb.rollbacks > self.seen:
            self.seen = rb.rollbacks
            to_step = int(rb.events[-1].details["to_step"])
            result = same_state(local_state(trainer, pl_module), self.states[to_step])
            self.rollbacks.append({"step": step, "to_step": to_step, **result})
        elif step % self.every == 0:
            self.states[step] = local_state(trainer, pl_module)

    @staticmethod
    def _finite_checks(pl_module) -> list[bool]:
        """``all_finite`` of the weights, then of a copy with one NaN in rank 0's shard
        only: every rank must give the same answers."""
        clean = [p.detach().clone() for p in pl_module.parameters()]
        damaged = [p.detach().clone() for p in pl_module.parameters()]
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            local_shard(damaged[0]).view(-1)[0] = float("nan")
        return [all_finite(clean), all_finite(damaged)]

    def on_fit_end(self, trainer, pl_module) -> None:
        readings = {}
        for cb in trainer.callbacks:
            for key, r in getattr(cb, "readings", {}).items():
                readings[key] = r.value
        result = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "global_step": trainer.global_step,
            "sharded": any(hasattr(p, "to_local") for p in pl_module.parameters()),
            "grad_norms": self.grad_norms,
            "clip_events": self.clip_events,
            "lambdas": self.lambdas,
            "subset_lambdas": self.subset_lambdas,
            "grads_kept": self.grads_kept,
            "events": event_list(trainer),
            "rollbacks": self.rollbacks,
            "readings": readings,
            "published": self.published,
            "all_finite": self._finite_checks(pl_module),
            "weights": [full(p.detach()).reshape(-1).tolist() for p in pl_module.parameters()],
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


class DestroyProcessGroup(Callback):
    def teardown(self, trainer, pl_module, stage) -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", choices=("fsdp", "single"), default="fsdp")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--nan-at", type=int, default=-1)
    parser.add_argument("--rollback-every", type=int, default=10)
    parser.add_argument("--clip-value", type=float, default=0.0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    callbacks = stability_callbacks(
        actions="staged",
        sharpness={
            "every_n_steps": args.check_every,
            "directional_every_n_steps": args.check_every,
            "max_iter": 30,
            "tol": 1e-4,
            "adaptive": False,
        },
        drift={"every_n_steps": args.check_every, "min_steps": 0},
        rollback={"every": args.rollback_every},
        dashboard=False,
    )
    # a second monitor on a curvature subset (the last layer), beside the full one
    callbacks.insert(
        1,
        SharpnessMonitor(
            every_n_steps=args.check_every,
            directional=False,
            adaptive=False,
            tol=1e-4,
            params=["net.4"],
        ),
    )
    callbacks.append(Record(out, args.rollback_every))
    sharded = args.mode == "fsdp"
    if sharded:
        from lightning.pytorch.strategies import ModelParallelStrategy

        callbacks.append(DestroyProcessGroup())
        strategy: Any = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
        devices = WORLD
    else:
        strategy, devices = "auto", 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        gradient_clip_val=args.clip_value or None,
        gradient_clip_algorithm="value" if args.clip_value else None,
        callbacks=callbacks,
    )
    trainer.fit(Model(sharded, args.nan_at))
    if not math.isfinite(trainer.global_step):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
