"""When :class:`~lightning_stability.probes.drift.RepresentationDriftMonitor` checks: at
epoch ends (every ``every_n_epochs``-th, at least ``min_steps`` steps after the previous
check, and the fit's last), or every ``every_n_steps`` steps where epochs are longer than
that or of unknown length."""

from __future__ import annotations

import math

import lightning.pytorch as pl

__all__ = ["checks_by_epoch", "epoch_check_due", "last_epoch", "step_check_due", "steps_per_epoch"]


def checks_by_epoch(
    trainer: pl.Trainer, every_n_epochs: int | None, every_n_steps: int | None
) -> bool:
    """Whether checks follow epoch ends (``True``) rather than ``every_n_steps``: epoch
    checks are asked for and, with a step interval too, ``every_n_epochs`` epochs of known
    length take no more than ``every_n_steps`` steps."""
    if not every_n_epochs:
        return False
    if every_n_steps is None:
        return True
    steps = steps_per_epoch(trainer)
    return steps is not None and every_n_epochs * steps <= every_n_steps


def step_check_due(
    step: int, by_epoch: bool, every_n_steps: int | None, last_check_step: int
) -> bool:
    """Whether a check is due at the end of the batch that brought the run to ``step``."""
    return (
        not by_epoch
        and every_n_steps is not None
        and step % every_n_steps == 0
        and step != last_check_step
    )


def epoch_check_due(
    trainer: pl.Trainer,
    by_epoch: bool,
    every_n_epochs: int | None,
    min_steps: int,
    last_check_step: int,
) -> bool:
    """Whether a check is due at the end of the epoch ending now: an ``every_n_epochs``-th
    epoch ``min_steps`` or more steps after the previous check, or the fit's last epoch;
    never twice at one step."""
    step = trainer.global_step
    due = (
        by_epoch
        and (trainer.current_epoch + 1) % every_n_epochs == 0
        and step - last_check_step >= min_steps
    )
    return (due or last_epoch(trainer)) and step != last_check_step


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps in one training epoch, ``None`` when unknown (an iterable loader)."""
    batches = trainer.num_training_batches
    if not isinstance(batches, int) and not (isinstance(batches, float) and math.isfinite(batches)):
        return None
    return max(1, math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches)))


def last_epoch(trainer: pl.Trainer) -> bool:
    """Whether the epoch ending now is the fit's last (max_epochs or max_steps reached)."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    return max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps
