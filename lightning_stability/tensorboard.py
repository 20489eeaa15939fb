"""The "Stability" tab in TensorBoard (CUSTOM SCALARS): a layout written once per run.

The layout lists only the charts of the callbacks attached to the run, each titled with
its unit. Its first category, "Stability", answers "was the run healthy?" on one row:

* the training loss the user logs (so a run without callbacks, logged under the same
  tag, shares the chart), with the loss at each stability event marked;
* the edge-of-stability ratio with the edge at 1;
* the warning level (0 ok, 1 watch, 2 warning, 3 critical) and the rollbacks so far;
* the learning rate as applied (after backoffs, stages and the guard's clamp) against
  the schedule's learning rate.

Charts of named tags are TensorBoard "margin" charts (value, lower and upper are the same
tag): TensorBoard never smooths them and draws a marker at every point, so a level reads
0, 1, 2 or 3 and a lone spike is not averaged away, whatever the Smoothing slider says.
Charts of tag families (``stability/cka/<layer>``) are regular-expression "multiline"
charts, which the slider smooths. TensorBoard shows a category's multiline charts before
its margin charts, each in layout order. Its "Ignore outliers in chart scaling" box (on by
default) applies to every chart of the tab: neither the layout nor the page's URL can turn
it off for one chart.

The timeline series (``stability/timeline/...``) are written by
:class:`~lightning_stability.dashboard.StabilityDashboard` as step functions: at each change
the old value is written one step before the new one, so the line rises vertically at the
step of the change instead of sloping from the previous logging step.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lightning_stability.vocabulary import (
    ACTION_LR_GUARD_SCALE,
    ACTION_LR_SCALE,
    ACTION_SKIPPED_STEPS,
    ACTION_STAGE,
    DIMENSIONS,
    GRAD_CLIP_EVENT,
    GRAD_CLIP_RATE,
    GRAD_CLIP_THRESHOLD,
    GRAD_NORM,
    GRAD_UPDATE_RATIO,
    LOSS_TAIL_MAX,
    LOSS_TAIL_Q,
    LOSS_VALUE,
    META_DEVIATION,
    PREFIX,
    REF_EDGE,
    REF_LAMBDA_EDGE,
    REF_PRECONDITIONED_EDGE,
    REF_WATCH_THRESHOLD,
    SETUP_TEXT,
    SHARPNESS_CRITICAL,
    SHARPNESS_DIRECTIONAL,
    SHARPNESS_DIRECTIONAL_RATIO,
    SHARPNESS_EOS_RATIO,
    SHARPNESS_LAMBDA_MAX,
    SHARPNESS_PRECONDITIONED,
    SHARPNESS_SHIFT,
    SUMMARY_TEXT,
    TIMELINE_EVENT_LOSS,
    TIMELINE_LEVEL,
    TIMELINE_LR_APPLIED,
    TIMELINE_LR_FACTOR,
    TIMELINE_LR_SCHEDULE,
    TIMELINE_ROLLBACKS,
    TIMELINE_TEXT,
)

__all__ = [
    "LAYOUT_TAG",
    "PARTS",
    "TIMELINE",
    "Chart",
    "chart_tags",
    "read_layout",
    "stability_layout",
    "tensorboard_writers",
    "write_layout",
]

LAYOUT_TAG = "custom_scalars__config__"
"""The tag under which TensorBoard's custom-scalars plugin looks for a layout."""


class TIMELINE:
    """Tags of the series and texts the dashboard writes (the timeline of a run)."""

    LEVEL = TIMELINE_LEVEL
    ROLLBACKS = TIMELINE_ROLLBACKS
    LR_APPLIED = TIMELINE_LR_APPLIED
    LR_SCHEDULE = TIMELINE_LR_SCHEDULE
    LR_FACTOR = TIMELINE_LR_FACTOR
    EVENT_LOSS = TIMELINE_EVENT_LOSS
    TEXT = TIMELINE_TEXT
    """Markdown text, one entry per step with events: every event of that step, causes
    (level changes) first, then the actions they triggered."""
    SETUP = SETUP_TEXT
    """Markdown text at the first step: the stability callbacks attached and the loss tag."""
    SUMMARY = SUMMARY_TEXT
    """Markdown text at the end of fit: the run's summary."""


PARTS = frozenset(
    {
        "sharpness",
        "directional",
        "critical",
        "preconditioned",
        "gradients",
        "clipping",
        "loss",
        "drift",
        "audit",
        "warning",
        "lr_backoff",
        "staged_training",
        "rollback",
        "lr_guard",
    }
)
"""What a layout can show: one name per attached probe, warning or action (and the
optional readings of the curvature and gradient probes)."""


@dataclass(frozen=True)
class Chart:
    """One chart of the tab.

    Attributes:
        title: what TensorBoard shows above the chart, with the unit.
        tags: exact tags (``regex=False``: a margin chart, one unsmoothed series per tag)
            or regular expressions (``regex=True``: a multiline chart).
        regex: see ``tags``.
    """

    title: str
    tags: tuple[str, ...]
    regex: bool = False


def stability_layout(parts: Collection[str], loss_tag: str | None = None) -> dict[str, list[Chart]]:
    """The tab's categories and charts for a run with the given ``parts`` attached
    (names from :data:`PARTS`) whose training loss is logged under ``loss_tag``.

    Raises:
        ValueError: a name in ``parts`` is not in :data:`PARTS`.
    """
    unknown = sorted(set(parts) - PARTS)
    if unknown:
        raise ValueError(f"parts: unknown name(s) {unknown}; allowed: {sorted(PARTS)}")
    has = set(parts).__contains__
    s = PREFIX
    head: list[Chart] = []
    if loss_tag:
        head.append(
            Chart(f"training loss ({loss_tag}), events marked", (loss_tag, TIMELINE.EVENT_LOSS))
        )
    if has("sharpness"):
        ratios = [SHARPNESS_EOS_RATIO]
        if has("directional"):
            ratios.append(SHARPNESS_DIRECTIONAL_RATIO)
        head.append(Chart("edge-of-stability ratio (dimensionless, 1 = edge)", (*ratios, REF_EDGE)))
    if has("warning"):
        tags = (TIMELINE.LEVEL, TIMELINE.ROLLBACKS) if has("rollback") else (TIMELINE.LEVEL,)
        title = "warning level (0 ok, 1 watch, 2 warning, 3 critical)"
        head.append(Chart(title + (" and rollbacks (count)" if has("rollback") else ""), tags))
    head.append(
        Chart(
            "learning rate (as applied, and as scheduled)",
            (TIMELINE.LR_APPLIED, TIMELINE.LR_SCHEDULE),
        )
    )
    layout: dict[str, list[Chart]] = {"Stability": head}

    curvature: list[Chart] = []
    if has("sharpness"):
        tags = [SHARPNESS_LAMBDA_MAX]
        if has("directional"):
            tags.append(SHARPNESS_DIRECTIONAL)
        curvature.append(
            Chart(
                "top Hessian eigenvalue and its edge (loss / parameter^2)",
                (*tags, REF_LAMBDA_EDGE),
            )
        )
        if has("directional") and has("critical"):
            curvature.append(
                Chart(
                    "critical sharpness along the update (loss / parameter^2; gaps = undefined)",
                    (SHARPNESS_CRITICAL,),
                )
            )
        if has("preconditioned"):
            curvature.append(
                Chart(
                    "preconditioned sharpness and its edge (1 / learning rate, Adam)",
                    (SHARPNESS_PRECONDITIONED, REF_PRECONDITIONED_EDGE),
                )
            )
        curvature.append(
            Chart(
                "landscape shift (sine of the largest principal angle, 0 to 1)",
                (SHARPNESS_SHIFT,),
            )
        )
        layout["Stability: curvature"] = curvature

    signals: list[Chart] = []
    if has("gradients"):
        norm = [GRAD_NORM] + ([GRAD_CLIP_THRESHOLD] if has("clipping") else [])
        signals.append(Chart("gradient norm (L2, before clipping)", tuple(norm)))
        signals.append(Chart("update ratio (|update| / |weights|, per step)", (GRAD_UPDATE_RATIO,)))
        if has("clipping"):
            signals.append(
                Chart(
                    "gradient clipping (1 = clipped; rate = share of recent steps)",
                    (GRAD_CLIP_EVENT, GRAD_CLIP_RATE),
                )
            )
    if has("loss"):
        signals.append(
            Chart(
                "batch loss and its tail (loss units)",
                (LOSS_VALUE, LOSS_TAIL_Q, LOSS_TAIL_MAX),
            )
        )
    if signals:
        layout["Stability: gradients and loss"] = signals

    if has("warning"):
        layout["Stability: early warning"] = [
            Chart(
                "meta-state deviation and watch threshold (robust standard deviations)",
                (META_DEVIATION, REF_WATCH_THRESHOLD),
            ),
            Chart(
                "deviation by dimension (robust standard deviations)",
                (rf"{s}meta/({'|'.join(DIMENSIONS)})$",),
                regex=True,
            ),
        ]

    actions: list[Chart] = []
    factors = [TIMELINE.LR_FACTOR]
    if has("lr_backoff"):
        factors.append(ACTION_LR_SCALE)
    if has("lr_guard"):
        factors.append(ACTION_LR_GUARD_SCALE)
    if len(factors) > 1 or has("staged_training"):
        actions.append(
            Chart("learning-rate factor (applied / scheduled, 1 = untouched)", tuple(factors))
        )
    if has("staged_training"):
        actions.append(Chart("training stage (0 = as configured)", (ACTION_STAGE,)))
    if has("rollback"):
        actions.append(
            Chart(
                "rollbacks and skipped steps (count)",
                (TIMELINE.ROLLBACKS, ACTION_SKIPPED_STEPS),
            )
        )
    if actions:
        layout["Stability: actions"] = actions

    if has("drift"):
        layout["Stability: representations"] = [
            Chart("CKA per layer to the previous check (0 to 1)", (s + r"cka/(?!min$).*",), True),
            Chart("CKA per layer to the first check (0 to 1)", (s + "cka_initial/.*",), True),
            Chart("activation RMS per layer (activation units)", (s + r"act/.*/rms$",), True),
        ]
    if has("audit"):
        layout["Stability: perturbation audit"] = [
            Chart("audit margins (dimensionless, below 1 = at risk)", (s + "audit/.*",), True)
        ]
    return layout


def chart_tags(chart: Chart, tags: Iterable[str]) -> list[str]:
    """The tags among ``tags`` that ``chart`` draws (as TensorBoard matches them)."""
    if chart.regex:
        patterns = [re.compile(p) for p in chart.tags]
        return [t for t in tags if any(p.match(t) for p in patterns)]
    wanted = set(chart.tags)
    return [t for t in tags if t in wanted]


def _reverse_margin_charts(charts: list[Chart]) -> list[Chart]:
    """``charts`` with the margin charts in reverse order among their own places (the
    multiline charts stay where they are). Its own inverse.

    Why: TensorBoard's custom-scalars page (seen in 2.21) inserts each margin chart of a
    category ahead of the earlier ones (each chart's place holds two template elements and
    the page counts elements, not places), so it shows the margin charts of a category in
    reverse of their order in the layout, after the multiline charts. Written reversed,
    they show in the order :func:`stability_layout` gives them
    (``tests/test_dashboard_browser.py`` checks this in a browser).
    """
    margins = iter([c for c in charts if not c.regex][::-1])
    return [c if c.regex else next(margins) for c in charts]


def _layout_proto(layout: dict[str, list[Chart]]) -> Any:
    from tensorboard.plugins.custom_scalar import layout_pb2

    categories = []
    for title, charts in layout.items():
        protos = []
        for chart in _reverse_margin_charts(charts):
            if chart.regex:
                content = layout_pb2.MultilineChartContent(tag=list(chart.tags))
                protos.append(layout_pb2.Chart(title=chart.title, multiline=content))
            else:
                series = [
                    layout_pb2.MarginChartContent.Series(value=t, lower=t, upper=t)
                    for t in chart.tags
                ]
                content = layout_pb2.MarginChartContent(series=series)
                protos.append(layout_pb2.Chart(title=chart.title, margin=content))
        categories.append(layout_pb2.Category(title=title, chart=protos))
    return layout_pb2.Layout(category=categories)


def read_layout(serialized: bytes) -> dict[str, list[Chart]]:
    """A layout back from the bytes TensorBoard stores under :data:`LAYOUT_TAG`, its
    charts in the order :func:`stability_layout` gave them (margin charts are written
    reversed, see :func:`_reverse_margin_charts`)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    proto = layout_pb2.Layout.FromString(serialized)
    layout: dict[str, list[Chart]] = {}
    for category in proto.category:
        charts = []
        for chart in category.chart:
            if chart.HasField("margin"):
                charts.append(Chart(chart.title, tuple(s.value for s in chart.margin.series)))
            else:
                charts.append(Chart(chart.title, tuple(chart.multiline.tag), regex=True))
        layout[category.title] = _reverse_margin_charts(charts)
    return layout


def tensorboard_writers(loggers: list[Logger]) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger among ``loggers`` (others are
    skipped: their scalars still arrive through ``pl_module.log``)."""
    return [lg.experiment for lg in loggers if isinstance(lg, TensorBoardLogger)]


def write_layout(loggers: list[Logger], layout: dict[str, list[Chart]]) -> int:
    """Write ``layout`` (from :func:`stability_layout`) to every TensorBoard logger;
    returns how many. TensorBoard reads the first layout of a run, so write it once."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    proto = _layout_proto(layout)
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    tensor = TensorProto(
        dtype="DT_STRING", string_val=[proto.SerializeToString()], tensor_shape=TensorShapeProto()
    )
    summary = Summary(value=[Summary.Value(tag=LAYOUT_TAG, tensor=tensor, metadata=metadata)])
    writers = tensorboard_writers(loggers)
    for writer in writers:
        writer._get_file_writer().add_summary(summary)
    return len(writers)
