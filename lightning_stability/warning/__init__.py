"""The meta-state of a run: readings -> low-dimensional state -> deviation -> events."""

from lightning_stability.warning.early_warning import EarlyWarning, InstabilityWarning
from lightning_stability.warning.events import EventListener, InstabilityEvent, Level
from lightning_stability.warning.metastate import DEFAULT_SIGNALS, SignalSpec

__all__ = [
    "DEFAULT_SIGNALS",
    "EarlyWarning",
    "EventListener",
    "InstabilityEvent",
    "InstabilityWarning",
    "Level",
    "SignalSpec",
]
