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
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from demo_run import demo_trainer, quiet_console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmark's task code
from benchmarks.scenarios.perturbations import RoutingFeedback
from benchmarks.scenarios.tasks import MLP
from lightning_stability import StagedTraining


def run(lr: float, steps: int, logdir: str, guarded: bool, seed: int) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    module = MLP(8, 1, hidden=32, depth=2, task="regression", lr=lr, optimizer="sgd")
    env = RoutingFeedback(module, deploy_step=100, seed=seed)
    trainer = demo_trainer(logdir, guarded, actions="staged", max_steps=steps)
    trainer.fit(module, env)
    with torch.no_grad():
        x, y = next(iter(env.val_loader()))
        mse = float(torch.nn.functional.mse_loss(module(x).squeeze(-1), y))
    staged = next((cb for cb in trainer.callbacks if isinstance(cb, StagedTraining)), None)
    return {"route_mse": mse, "stage": staged.stage if staged is not None else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs/feedback_loop")
    args = parser.parse_args()
    quiet_console()

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
