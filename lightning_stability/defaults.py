"""The default set of callbacks: ``Trainer(callbacks=stability_callbacks())``."""

from __future__ import annotations

import inspect
from typing import Any, Literal, get_args

from lightning.pytorch.callbacks import Callback

from lightning_stability.actions import LRBackoff, LRGuard, Rollback, StagedTraining
from lightning_stability.configuration import FlatAliases, regroup
from lightning_stability.dashboard import StabilityDashboard
from lightning_stability.probes import (
    GradientMonitor,
    LossMonitor,
    RepresentationDriftMonitor,
    SharpnessMonitor,
)
from lightning_stability.probes.config import (
    DRIFT_FLAT_ALIASES,
    SHARPNESS_FLAT_ALIASES,
    DriftCadence,
    DriftLimits,
    DriftProbe,
    SharpnessCadence,
    SharpnessEstimator,
    SharpnessMeasures,
)
from lightning_stability.vocabulary import check_choice
from lightning_stability.warning import EarlyWarning
from lightning_stability.warning.config import (
    EARLY_WARNING_FLAT_ALIASES,
    Baselines,
    DeviationThresholds,
    EdgeRule,
    LevelPolicy,
    TrendTest,
)

__all__ = ["stability_callbacks"]

# The callbacks whose settings are grouped: a dict option may use the grouped arguments
# (``cadence=SharpnessCadence(...)``) or the flat names of their fields, folded in here.
_GROUPED: dict[type[Callback], tuple[FlatAliases, dict[str, type]]] = {
    SharpnessMonitor: (
        SHARPNESS_FLAT_ALIASES,
        {
            "cadence": SharpnessCadence,
            "estimator": SharpnessEstimator,
            "measures": SharpnessMeasures,
        },
    ),
    RepresentationDriftMonitor: (
        DRIFT_FLAT_ALIASES,
        {"cadence": DriftCadence, "probe": DriftProbe, "limits": DriftLimits},
    ),
    EarlyWarning: (
        EARLY_WARNING_FLAT_ALIASES,
        {
            "deviation": DeviationThresholds,
            "levels": LevelPolicy,
            "baselines": Baselines,
            "trend": TrendTest,
            "edge": EdgeRule,
        },
    ),
}

Actions = Literal["none", "backoff", "staged"]
_ACTIONS: tuple[str, ...] = get_args(Actions)


def stability_callbacks(
    *,
    actions: Actions = "none",
    sharpness: bool | dict[str, Any] = True,
    gradients: bool | dict[str, Any] = True,
    loss: bool | dict[str, Any] = True,
    drift: bool | dict[str, Any] = True,
    warning: bool | dict[str, Any] = True,
    rollback: bool | dict[str, Any] = True,
    lr_guard: bool | dict[str, Any] = False,
    dashboard: bool | dict[str, Any] = True,
) -> list[Callback]:
    """A sensible, ordered set of stability callbacks.

    Probes come first, then the early warning, then actions (so that an event raised at a
    step is acted on at that same step boundary), then the dashboard.

    Args:
        actions: what may change training. ``"none"`` (default) only measures and warns;
            ``"backoff"`` halves the learning rate on each warning and ramps it back
            over 100 steps after 100 calm ones, never above a level at which trouble
            returned, each failed return doubling the wait (:class:`LRBackoff`);
            ``"staged"`` climbs the default ladder of safer stages (:class:`StagedTraining`).
            With either, :class:`Rollback` restores the last good state on a critical
            event unless ``rollback=False``.
        lr_guard: add :class:`LRGuard`, which lowers a step's learning rate when the step
            would cross the edge of stability by more than its margin and gives the
            schedule back at once. Off by default; needs ``sharpness``.
        sharpness, gradients, loss, drift, warning, rollback, dashboard: ``True`` for the
            default configuration, ``False`` to leave the callback out, or a dict of init
            arguments: the grouped configs (``{"cadence": SharpnessCadence(every_n_steps=500)}``)
            or the names of their fields (``{"every_n_steps": 500}``), which are folded
            into their group without a deprecation warning. Representation drift
            (:class:`RepresentationDriftMonitor`) runs the module's own ``training_step``
            on a fixed probe batch of 64 samples, so it needs neither ``forward`` nor a
            known batch layout. It checks at epoch ends at least
            500 optimizer steps apart (and at the end of the last epoch), or every 1000 steps
            where epochs are longer. A check costs about one forward pass of the probe
            batch, on the order of a training step, which is why checks are hundreds of
            steps apart; ``python -m benchmarks.drift`` reports its share of training
            time at this cadence (``benchmarks/RESULTS.md``).

    Raises:
        ValueError: ``actions`` is not one of ``"none"``, ``"backoff"``, ``"staged"``, a
            callback option is neither a bool nor a dict, or a dict names an argument the
            callback does not take.
    """
    check_choice(actions, "actions", _ACTIONS)

    def build(option: bool | dict[str, Any], name: str, cls: type[Callback]) -> list[Callback]:
        if option is False:
            return []
        if option is True:
            return [cls()]
        if isinstance(option, dict):
            aliases, groups = _GROUPED.get(cls, ({}, {}))
            allowed = [
                n
                for n, p in inspect.signature(cls).parameters.items()
                if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
            ] + [n for n in aliases if n not in groups]
            unknown = sorted(set(option) - set(allowed))
            if unknown:
                raise ValueError(
                    f"{name}: unknown argument(s) {unknown} for {cls.__name__}; allowed: {allowed}"
                )
            flat = {k: v for k, v in option.items() if k in aliases and k not in groups}
            kwargs = {k: v for k, v in option.items() if k not in flat}
            if flat:
                given = {g: (c, kwargs.get(g)) for g, c in groups.items()}
                kwargs.update(regroup(cls.__name__, flat, aliases, given, warn=False))
            return [cls(**kwargs)]
        raise ValueError(f"{name} must be True, False or a dict of init arguments, got {option!r}")

    callbacks: list[Callback] = [
        *build(sharpness, "sharpness", SharpnessMonitor),
        *build(gradients, "gradients", GradientMonitor),
        *build(loss, "loss", LossMonitor),
        *build(drift, "drift", RepresentationDriftMonitor),
        *build(warning, "warning", EarlyWarning),
    ]
    if actions != "none":
        if warning is False:
            raise ValueError("actions need the early warning: set warning=True or actions='none'")
        if actions == "backoff":
            # Ramp back after 100 calm steps: a transient incident should not cost the
            # rest of the run its learning rate.
            callbacks.append(LRBackoff(calm_steps=100, recovery_steps=100))
        else:
            callbacks += build(True, "actions", StagedTraining)
        callbacks += build(rollback, "rollback", Rollback)
    if lr_guard is not False and sharpness is False:
        raise ValueError(
            "lr_guard needs the sharpness monitor: set sharpness=True or lr_guard=False"
        )
    callbacks += build(lr_guard, "lr_guard", LRGuard)
    callbacks += build(dashboard, "dashboard", StabilityDashboard)
    return callbacks
