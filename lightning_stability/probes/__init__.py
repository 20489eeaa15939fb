"""Callbacks that measure a run without changing it."""

from lightning_stability.probes.base import LossFn, Reading, StabilityProbe, module_loss

__all__ = ["LossFn", "Reading", "StabilityProbe", "module_loss"]
