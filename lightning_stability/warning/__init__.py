"""The meta-state of a run: readings -> low-dimensional state -> deviation -> events."""

from lightning_stability.warning.config import (
    BandDamage,
    BandLeaving,
    BandShape,
    Baselines,
    DeviationThresholds,
    EdgeRule,
    LevelPolicy,
    TrendTest,
)
from lightning_stability.warning.early_warning import EarlyWarning, InstabilityWarning
from lightning_stability.warning.events import EventListener, InstabilityEvent, Level
from lightning_stability.warning.loss_band import LossBand
from lightning_stability.warning.metastate import DEFAULT_SIGNALS, SignalSpec

__all__ = [
    "DEFAULT_SIGNALS",
    "BandDamage",
    "BandLeaving",
    "BandShape",
    "Baselines",
    "DeviationThresholds",
    "EarlyWarning",
    "EdgeRule",
    "EventListener",
    "InstabilityEvent",
    "InstabilityWarning",
    "Level",
    "LevelPolicy",
    "LossBand",
    "SignalSpec",
    "TrendTest",
]
