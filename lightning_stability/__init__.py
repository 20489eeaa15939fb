"""Lightning callbacks that measure training stability, warn before collapse, and act.

The one-line use is ``Trainer(callbacks=stability_callbacks())``; see
:func:`stability_callbacks` for what it contains.
"""

from lightning_stability.actions import LRBackoff, LRGuard, Rollback, StagedTraining
from lightning_stability.dashboard import StabilityDashboard
from lightning_stability.defaults import stability_callbacks
from lightning_stability.probes import (
    GradientMonitor,
    LossMonitor,
    PerturbationAudit,
    RepresentationDriftMonitor,
    SharpnessMonitor,
)
from lightning_stability.warning import EarlyWarning, InstabilityEvent, Level

__version__ = "0.1.0"

__all__ = [
    "EarlyWarning",
    "GradientMonitor",
    "InstabilityEvent",
    "LRBackoff",
    "LRGuard",
    "Level",
    "LossMonitor",
    "PerturbationAudit",
    "RepresentationDriftMonitor",
    "Rollback",
    "SharpnessMonitor",
    "StabilityDashboard",
    "StagedTraining",
    "stability_callbacks",
]
