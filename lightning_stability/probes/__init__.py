"""Callbacks that measure a run without changing it."""

from lightning_stability.probes.audit import PerturbationAudit
from lightning_stability.probes.base import LossFn, Reading, StabilityProbe, module_loss
from lightning_stability.probes.drift import RepresentationDriftMonitor

__all__ = [
    "LossFn",
    "PerturbationAudit",
    "Reading",
    "RepresentationDriftMonitor",
    "StabilityProbe",
    "module_loss",
]
