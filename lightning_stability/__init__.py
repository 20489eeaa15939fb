"""Lightning callbacks that measure training stability, warn before collapse, and act.

The one-line use is ``Trainer(callbacks=stability_callbacks())``; see
:func:`stability_callbacks` for what it contains.
"""

from lightning_stability.actions import LRBackoff, LRGuard, Rollback, StagedTraining
from lightning_stability.dashboard import StabilityDashboard
from lightning_stability.defaults import stability_callbacks
from lightning_stability.probes import (
    AuditConfig,
    DriftCadence,
    DriftLimits,
    DriftProbe,
    GradientMonitor,
    LossMonitor,
    PerturbationAudit,
    RepresentationDriftMonitor,
    SharpnessCadence,
    SharpnessEstimator,
    SharpnessMeasures,
    SharpnessMonitor,
)
from lightning_stability.warning import (
    BandDamage,
    BandLeaving,
    BandShape,
    Baselines,
    DeviationThresholds,
    EarlyWarning,
    EdgeRule,
    InstabilityEvent,
    Level,
    LevelPolicy,
    LossBand,
    TrendTest,
)

__version__ = "0.1.0"

__all__ = [
    "AuditConfig",
    "BandDamage",
    "BandLeaving",
    "BandShape",
    "Baselines",
    "DeviationThresholds",
    "DriftCadence",
    "DriftLimits",
    "DriftProbe",
    "EarlyWarning",
    "EdgeRule",
    "GradientMonitor",
    "InstabilityEvent",
    "LRBackoff",
    "LRGuard",
    "Level",
    "LevelPolicy",
    "LossBand",
    "LossMonitor",
    "PerturbationAudit",
    "RepresentationDriftMonitor",
    "Rollback",
    "SharpnessCadence",
    "SharpnessEstimator",
    "SharpnessMeasures",
    "SharpnessMonitor",
    "StabilityDashboard",
    "StagedTraining",
    "TrendTest",
    "stability_callbacks",
]
