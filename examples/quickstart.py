"""An unstable training run that the stability callbacks catch and rescue.

A digits MLP is trained with SGD (momentum 0.9) at a learning rate beyond the edge of
stability. Without the callbacks the run collapses to chance accuracy; with
``stability_callbacks(actions="backoff")`` the early warning fires as the meta-state
deviates, the learning rate is backed off (and the last good weights restored if the loss
goes non-finite), and the run finishes healthy. Both runs log to TensorBoard.

    python examples/quickstart.py
    tensorboard --logdir runs/quickstart      # the "Stability" tab under CUSTOM SCALARS
    lightning-stability report runs/quickstart
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning.pytorch as pl
import torch
from digits import DigitsClassifier, DigitsDataModule
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_stability import InstabilityEvent, stability_callbacks
from lightning_stability.warning import InstabilityWarning


def print_event(event: InstabilityEvent, trainer: pl.Trainer, pl_module: pl.LightningModule):
    print(f"  !! {event.message}")


def train(lr: float, epochs: int, logdir: str, guarded: bool) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    callbacks = (
        stability_callbacks(
            actions="backoff",
            # short run: measure curvature often (the defaults suit long runs)
            sharpness={"every_n_steps": 50, "directional_every_n_steps": 10},
            warning={"on_event": print_event},
        )
        if guarded
        else []
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=TensorBoardLogger(logdir, name="with_callbacks" if guarded else "without"),
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(lr=lr), DigitsDataModule())
    metrics = trainer.validate(trainer.lightning_module, DigitsDataModule(), verbose=False)[0]
    return {"val_loss": metrics["val_loss"], "val_acc": metrics["val_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.35, help="SGD learning rate (0.35)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--logdir", default="runs/quickstart")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: extra intra-op threads only contend
    warnings.filterwarnings("ignore", category=InstabilityWarning)  # printed by print_event
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

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


if __name__ == "__main__":
    main()
