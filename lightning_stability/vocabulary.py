"""The package's one vocabulary: names of readings and tags, level names, stability
dimensions, and the validators every configuration uses. Pure Python, no Lightning
import, so that every layer (estimators included) can import it.

Terms, one per idea:

* **reading**: one value a probe publishes at a step (``sharpness/eos_ratio``); its
  **key** is the name it is logged under, the reading's name below :data:`PREFIX`
  (``stability/sharpness/eos_ratio``). The constants below are keys.
* **signal**: a reading as the meta-state consumes it (on which scale, along which
  dimension; :class:`~lightning_stability.warning.metastate.SignalSpec`), and an
  **observation** is one step's value of a signal.
* **level**: the run's state, one of :data:`LEVEL_NAMES` (:class:`Level`).
* **dimension**: one of the four axes of training stability, :data:`DIMENSIONS`, shared
  by the meta-state and the perturbation audit.
* **patience**: consecutive steps of evidence before a level rises; **calm_steps**:
  consecutive steps below a level before an action relaxes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import IntEnum
from typing import Any

__all__ = [
    "ACTIONS",
    "ACTION_LR_GUARD_SCALE",
    "ACTION_LR_SCALE",
    "ACTION_ROLLBACKS",
    "ACTION_SKIPPED_STEPS",
    "ACTION_STAGE",
    "ACTIVATION_DEAD_FRACTION",
    "AUDIT_LR_MARGIN",
    "CKA_HEATMAP",
    "CKA_MIN",
    "DIMENSIONS",
    "EVENTS",
    "GRAD_CLIP_EVENT",
    "GRAD_CLIP_RATE",
    "GRAD_CLIP_THRESHOLD",
    "GRAD_NONFINITE",
    "GRAD_NORM",
    "GRAD_NORM_AC1",
    "GRAD_NORM_VAR",
    "GRAD_UPDATE_RATIO",
    "GRAD_WEIGHT_NORM",
    "LEVEL_NAMES",
    "LOSS_AC1",
    "LOSS_NONFINITE",
    "LOSS_SAMPLE_MAX",
    "LOSS_SAMPLE_Q",
    "LOSS_SPREAD",
    "LOSS_TAIL_MAX",
    "LOSS_TAIL_Q",
    "LOSS_VALUE",
    "LOSS_VAR",
    "META_DEVIATION",
    "META_LEVEL",
    "PREFIX",
    "REF_EDGE",
    "REF_LAMBDA_EDGE",
    "REF_PRECONDITIONED_EDGE",
    "REF_WATCH_THRESHOLD",
    "SETUP_TEXT",
    "SHARPNESS_CRITICAL",
    "SHARPNESS_DENSITY",
    "SHARPNESS_DENSITY_PLOT",
    "SHARPNESS_DIRECTIONAL",
    "SHARPNESS_DIRECTIONAL_RATIO",
    "SHARPNESS_EOS_RATIO",
    "SHARPNESS_FLATTENING",
    "SHARPNESS_HVPS",
    "SHARPNESS_LAMBDA_MAX",
    "SHARPNESS_LR_CHANGE",
    "SHARPNESS_NONFINITE",
    "SHARPNESS_PRECONDITIONED",
    "SHARPNESS_PREDICTED_RATIO",
    "SHARPNESS_SHIFT",
    "SHARPNESS_SKIPPED",
    "SHARPNESS_TRACE",
    "SUMMARY_TEXT",
    "TIMELINE_EVENT_LOSS",
    "TIMELINE_LEVEL",
    "TIMELINE_LR_APPLIED",
    "TIMELINE_LR_FACTOR",
    "TIMELINE_LR_SCHEDULE",
    "TIMELINE_ROLLBACKS",
    "TIMELINE_TEXT",
    "WARNING_SOURCE",
    "Level",
    "activation_key",
    "audit_key",
    "check_choice",
    "check_factor",
    "check_finite_positive",
    "check_in_range",
    "check_nonnegative_int",
    "check_positive_int",
    "cka_initial_key",
    "cka_key",
    "grad_group_key",
    "grad_group_update_key",
    "key",
    "meta_key",
    "reading_name",
    "sharpness_lambda_key",
]

PREFIX = "stability/"
"""Every logged key starts with this."""


def key(name: str) -> str:
    """The logged key of the reading ``name`` (``"grad/norm"`` -> ``"stability/grad/norm"``)."""
    return name if name.startswith(PREFIX) else PREFIX + name


def reading_name(k: str) -> str:
    """The reading name of the key ``k`` (the inverse of :func:`key`)."""
    return k[len(PREFIX) :] if k.startswith(PREFIX) else k


# ------------------------------------------------------------------ keys of readings
SHARPNESS_LAMBDA_MAX = key("sharpness/lambda_max")
SHARPNESS_EOS_RATIO = key("sharpness/eos_ratio")
SHARPNESS_DIRECTIONAL = key("sharpness/directional")
SHARPNESS_DIRECTIONAL_RATIO = key("sharpness/directional_ratio")
SHARPNESS_PRECONDITIONED = key("sharpness/preconditioned")
SHARPNESS_CRITICAL = key("sharpness/critical")
SHARPNESS_SHIFT = key("sharpness/shift")
SHARPNESS_PREDICTED_RATIO = key("sharpness/predicted_ratio")
SHARPNESS_LR_CHANGE = key("sharpness/lr_change")
SHARPNESS_FLATTENING = key("sharpness/flattening")
SHARPNESS_TRACE = key("sharpness/trace")
SHARPNESS_HVPS = key("sharpness/hvps")
SHARPNESS_SKIPPED = key("sharpness/skipped")
SHARPNESS_NONFINITE = key("sharpness/nonfinite")
SHARPNESS_DENSITY = key("sharpness/density")
"""TensorBoard histogram tag of the Hessian spectral density."""
SHARPNESS_DENSITY_PLOT = key("sharpness/density_plot")
"""TensorBoard figure tag of the Hessian spectral density."""
GRAD_NORM = key("grad/norm")
GRAD_CLIP_RATE = key("grad/clip_rate")
GRAD_CLIP_THRESHOLD = key("grad/clip_threshold")
GRAD_UPDATE_RATIO = key("grad/update_ratio")
GRAD_WEIGHT_NORM = key("grad/weight_norm")
GRAD_NONFINITE = key("grad/nonfinite")
GRAD_NORM_VAR = key("grad/norm_var")
GRAD_NORM_AC1 = key("grad/norm_ac1")
GRAD_CLIP_EVENT = key("grad/clip_event")
LOSS_VALUE = key("loss/value")
LOSS_TAIL_Q = key("loss/tail_q")
LOSS_TAIL_MAX = key("loss/tail_max")
LOSS_SPREAD = key("loss/spread")
LOSS_NONFINITE = key("loss/nonfinite")
LOSS_VAR = key("loss/var")
LOSS_AC1 = key("loss/ac1")
LOSS_SAMPLE_Q = key("loss/sample_q")
LOSS_SAMPLE_MAX = key("loss/sample_max")
CKA_MIN = key("cka/min")
CKA_HEATMAP = key("cka_heatmap")
"""TensorBoard image tag of the layer x check CKA heat map."""
ACTIVATION_DEAD_FRACTION = key("act/*/dead_fraction")
AUDIT_LR_MARGIN = key("audit/optimization/lr_margin")
META_DEVIATION = key("meta/deviation")
META_LEVEL = key("meta/level")
ACTION_LR_SCALE = key("action/lr_scale")
ACTION_LR_GUARD_SCALE = key("action/lr_guard_scale")
ACTION_STAGE = key("action/stage")
ACTION_ROLLBACKS = key("action/rollbacks")
ACTION_SKIPPED_STEPS = key("action/skipped_steps")
REF_EDGE = key("ref/edge")
"""Reference line of the ratios: the edge, 1."""
REF_LAMBDA_EDGE = key("ref/lambda_edge")
"""Reference line of ``lambda_max`` and ``directional``: the optimizer's edge."""
REF_PRECONDITIONED_EDGE = key("ref/preconditioned_edge")
"""Reference line of ``preconditioned`` (Adam/AdamW): its edge."""
REF_WATCH_THRESHOLD = key("ref/watch_threshold")
"""Reference line of the meta-state deviation: the watch threshold."""
TIMELINE_LEVEL = key("timeline/level")
TIMELINE_ROLLBACKS = key("timeline/rollbacks")
TIMELINE_LR_APPLIED = key("timeline/lr_applied")
TIMELINE_LR_SCHEDULE = key("timeline/lr_schedule")
TIMELINE_LR_FACTOR = key("timeline/lr_factor")
TIMELINE_EVENT_LOSS = key("timeline/event_loss")
TIMELINE_TEXT = key("timeline")
"""TensorBoard text tag of the timeline of a run."""
SETUP_TEXT = key("setup")
"""TensorBoard text tag of the callbacks attached to a run."""
SUMMARY_TEXT = key("summary")
"""TensorBoard text tag of the end-of-fit summary."""
EVENTS = key("events")
"""TensorBoard text tag of the events."""
ACTIONS = key("actions")
"""TensorBoard text tag of the actions (in logs written before the timeline)."""

WARNING_SOURCE = "early_warning"
"""The ``source`` of the warning layer's events (level changes); every other source is
an action."""


def meta_key(dimension: str) -> str:
    """The logged key of one dimension's score (``stability/meta/<dimension>``)."""
    return key(f"meta/{dimension}")


def sharpness_lambda_key(i: int) -> str:
    """The logged key of the ``i``-th Hessian eigenvalue, ``i >= 1``
    (``stability/sharpness/lambda_<i>``; the top one is :data:`SHARPNESS_LAMBDA_MAX`)."""
    return key(f"sharpness/lambda_{i}")


def cka_key(layer: str) -> str:
    """The logged key of a layer's CKA to the previous check (``stability/cka/<layer>``)."""
    return key(f"cka/{layer}")


def cka_initial_key(layer: str) -> str:
    """The logged key of a layer's CKA to the first check (``stability/cka_initial/<layer>``)."""
    return key(f"cka_initial/{layer}")


def grad_group_key(group: str) -> str:
    """The logged key of one parameter group's gradient norm (``stability/grad/group/<group>``)."""
    return key(f"grad/group/{group}")


def grad_group_update_key(group: str) -> str:
    """The logged key of one parameter group's update ratio
    (``stability/grad/group_update/<group>``)."""
    return key(f"grad/group_update/{group}")


def audit_key(name: str) -> str:
    """The logged key of one audit margin (``stability/audit/<dimension>/<margin>``)."""
    return key(f"audit/{name}")


def activation_key(layer: str, statistic: str) -> str:
    """The logged key of a layer's activation statistic (``stability/act/<layer>/<statistic>``,
    ``statistic`` one of ``"rms"``, ``"dead_fraction"``)."""
    return key(f"act/{layer}/{statistic}")


# ------------------------------------------------------------------ levels
class Level(IntEnum):
    """Severity of the run's state, ordered so that levels compare (``WARNING > WATCH``)."""

    OK = 0
    WATCH = 1
    WARNING = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, value: str | int | Level, argument: str = "level") -> Level:
        """``Level`` from a name (``"warning"``), a number or a ``Level``; a clear
        ``ValueError`` naming ``argument`` otherwise."""
        if isinstance(value, Level):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        if isinstance(value, int) and not isinstance(value, bool) and value in iter(cls):
            return cls(value)
        names = ", ".join(repr(m.name.lower()) for m in cls)
        raise ValueError(f"{argument} must be one of {names}, got {value!r}")


LEVEL_NAMES: tuple[str, ...] = tuple(level.name.lower() for level in Level)
"""``("ok", "watch", "warning", "critical")``, indexed by the level's number."""

# ------------------------------------------------------------------ dimensions
DIMENSIONS: tuple[str, ...] = ("optimization", "learning_signal", "parametric", "data")
"""The four dimensions of training stability (Zhang et al. 2026): how close the step is
to the edge (optimization), the gradient signal and the loss it follows
(learning_signal), the weights and representations (parametric), the data."""


# ------------------------------------------------------------------ validators
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(value: Any, argument: str, allow_none: bool = False) -> None:
    """``ValueError`` naming ``argument`` unless ``value`` is an integer >= 1 (or None)."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        allowed = "an integer >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"{argument} must be {allowed}, got {value!r}")


def check_nonnegative_int(value: Any, argument: str, allow_none: bool = False) -> None:
    """``ValueError`` naming ``argument`` unless ``value`` is an integer >= 0 (or None)."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 0:
        allowed = "an integer >= 0" + (" or None" if allow_none else "")
        raise ValueError(f"{argument} must be {allowed}, got {value!r}")


def check_factor(value: Any, argument: str) -> None:
    """``ValueError`` naming ``argument`` unless ``value`` lies in the open interval (0, 1)."""
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{argument} must be a number in the open interval (0, 1), got {value!r}")


def check_finite_positive(value: Any, argument: str, allow_none: bool = False) -> None:
    """``ValueError`` naming ``argument`` unless ``value`` is a finite number > 0 (or None)."""
    if value is None and allow_none:
        return
    if not _is_number(value) or not math.isfinite(value) or not value > 0:
        allowed = "a finite number > 0" + (" or None" if allow_none else "")
        raise ValueError(f"{argument} must be {allowed}, got {value!r}")


def check_in_range(
    value: Any,
    argument: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``ValueError`` naming ``argument`` and the interval unless ``value`` lies in it."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not _is_number(value) or not (above and below):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{argument} must be in {left}{low}, {high}{right}, got {value!r}")


def check_choice(value: Any, argument: str, allowed: Iterable[Any]) -> None:
    """``ValueError`` naming ``argument`` and the allowed values unless ``value`` is one."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {allowed}, got {value!r}")
