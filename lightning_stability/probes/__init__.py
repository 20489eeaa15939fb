"""Callbacks that measure a run without changing it."""

from lightning_stability.probes.audit import PerturbationAudit
from lightning_stability.probes.base import LossFn, Reading, StabilityProbe, module_loss
from lightning_stability.probes.drift import RepresentationDriftMonitor
from lightning_stability.probes.gradients import GradientMonitor
from lightning_stability.probes.loss import PER_SAMPLE_LOSS_KEY, LossMonitor
from lightning_stability.probes.sharpness import SharpnessMonitor

__all__ = [
    "PER_SAMPLE_LOSS_KEY",
    "GradientMonitor",
    "LossFn",
    "LossMonitor",
    "PerturbationAudit",
    "Reading",
    "RepresentationDriftMonitor",
    "SharpnessMonitor",
    "StabilityProbe",
    "module_loss",
]
