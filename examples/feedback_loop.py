"""The feedback-loop story: a routing model whose predictions shape its next data.

A model predicts each delivery route's travel time. Once deployed, it routes a growing
share of the traffic to the routes it predicts fast; that traffic congests those routes,
so the data the model learns from next is produced by its own predictions. Past a
critical share the loop amplifies its own errors and training destabilises (the story in
the project's background texts). The run is trained twice: without the callbacks, and with
``stability_callbacks(actions="staged")``, where the early warning escalates the run
through safer stages (lower learning rate, harder clipping, gradient accumulation that
delays updates until more data has accumulated).

    python examples/feedback_loop.py
    tensorboard --logdir runs/feedback_loop
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmark's task code
from benchmarks.scenarios.perturbations import RoutingFeedback
from benchmarks.scenarios.tasks import MLP
from lightning_stability import InstabilityEvent, StagedTraining, stability_callbacks
from lightning_stability.warning import InstabilityWarning


def print_event(event: InstabilityEvent, trainer: pl.Trainer, pl_module: pl.LightningModule):
    print(f"  !! {event.message}")


def run(lr: float, steps: int, logdir: str, guarded: bool, seed: int) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    module = MLP(8, 1, hidden=32, depth=2, task="regression", lr=lr, optimizer="sgd")
    env = RoutingFeedback(module, deploy_step=100, seed=seed)
    callbacks = (
        stability_callbacks(
            actions="staged",
            sharpness={"every_n_steps": 50, "directional_every_n_steps": 10},
            warning={"on_event": print_event},
        )
        if guarded
        else []
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=TensorBoardLogger(logdir, name="with_callbacks" if guarded else "without"),
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, env)
    with torch.no_grad():
        x, y = next(iter(env.val_loader()))
        mse = float(torch.nn.functional.mse_loss(module(x).squeeze(-1), y))
    staged = next((cb for cb in callbacks if isinstance(cb, StagedTraining)), None)
    return {"route_mse": mse, "stage": staged.stage if staged is not None else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs/feedback_loop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=InstabilityWarning)  # printed by print_event
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    print("1/2 the routing model without the callbacks ...")
    bare = run(args.lr, args.steps, args.logdir, guarded=False, seed=args.seed)
    print(f"    error on all routes (MSE) {bare['route_mse']:.3g}\n")
    print("2/2 the same run with stability_callbacks(actions='staged') ...")
    guarded = run(args.lr, args.steps, args.logdir, guarded=True, seed=args.seed)

    def fmt(value: float) -> str:
        return f"{value:.3g}" if math.isfinite(value) else str(value)

    print(f"\nwithout callbacks: route MSE {fmt(bare['route_mse'])}")
    print(f"with callbacks:    route MSE {fmt(guarded['route_mse'])}, stage {guarded['stage']}")
    print(f"\nTensorBoard logs: {args.logdir}")


if __name__ == "__main__":
    main()
