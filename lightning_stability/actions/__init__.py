"""Callbacks that act on instability events: learning-rate backoff, staged training, rollback,
and a guard that keeps each step's learning rate below the edge it would cross."""

from lightning_stability.actions.base import StabilityAction
from lightning_stability.actions.lr_backoff import LRBackoff
from lightning_stability.actions.lr_guard import LRGuard
from lightning_stability.actions.lr_scaling import scale_learning_rates
from lightning_stability.actions.optimizer_repair import AdamRepair
from lightning_stability.actions.rollback import Rollback
from lightning_stability.actions.snapshot import TrainingSnapshot
from lightning_stability.actions.staged_training import DEFAULT_STAGES, StagedTraining

__all__ = [
    "DEFAULT_STAGES",
    "AdamRepair",
    "LRBackoff",
    "LRGuard",
    "Rollback",
    "StabilityAction",
    "StagedTraining",
    "TrainingSnapshot",
    "scale_learning_rates",
]
