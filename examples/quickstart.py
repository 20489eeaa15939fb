"""An unstable training run that the stability callbacks catch and rescue.

A digits MLP is trained with SGD (momentum 0.9) at a learning rate beyond the edge of
stability. Without the callbacks the run collapses to chance accuracy; with
``stability_callbacks(actions="backoff")`` the edge-of-stability ratio warns and the
learning rate is backed off, and when the loss falls back to where the run started (the
evidence of damage) the last known-good weights are restored, and the run finishes
healthy. Both runs log to TensorBoard.

    python examples/quickstart.py
    tensorboard --logdir runs/quickstart      # the "Stability" tab under CUSTOM SCALARS
    lightning-stability report runs/quickstart
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from demo_run import demo_trainer, quiet_console
from digits import DigitsClassifier, DigitsDataModule

from lightning_stability import StabilityDashboard
from lightning_stability.report import render_text


def train(lr: float, epochs: int, logdir: str, guarded: bool) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    trainer = demo_trainer(logdir, guarded, actions="backoff", max_epochs=epochs)
    trainer.fit(DigitsClassifier(lr=lr), DigitsDataModule())
    dashboard = next((cb for cb in trainer.callbacks if isinstance(cb, StabilityDashboard)), None)
    if dashboard is not None and dashboard.last_summary is not None:
        # the end-of-fit summary (logged at INFO, which quiet_console silences)
        print("\n" + render_text(dashboard.last_summary) + "\n")
    metrics = trainer.validate(trainer.lightning_module, DigitsDataModule(), verbose=False)[0]
    return {"val_loss": metrics["val_loss"], "val_acc": metrics["val_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.35, help="SGD learning rate (0.35)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--logdir", default="runs/quickstart")
    args = parser.parse_args()
    quiet_console()

    print(f"1/2 training at lr={args.lr} without the callbacks ...")
    bare = train(args.lr, args.epochs, args.logdir, guarded=False)
    print(f"    val_loss {bare['val_loss']:.3f}, val_acc {bare['val_acc']:.3f}\n")
    print("2/2 the same run with stability_callbacks(actions='backoff') ...")
    guarded = train(args.lr, args.epochs, args.logdir, guarded=True)
    print(f"\nwithout callbacks: val_loss {bare['val_loss']:.3f}, val_acc {bare['val_acc']:.3f}")
    print(
        f"with callbacks:    val_loss {guarded['val_loss']:.3f}, val_acc {guarded['val_acc']:.3f}"
    )
    print(f"\nTensorBoard logs: {args.logdir}  (tensorboard --logdir {args.logdir})")
    print(f"The report of both runs: lightning-stability report {args.logdir}")


if __name__ == "__main__":
    main()
