"""Callbacks that measure a run without changing it."""

from lightning_stability.estimators.perturbation import AuditConfig
from lightning_stability.probes.audit import PerturbationAudit
from lightning_stability.probes.base import LossFn, Reading, StabilityProbe, module_loss
from lightning_stability.probes.config import (
    DriftCadence,
    DriftLimits,
    DriftProbe,
    SharpnessCadence,
    SharpnessEstimator,
    SharpnessMeasures,
)
from lightning_stability.probes.drift import RepresentationDriftMonitor
from lightning_stability.probes.gradients import GradientMonitor
from lightning_stability.probes.loss import PER_SAMPLE_LOSS_KEY, LossMonitor
from lightning_stability.probes.sharpness import SharpnessMonitor

__all__ = [
    "PER_SAMPLE_LOSS_KEY",
    "AuditConfig",
    "DriftCadence",
    "DriftLimits",
    "DriftProbe",
    "GradientMonitor",
    "LossFn",
    "LossMonitor",
    "PerturbationAudit",
    "Reading",
    "RepresentationDriftMonitor",
    "SharpnessCadence",
    "SharpnessEstimator",
    "SharpnessMeasures",
    "SharpnessMonitor",
    "StabilityProbe",
    "module_loss",
]
