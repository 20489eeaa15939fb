"""The story of a run, told once: what was monitored, whether the run stayed healthy, what
happened when, what was done and with what result, and what to change next time.

One function, :func:`summarize`, computes it from the readings a run logged (a
:class:`RunLog`). The same function serves the live summary at the end of ``fit``
(:class:`~lightning_stability.dashboard.StabilityDashboard`, from the values it wrote or
saw written) and ``lightning-stability report LOGDIR`` (from the TensorBoard event files,
:func:`load_run`), so both give the same peaks and the same highest level.
:func:`render_markdown` and :func:`render_text` print it; :func:`write_figures` draws the
figures the report links.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_stability.tensorboard import TIMELINE
from lightning_stability.vocabulary import (
    ACTION_STAGE,
    ACTIONS,
    AUDIT_LR_MARGIN,
    CKA_MIN,
    EVENTS,
    GRAD_CLIP_RATE,
    GRAD_CLIP_THRESHOLD,
    GRAD_NORM,
    LEVEL_NAMES,
    LOSS_TAIL_MAX,
    LOSS_VALUE,
    META_DEVIATION,
    META_LEVEL,
    PREFIX,
    REF_LAMBDA_EDGE,
    REF_PRECONDITIONED_EDGE,
    REF_WATCH_THRESHOLD,
    SHARPNESS_DIRECTIONAL,
    SHARPNESS_DIRECTIONAL_RATIO,
    SHARPNESS_EOS_RATIO,
    SHARPNESS_LAMBDA_MAX,
    SHARPNESS_PRECONDITIONED,
    WARNING_SOURCE,
    key,
)

__all__ = [
    "LEVEL_NAMES",
    "SUMMARY_ROWS",
    "RunLog",
    "RunSummary",
    "TimelineEntry",
    "confirmed_max",
    "describe",
    "event_text",
    "find_loss_tag",
    "find_runs",
    "format_entries",
    "load_run",
    "parse_entries",
    "render_markdown",
    "render_text",
    "summarize",
    "write_figures",
]

Series = list[tuple[int, float]]

# (label, tag, reduction) for the readings table. Curvature peaks are "confirmed" maxima
# (see ``confirmed_max``): a single outlying check must not set them.
SUMMARY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("peak edge-of-stability ratio", SHARPNESS_EOS_RATIO, "confirmed_max"),
    ("peak lambda_max", SHARPNESS_LAMBDA_MAX, "confirmed_max"),
    ("peak directional ratio", SHARPNESS_DIRECTIONAL_RATIO, "confirmed_max"),
    ("peak gradient norm", GRAD_NORM, "max"),
    ("mean clip rate", GRAD_CLIP_RATE, "mean"),
    ("peak batch loss", LOSS_TAIL_MAX, "max"),
    ("lowest CKA to previous check", CKA_MIN, "min"),
    ("peak meta-state deviation", META_DEVIATION, "max"),
    ("highest level", TIMELINE.LEVEL, "max"),
    ("rollbacks", TIMELINE.ROLLBACKS, "last"),
    ("final learning-rate factor", TIMELINE.LR_FACTOR, "last"),
    ("highest stage", ACTION_STAGE, "max"),
    ("lowest audit LR margin", AUDIT_LR_MARGIN, "min"),
)

# (aspect, callback classes, tag prefix, the series whose readings are counted)
ASPECTS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("curvature", ("SharpnessMonitor",), key("sharpness/"), SHARPNESS_LAMBDA_MAX),
    ("gradients", ("GradientMonitor",), key("grad/"), GRAD_NORM),
    ("loss tail", ("LossMonitor",), key("loss/"), LOSS_VALUE),
    ("representations", ("RepresentationDriftMonitor",), key("cka"), CKA_MIN),
    (
        "perturbation audit",
        ("PerturbationAudit",),
        key("audit/"),
        AUDIT_LR_MARGIN,
    ),
    ("early warning", ("EarlyWarning",), key("meta/"), TIMELINE.LEVEL),
)
ACTION_CLASSES = (
    "LRBackoff",
    "StagedTraining",
    "Rollback",
    "LRGuard",
    "AdaptiveGradientClipping",
)


@dataclass(frozen=True)
class TimelineEntry:
    """One event on a run's timeline.

    Attributes:
        step: the logging step (the x axis of the TensorBoard charts) it happened at.
        source: ``"early_warning"`` for a change of level (a cause), else the action's name.
        level: the level it carries (0 ok ... 3 critical); for a change of level, the new
            level.
        text: one line, what happened.
    """

    step: int
    source: str
    level: int
    text: str

    @property
    def is_cause(self) -> bool:
        return self.source == WARNING_SOURCE


@dataclass
class RunLog:
    """What a run logged, as the summary reads it.

    Attributes:
        scalars: ``tag -> [(step, value), ...]`` in step order: the ``stability/`` series
            and the training loss.
        events: the timeline, in time order, causes before the actions of the same step.
        attached: class names of the stability callbacks attached, when known.
        loss_tag: the tag of the training loss the user logs, when known.
    """

    scalars: dict[str, Series] = field(default_factory=dict)
    events: list[TimelineEntry] = field(default_factory=list)
    attached: list[str] | None = None
    loss_tag: str | None = None

    def __iter__(self):
        """Unpacks as ``scalars, events``, as :func:`load_run`'s result did before it held
        more."""
        return iter((self.scalars, self.events))


@dataclass
class RunSummary:
    """The story of one run.

    Attributes:
        name: the run's name (its directory relative to the log root, or "this run").
        healthy: ``True``/``False``, or ``None`` when no stability callback watched it.
        headline: one paragraph: healthy or not; if not, what happened, when, what was
            done and with what result.
        highest_level: the highest warning level reached (0 ok ... 3 critical), or
            ``None`` when no warning layer ran.
        monitored: ``(aspect, status)``: what was watched, and what was not.
        causes: the timeline, in time order, each cause before the actions it triggered.
        rows: ``(label, value)`` for the readings that were present.
        advice: what to change next run, each with the number from the logs behind it.
        seconds_in_callbacks: time in each stability callback, from the Trainer's profiler
            (live runs with ``profiler="simple"`` only).
    """

    name: str
    healthy: bool | None = None
    headline: str = ""
    highest_level: int | None = None
    monitored: list[tuple[str, str]] = field(default_factory=list)
    causes: list[TimelineEntry] = field(default_factory=list)
    rows: list[tuple[str, float]] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    seconds_in_callbacks: dict[str, float] = field(default_factory=dict)

    @property
    def values(self) -> dict[str, float]:
        return dict(self.rows)


# ------------------------------------------------------------------ reductions


def confirmed_max(values: Iterable[float]) -> float:
    """The largest level that two consecutive valid readings both reach:
    ``max_i min(v_i, v_{i+1})`` over the finite readings in order (NaN readings, which
    are invalid, are dropped first, so a confirmation may span one).

    A reading on its own never sets the peak: an outlier between two ordinary readings
    (lambda_max 8.5, 4227, 0.17) contributes only the ordinary level, while a run that
    really sits at a level for two checks reports it. NaN with fewer than two readings.
    """
    finite = [float(v) for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return math.nan
    return max(min(a, b) for a, b in itertools.pairwise(finite))


def _reduce(values: Sequence[float], how: str) -> float:
    if how == "last":
        return values[-1] if values else math.nan
    if how == "confirmed_max":
        return confirmed_max(values)
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    if how == "max":
        return max(finite)
    if how == "min":
        return min(finite)
    return sum(finite) / len(finite)


def _finite(series: Series) -> Series:
    return [(s, v) for s, v in series if math.isfinite(v)]


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def format_row(label: str, value: float) -> str:
    """A row's value as the report prints it (levels by name)."""
    if label == "highest level" and math.isfinite(value):
        return LEVEL_NAMES[int(value)]
    return _fmt(value)


def find_loss_tag(tags: Iterable[str]) -> str | None:
    """The tag under which a run logs its training loss: ``train_loss`` and the like
    (``*_step`` when logged per step and per epoch), not a validation or test loss and
    not a ``stability/`` reading; ``None`` when there is none."""
    skip = re.compile(r"(^|[/_.-])(val|valid|validation|test|eval)([/_.-]|$)")
    candidates = [
        t
        for t in tags
        if "loss" in t.lower()
        and not t.startswith(PREFIX)
        and not t.endswith("_epoch")
        and not skip.search(t.lower())
    ]
    for preferred in ("train_loss_step", "train_loss", "train/loss", "loss", "training_loss"):
        if preferred in candidates:
            return preferred
    candidates.sort(key=lambda t: (not t.endswith("_step"), len(t), t))
    return candidates[0] if candidates else None


# ------------------------------------------------------------------ the timeline text

_ENTRY = re.compile(r"^- \*\*(?P<source>[^*]+)\*\* \[(?P<level>[a-z]+)\] (?P<text>.*)$")


def format_entries(entries: Sequence[TimelineEntry]) -> str:
    """The markdown of one step's events (one text entry in TensorBoard): causes first."""
    ordered = sorted(entries, key=lambda e: not e.is_cause)
    return "\n".join(
        f"- **{e.source}** [{LEVEL_NAMES[e.level]}] {' '.join(e.text.split())}" for e in ordered
    )


def parse_entries(step: int, text: str) -> list[TimelineEntry]:
    """The events of one text entry written by :func:`format_entries`."""
    out = []
    for line in text.splitlines():
        m = _ENTRY.match(line.strip())
        if m and m["level"] in LEVEL_NAMES:
            out.append(TimelineEntry(step, m["source"], LEVEL_NAMES.index(m["level"]), m["text"]))
    return out


def order_events(events: Iterable[TimelineEntry]) -> list[TimelineEntry]:
    """Time order; within a step, causes (level changes) before actions."""
    return sorted(events, key=lambda e: (e.step, not e.is_cause))


# ------------------------------------------------------------------ reading a run


def find_runs(logdir: str | os.PathLike) -> list[Path]:
    """Directories under ``logdir`` that hold TensorBoard event files, sorted.

    Raises:
        FileNotFoundError: ``logdir`` does not exist or holds no event files.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"LOGDIR {str(root)!r} is not a directory")
    runs = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    if not runs:
        raise FileNotFoundError(
            f"no TensorBoard runs under {str(root)!r}: no events.out.tfevents.* files found"
        )
    return runs


def _legacy_entry(step: int, tag: str, text: str) -> TimelineEntry:
    """An event written before the timeline existed (``stability/events`` by the warning
    layer, ``stability/actions`` as ``**source**: message``)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = re.match(r"^\*\*(?P<source>[^*]+)\*\*:\s*(?P<text>.*)$", first)
    if m:
        return TimelineEntry(step, m["source"], 0, m["text"])
    word = first.split(" ", 1)[0].rstrip(":").lower()
    level = LEVEL_NAMES.index(word) if word in LEVEL_NAMES else 0
    source = WARNING_SOURCE if tag.startswith(EVENTS) else "action"
    return TimelineEntry(step, source, level, first)


def load_run(run_dir: str | os.PathLike) -> RunLog:
    """A run's ``stability/`` scalars, training loss and timeline from its event files,
    read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    acc = EventAccumulator(str(run_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    tags = acc.Tags()
    texts: dict[str, list[tuple[int, str]]] = {}
    for tag in tags.get("tensors", []):
        if tag.startswith(PREFIX):
            texts[tag.removesuffix("/text_summary")] = [
                (e.step, e.tensor_proto.string_val[0].decode("utf-8", errors="replace"))
                for e in acc.Tensors(tag)
                if e.tensor_proto.string_val
            ]
    attached, loss_tag = None, None
    for _, text in texts.get(TIMELINE.SETUP, [])[:1]:
        m = re.search(r"attached\*\*:\s*(.*)", text)
        attached = [n.strip() for n in m[1].split(",") if n.strip()] if m else []
        m = re.search(r"loss tag\*\*:\s*`([^`]+)`", text)
        loss_tag = m[1] if m else None
    scalar_tags = tags.get("scalars", [])
    loss_tag = loss_tag or find_loss_tag(scalar_tags)
    scalars = {
        tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)]
        for tag in scalar_tags
        if tag.startswith(PREFIX) or tag == loss_tag
    }
    if TIMELINE.TEXT in texts:
        events = [e for step, text in texts[TIMELINE.TEXT] for e in parse_entries(step, text)]
    else:  # logs written before the timeline existed
        events = [
            _legacy_entry(step, tag, text)
            for tag in (EVENTS, ACTIONS)
            for step, text in texts.get(tag, [])
        ]
    return RunLog(scalars, order_events(events), attached, loss_tag)


# ------------------------------------------------------------------ the summary


def _level_series(log: RunLog) -> Series:
    return log.scalars.get(TIMELINE.LEVEL) or log.scalars.get(META_LEVEL) or []


def _monitored(log: RunLog) -> list[tuple[str, str]]:
    attached = set(log.attached or ())
    out = []
    for aspect, classes, prefix, counted in ASPECTS:
        tags = [t for t in log.scalars if (t.startswith(prefix) or t == counted) and log.scalars[t]]
        if tags:
            series = log.scalars.get(counted) or max((log.scalars[t] for t in tags), key=len)
            steps = [s for s, _ in series]
            status = (
                f"watched: {_plural(len(series), 'logged reading')}, "
                f"steps {steps[0]} to {steps[-1]}"
            )
        elif attached & set(classes):
            status = "attached, but no reading was logged (the run ended before its first check)"
        else:
            status = "not monitored"
        out.append((aspect, status))
    actions = [c for c in ACTION_CLASSES if c in attached]
    taken = [e for e in log.events if not e.is_cause]
    if actions or taken:
        names = ", ".join(actions) if actions else "actions"
        out.append(("actions", f"{names}: {_plural(len(taken), 'event')}"))
    else:
        out.append(("actions", "none attached: nothing could act on a warning"))
    return out


def _loss(log: RunLog) -> tuple[str | None, Series]:
    for tag in (log.loss_tag, LOSS_VALUE):
        if tag and log.scalars.get(tag):
            return tag, log.scalars[tag]
    return None, []


def _tail(series: Series, n: int = 5) -> float:
    """The median of the last ``n`` points: the level a series ended at (NaN if the
    last point is not finite)."""
    if not series:
        return math.nan
    if not math.isfinite(series[-1][1]):
        return math.nan
    values = [v for _, v in series[-n:] if math.isfinite(v)]
    return statistics.median(values)


def _before(series: Series, step: int, n: int = 5) -> float:
    values = [v for s, v in series if s < step and math.isfinite(v)][-n:]
    return statistics.median(values) if values else math.nan


def event_text(text: str, limit: int = 160) -> str:
    """An event's text on one line, without the level and step it repeats."""
    text = re.sub(r"^(ok|watch|warning|critical) at step \d+ \(deviation [^)]*\):?\s*", "", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _what_was_done(log: RunLog) -> str:
    taken = [e for e in log.events if not e.is_cause]
    if not taken:
        attached = set(log.attached or ())
        if attached & set(ACTION_CLASSES):
            return "Done: no action was triggered."
        return "Done: nothing (no action callback was attached)."
    parts = []
    backoffs = [e for e in taken if e.source == "lr_backoff" and "backed off" in e.text]
    if backoffs:
        steps = ", ".join(str(e.step) for e in backoffs[:6])
        parts.append(f"learning rate backed off {_plural(len(backoffs), 'time')} (step {steps})")
    rollbacks = [e for e in taken if e.source == "rollback" and e.text.startswith("rolled back")]
    if rollbacks:
        steps = ", ".join(str(e.step) for e in rollbacks[:6])
        parts.append(f"rolled back {_plural(len(rollbacks), 'time')} (step {steps})")
    stages = [e for e in taken if e.source == "staged_training" and e.text.startswith("stage")]
    if stages:
        parts.append(f"stage changed {_plural(len(stages), 'time')} ({stages[-1].text})")
    clamps = [e for e in taken if e.source == "lr_guard" and e.level > 0]
    if clamps:
        parts.append(f"learning rate clamped by the guard {_plural(len(clamps), 'time')}")
    counted = {id(e) for e in (*backoffs, *rollbacks, *stages, *clamps)}
    other = [e for e in taken if id(e) not in counted]
    if other and not parts:
        parts.append(
            f"{_plural(len(other), 'action')} ({other[0].source}: {event_text(other[0].text)})"
        )
    factor = log.scalars.get(TIMELINE.LR_FACTOR)
    if factor and math.isfinite(factor[-1][1]) and factor[-1][1] != 1.0:
        parts.append(f"the learning rate ended at {factor[-1][1]:.3g}x its schedule")
    return "Done: " + "; ".join(parts) + "."


_NONFINITE = re.compile(r"non-?finite|\bnan\b")


def _advice(log: RunLog, highest: int | None, first_step: int | None) -> list[str]:
    out = []
    scalars = log.scalars
    last_step = max((s[-1][0] for s in scalars.values() if s), default=0)
    for tag, what in (
        (SHARPNESS_EOS_RATIO, "edge-of-stability ratio"),
        (SHARPNESS_DIRECTIONAL_RATIO, "directional edge ratio"),
    ):
        series = scalars.get(tag, [])
        peak = confirmed_max([v for _, v in series])
        if math.isfinite(peak) and peak > 1.0:
            lrs = dict(scalars.get(TIMELINE.LR_SCHEDULE, []))
            at = next((s for s, v in series if math.isfinite(v) and v >= peak), None)
            lr = lrs.get(at) if at is not None else None
            if lr is None and lrs:
                lr = max(lrs.values())
            if lr:
                out.append(
                    f"Learning rate: the {what} reached {peak:.3g} (confirmed over two checks; "
                    f"1 = the edge) at a scheduled learning rate of {lr:.3g}; a peak learning "
                    f"rate of about {0.8 * lr / peak:.3g} keeps the run 20% below the edge."
                )
            else:
                out.append(
                    f"Learning rate: the {what} reached {peak:.3g} (1 = the edge): divide the "
                    f"peak learning rate by at least {peak / 0.8:.3g}."
                )
            break
    factor = scalars.get(TIMELINE.LR_FACTOR)
    causes = [e for e in log.events if e.is_cause and e.level >= 2]
    only_nonfinite = bool(causes) and all(_NONFINITE.search(e.text.lower()) for e in causes)
    if factor and math.isfinite(factor[-1][1]) and factor[-1][1] < 0.99 and not only_nonfinite:
        sched = scalars.get(TIMELINE.LR_SCHEDULE)
        peak_lr = max((v for _, v in sched or [] if math.isfinite(v)), default=math.nan)
        extra = (
            f": start the next run at a peak of about {peak_lr * factor[-1][1]:.3g}"
            if math.isfinite(peak_lr)
            else ""
        )
        out.append(
            f"Learning rate: the actions ended the run at {factor[-1][1]:.3g}x its schedule{extra}."
        )
    if first_step is not None and last_step > 0 and first_step <= 0.1 * last_step:
        out.append(
            f"Warm-up: the first warning came at step {first_step}, "
            f"{100 * first_step / last_step:.0f}% into the run; a learning-rate warm-up over "
            f"the first {max(2 * first_step, 10)} steps lets the curvature settle first."
        )
    norms = [v for _, v in scalars.get(GRAD_NORM, []) if math.isfinite(v)]
    if len(norms) >= 10 and not scalars.get(GRAD_CLIP_THRESHOLD):
        median = statistics.median(norms)
        peak = max(norms)
        if median > 0 and peak > 10 * median:
            p90 = sorted(norms)[int(0.9 * (len(norms) - 1))]
            out.append(
                f"Clipping: the gradient norm peaked at {peak:.3g}, {peak / median:.0f}x its "
                f"median ({median:.3g}); clipping at about {p90:.3g} (the 90th percentile of "
                "the logged norms) caps such steps."
            )
    precond = confirmed_max([v for _, v in scalars.get(SHARPNESS_PRECONDITIONED, [])])
    edge = [v for _, v in scalars.get(REF_PRECONDITIONED_EDGE, [])]
    if math.isfinite(precond) and edge and precond > edge[-1]:
        out.append(
            f"Adam betas: the preconditioned sharpness reached {precond:.3g}, above its edge "
            f"{edge[-1]:.3g}; a smaller beta1 (a lower edge multiple) or a larger epsilon, "
            "or a lower learning rate, brings it back under."
        )
    repaired = [e for e in log.events if "beta2" in e.text]
    if repaired:
        out.append(f"Adam betas: step {repaired[0].step}: {event_text(repaired[0].text)}")
    nonfinite = [e for e in log.events if e.is_cause and _NONFINITE.search(e.text.lower())]
    if nonfinite:
        out.append(
            f"Non-finite values at step {nonfinite[0].step}: look at the batches of that step "
            "and at the precision (loss scaling, bf16)."
        )
    if not out and highest is not None and highest >= 2:
        out.append(
            "No single cause stands out in the readings; measure curvature more often "
            "(SharpnessMonitor every_n_steps) around the step of the first warning."
        )
    return out


def summarize(name: str, log: RunLog) -> RunSummary:
    """The story of a run from what it logged (see the module docstring)."""
    scalars = log.scalars
    rows = [
        (label, _reduce([v for _, v in scalars[tag]], how))
        for label, tag, how in SUMMARY_ROWS
        if scalars.get(tag)
    ]
    events = order_events(log.events)
    levels = [v for _, v in _level_series(log) if math.isfinite(v)]
    levels += [e.level for e in events if e.is_cause]
    highest = int(max(levels)) if levels else None
    if highest is not None and not any(label == "highest level" for label, _ in rows):
        rows.append(("highest level", float(highest)))
    rows = [
        (label, float(highest)) if label == "highest level" else (label, v) for label, v in rows
    ]
    monitored = _monitored(log)
    watched = any(status.startswith("watched") for aspect, status in monitored[:-1])
    loss_tag, loss = _loss(log)
    actions = [e for e in events if not e.is_cause]
    incidents = [e for e in events if e.is_cause and e.level >= 2]
    first = incidents[0] if incidents else None
    if first is None:
        first = next((e for e in actions if e.level >= 2), None)

    loss_line = ""
    finite = _finite(loss)
    if finite:
        low_step, low = min(finite, key=lambda p: p[1])
        final = _tail(loss)
        loss_line = (
            f" Training loss ({loss_tag}): {finite[0][1]:.4g} at the start, lowest {low:.4g} "
            f"(step {low_step}), "
            + (f"{final:.4g} at the end." if math.isfinite(final) else "not finite at the end.")
        )

    if not watched and not events and highest is None:
        healthy = None
        headline = "Not monitored: no stability callback watched this run, so nothing here "
        headline += "can say whether it stayed stable, when it went wrong or why."
        if finite:
            final = _tail(loss)
            if not math.isfinite(final) or final > 2 * low:
                headline += " Its training loss ended " + (
                    f"at {final:.4g}, {final / low:.1f}x its lowest ({low:.4g} at step "
                    f"{low_step}): the run degraded unobserved."
                    if math.isfinite(final) and low > 0
                    else "not finite: the run diverged unobserved."
                )
            else:
                headline += loss_line
    elif first is None and (highest is None or highest <= 1) and not actions:
        healthy = True
        level_part = (
            f"the warning level stayed at {LEVEL_NAMES[highest]}"
            if highest is not None
            else "no warning layer ran (levels were not assessed)"
        )
        ratio = dict(rows).get("peak edge-of-stability ratio")
        edge_part = (
            f"; the edge-of-stability ratio peaked at {ratio:.3g} (1 = the edge)"
            if ratio is not None and math.isfinite(ratio)
            else ""
        )
        headline = f"Healthy: {level_part}{edge_part}; no action was needed." + loss_line
    else:
        step = first.step if first is not None else actions[0].step
        level = first.level if first is not None else 2
        cause = event_text(first.text) if first is not None else event_text(actions[0].text)
        level_series = _finite(_level_series(log))
        causes = [e for e in events if e.is_cause]
        if level_series:
            final_level = int(level_series[-1][1])
        else:
            final_level = causes[-1].level if causes else 0
        before = _before(loss, step)
        final = _tail(loss)
        recovered = final_level <= 1 and (
            not loss
            or (math.isfinite(final) and (not math.isfinite(before) or final <= 1.25 * before))
        )
        healthy = False
        highest_name = LEVEL_NAMES[highest] if highest is not None else LEVEL_NAMES[level]
        result = []
        if loss:
            result.append(
                f"the training loss ({loss_tag}) "
                + (f"ended at {final:.4g}" if math.isfinite(final) else "ended non-finite")
                + (f" against {before:.4g} before step {step}" if math.isfinite(before) else "")
            )
        result.append(f"the level at the end was {LEVEL_NAMES[final_level]}")
        verdict = "recovered" if recovered else "not recovered"
        headline = (
            f"Unstable from step {step} (highest level {highest_name}): "
            f"{LEVEL_NAMES[level]} at step {step}: {cause.rstrip('.')}. {_what_was_done(log)} "
            f"Result: {verdict}; {', '.join(result)}."
        )
    if healthy is not False:
        not_watched = [a for a, status in monitored if status == "not monitored"]
        if healthy and not_watched:
            headline += f" Not monitored: {', '.join(not_watched)}."
    return RunSummary(
        name=name,
        healthy=healthy,
        headline=headline,
        highest_level=highest,
        monitored=monitored,
        causes=events,
        rows=rows,
        advice=_advice(log, highest, first.step if first is not None else None),
    )


# ------------------------------------------------------------------ rendering


def describe(e: TimelineEntry, limit: int = 240) -> str:
    """What an event says, on one line (a bare change of level says so)."""
    return event_text(e.text, limit) or f"level {LEVEL_NAMES[e.level]}"


def _event_line(e: TimelineEntry) -> str:
    if e.is_cause:
        return f"step {e.step}: {LEVEL_NAMES[e.level].upper()}: {describe(e)}"
    return f"step {e.step}:   -> {e.source}: {describe(e)}"


def render_text(summary: RunSummary) -> str:
    """The summary as plain text (the end-of-fit message and the terminal report
    without rich)."""
    lines = [f"Stability summary: {summary.name}", "", summary.headline, ""]
    lines.append("Monitored:")
    lines += [f"  {aspect:<20} {status}" for aspect, status in summary.monitored]
    if summary.causes:
        lines += ["", "What happened (causes, then the actions they triggered):"]
        lines += [f"  {_event_line(e)}" for e in summary.causes]
    if summary.rows:
        width = max(len(label) for label, _ in summary.rows)
        lines += ["", "Readings:"]
        lines += [f"  {label:<{width}}  {format_row(label, v):>10}" for label, v in summary.rows]
    if summary.seconds_in_callbacks:
        lines += ["", "Time in callbacks (Trainer profiler):"]
        lines += [f"  {n:<24} {s:9.2f} s" for n, s in summary.seconds_in_callbacks.items()]
    if summary.advice:
        lines += ["", "Advice for the next run:"]
        lines += [f"  - {a}" for a in summary.advice]
    return "\n".join(lines)


def render_markdown(summary: RunSummary, figures: Iterable[Path] = ()) -> str:
    """The summary as a markdown report, linking ``figures`` (written beside it)."""
    verdict = {True: "healthy", False: "unstable", None: "not monitored"}[summary.healthy]
    lines = [f"# Stability report: {summary.name} ({verdict})", "", summary.headline, ""]
    lines += ["## What was monitored", "", "| aspect | status |", "|---|---|"]
    lines += [f"| {aspect} | {status} |" for aspect, status in summary.monitored]
    lines += ["", "## What happened", ""]
    if summary.causes:
        for e in summary.causes:
            if e.is_cause:
                lines.append(f"- step {e.step}: **{LEVEL_NAMES[e.level]}**: {describe(e, 400)}")
            else:
                lines.append(f"  - step {e.step}: *{e.source}*: {describe(e, 400)}")
    elif summary.healthy is None:
        lines.append("Nothing was recorded: no warning layer watched this run.")
    else:
        lines.append("No warnings, no actions.")
    if summary.rows:
        lines += ["", "## Readings", "", "| reading | value |", "|---|---:|"]
        lines += [f"| {label} | {format_row(label, v)} |" for label, v in summary.rows]
    if summary.advice:
        lines += ["", "## Advice for the next run", ""]
        lines += [f"- {a}" for a in summary.advice]
    figures = list(figures)
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ figures

_EVENT_COLORS = {0: "tab:green", 1: "tab:olive", 2: "tab:orange", 3: "tab:red"}
_ACTION_COLORS = {"lr_backoff": "tab:purple", "rollback": "k", "lr_guard": "tab:cyan"}


def _spans_decades(values: Iterable[float]) -> bool:
    positive = [v for v in values if math.isfinite(v) and v > 0]
    return (
        len(positive) > 1
        and max(positive) / min(positive) >= 30
        and all(v > 0 for v in values if math.isfinite(v))
    )


def write_figures(log: RunLog, outdir: str | os.PathLike) -> list[Path]:
    """PNG figures of the run's story, each with a title, axis labels, a log scale where
    its values span decades, its threshold lines and the events marked (changes of level
    as coloured vertical lines, actions as black ticks): the training loss, the edge ratio,
    the level with the learning rate, curvature against its edge, the gradient norm and
    the meta-state deviation, for those the run has. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    s = log.scalars
    loss_tag, _ = _loss(log)
    written: list[Path] = []

    def mark_events(ax) -> None:
        seen = set()
        for e in log.events:
            if e.is_cause:
                label = f"level -> {LEVEL_NAMES[e.level]}"
                style = {"color": _EVENT_COLORS[e.level], "lw": 1.0, "alpha": 0.7}
            else:
                label = f"action: {e.source}"
                colour = _ACTION_COLORS.get(e.source, "k")
                style = {"color": colour, "lw": 1.0, "ls": ":", "alpha": 0.9}
            ax.axvline(e.step, label=None if label in seen else label, **style)
            seen.add(label)

    def figure(name, title, ylabel, series, hlines=(), log_y=None, step=False, yticks=None):
        present = [(label, s[tag]) for label, tag in series if s.get(tag)]
        if not present:
            return
        fig, ax = plt.subplots(figsize=(8, 3.4))
        for label, data in present:
            xs, ys = zip(*data)
            kw = {"drawstyle": "steps-post"} if step else {}
            ax.plot(xs, ys, lw=1.2, label=label, marker="." if len(xs) < 60 else None, **kw)
        for value, label, style in hlines:
            ax.axhline(value, color="k", ls=style, lw=0.9, label=label)
        values = [v for _, data in present for _, v in data]
        if log_y or (log_y is None and _spans_decades(values)):
            ax.set_yscale("log")
        if yticks:
            ax.set_yticks(range(len(yticks)), yticks)
        mark_events(ax)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if loss_tag:
        figure("loss", "Training loss, with events", f"loss ({loss_tag})", [(loss_tag, loss_tag)])
    figure(
        "edge_ratio",
        "Edge-of-stability ratio (above 1: the step overshoots the curvature)",
        "ratio (dimensionless)",
        [
            ("eos_ratio (Lanczos)", SHARPNESS_EOS_RATIO),
            ("directional_ratio", SHARPNESS_DIRECTIONAL_RATIO),
        ],
        hlines=[(1.0, "edge (1)", "--")],
    )
    figure(
        "level",
        "Warning level",
        "level",
        [("level", TIMELINE.LEVEL)] if s.get(TIMELINE.LEVEL) else [("level", META_LEVEL)],
        step=True,
        log_y=False,
        yticks=list(LEVEL_NAMES),
    )
    figure(
        "learning_rate",
        "Learning rate as applied and as scheduled",
        "learning rate",
        [("applied", TIMELINE.LR_APPLIED), ("scheduled", TIMELINE.LR_SCHEDULE)],
        step=True,
    )
    figure(
        "curvature",
        "Top Hessian eigenvalue against its edge",
        "eigenvalue (loss / parameter^2)",
        [
            ("lambda_max", SHARPNESS_LAMBDA_MAX),
            ("directional", SHARPNESS_DIRECTIONAL),
            ("edge", REF_LAMBDA_EDGE),
        ],
    )
    figure(
        "gradients",
        "Gradient norm",
        "L2 norm (before clipping)",
        [("norm", GRAD_NORM), ("clip threshold", GRAD_CLIP_THRESHOLD)],
    )
    watch = [v for _, v in s.get(REF_WATCH_THRESHOLD, [])]
    figure(
        "meta_state",
        "Meta-state deviation",
        "deviation (robust standard deviations)",
        [("deviation", META_DEVIATION)],
        hlines=[(watch[-1], "watch threshold", "--")] if watch else (),
    )
    return written
