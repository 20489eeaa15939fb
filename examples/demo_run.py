"""What the demos share: a quiet console, events printed as they happen, and a Trainer
for the "without" / "with callbacks" pair of runs."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_stability import InstabilityEvent, SharpnessCadence, stability_callbacks
from lightning_stability.warning import InstabilityWarning


def print_event(event: InstabilityEvent, trainer: pl.Trainer, pl_module: pl.LightningModule):
    print(f"  !! {event.message}")


def quiet_console() -> None:
    """One torch thread (tiny models: extra intra-op threads only contend), events printed
    by :func:`print_event` instead of as Python warnings, Lightning's chatter off."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=InstabilityWarning)
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def demo_trainer(logdir: str, guarded: bool, actions: str, **trainer_kwargs: Any) -> pl.Trainer:
    """A CPU Trainer logging to TensorBoard under ``logdir/with_callbacks`` (the default
    stability set with ``actions``, curvature measured often because the run is short) or
    ``logdir/without`` (no callbacks)."""
    callbacks = (
        stability_callbacks(
            actions=actions,
            sharpness={"cadence": SharpnessCadence(every_n_steps=50, directional_every_n_steps=10)},
            warning={"on_event": print_event},
        )
        if guarded
        else []
    )
    return pl.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(logdir, name="with_callbacks" if guarded else "without"),
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
