"""Scale learning rates so that the cut survives every learning-rate scheduler.

A scheduler recomputes the learning rate from references it keeps on the side:
``base_lrs`` (closed forms, ``LambdaLR``), ``initial_lr``/``max_lr``/``min_lr`` in the
param groups (``OneCycleLR``), ``max_lrs`` (``CyclicLR``), ``min_lrs``
(``ReduceLROnPlateau``), ``eta_min`` (cosine schedules) and the child schedulers of
``SequentialLR``/``ChainedScheduler``. Scaling only ``param_group["lr"]`` is undone at
the scheduler's next step; scaling every reference by the same factor multiplies the
whole remaining trajectory by that factor.

Floors are scaled too (``eta_min``, ``min_lr``, ``min_lrs``): the cut means "the same
schedule at a smaller learning rate", so the schedule's shape, floor included, is kept.
``eta_min`` is one number shared by all groups of a cosine scheduler; it is scaled by the
first group's factor (groups are normally cut by the same factor).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["group_factors", "scale_learning_rates", "schedulers_of"]

# Param-group keys that schedulers read as references (OneCycleLR, and the ``initial_lr``
# every LRScheduler writes at construction).
_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# Per-group lists kept on scheduler objects.
_SCHEDULER_LISTS = ("base_lrs", "max_lrs", "min_lrs", "_last_lr")


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        # Tensor learning rates (capturable/fused optimizers) are updated in place so that
        # any graph or reference holding them sees the new value.
        value.mul_(factor)
        return value
    return value * factor


def group_factors(optimizer: Optimizer, factor: float | Sequence[float]) -> list[float]:
    """One factor per param group of ``optimizer`` (a scalar is broadcast)."""
    n = len(optimizer.param_groups)
    if isinstance(factor, (int, float)):
        return [float(factor)] * n
    factors = [float(f) for f in factor]
    if len(factors) != n:
        raise ValueError(f"factor: expected {n} values (one per param group), got {len(factors)}")
    return factors


def _scale_scheduler(scheduler: Any, factors: list[float]) -> None:
    for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _scale_scheduler(child, factors)
    for attr in _SCHEDULER_LISTS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and len(values) == len(factors):
            setattr(scheduler, attr, [_scaled(v, f) for v, f in zip(values, factors)])
    if isinstance(getattr(scheduler, "eta_min", None), (int, float)):
        scheduler.eta_min = scheduler.eta_min * factors[0]


def scale_learning_rates(
    optimizer: Optimizer,
    factor: float | Sequence[float],
    schedulers: Iterable[Any] = (),
) -> list[float]:
    """Multiply the learning rate of every param group of ``optimizer`` by ``factor``
    (a scalar or one value per group), together with every reference the given
    ``schedulers`` of that optimizer keep, so that the cut persists through their steps.

    Works with every ``torch.optim.lr_scheduler`` class, ``ReduceLROnPlateau`` included.
    Returns the per-group factors applied.
    """
    factors = group_factors(optimizer, factor)
    for group, f in zip(optimizer.param_groups, factors):
        for key in _GROUP_KEYS:
            if key in group and group[key] is not None:
                group[key] = _scaled(group[key], f)
    for scheduler in schedulers:
        _scale_scheduler(scheduler, factors)
    return factors


def schedulers_of(optimizer: Optimizer, schedulers: Iterable[Any]) -> list[Any]:
    """The schedulers in ``schedulers`` that drive ``optimizer``."""
    return [s for s in schedulers if getattr(s, "optimizer", None) is optimizer]
