"""The default set in a real run: what lands in TensorBoard (read back with TensorBoard's
own reader), the progress bar and the end-of-run summary."""

import logging
import math

import pytest
import torch
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.profilers import SimpleProfiler
from tensorboard.backend.event_processing.event_accumulator import (
    STORE_EVERYTHING_SIZE_GUIDANCE,
    EventAccumulator,
)
from tensorboard.plugins.custom_scalar import layout_pb2
from test_actions_lr_guard import FixedEdge, LinearRegression, full_batch, regression_data

from lightning_stability import (
    EarlyWarning,
    GradientMonitor,
    LRGuard,
    StabilityDashboard,
    stability_callbacks,
)
from lightning_stability.report import (
    confirmed_max,
    find_runs,
    load_run,
    parse_entries,
    summarize,
)
from lightning_stability.tensorboard import LAYOUT_TAG, TIMELINE, chart_tags, read_layout


def _callbacks(**options):
    return stability_callbacks(
        sharpness={"every_n_steps": 10, "directional_every_n_steps": 5},
        gradients={"window": 20},
        warning={"warmup": 10},
        **options,
    )


def _read(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return acc


def _layout(acc):
    (event,) = acc.Tensors(LAYOUT_TAG)  # written once: TensorBoard reads a run's first
    return read_layout(event.tensor_proto.string_val[0])


def _written_and_shown(acc):
    """Each category's chart titles as written, and in the order TensorBoard's custom-scalars
    page shows them: its multiline charts in written order, then its margin charts in
    reverse written order (what ``test_dashboard_browser`` sees TensorBoard 2.21 do)."""
    (event,) = acc.Tensors(LAYOUT_TAG)
    proto = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    written, shown = {}, {}
    for category in proto.category:
        written[category.title] = [c.title for c in category.chart]
        margins = [c.title for c in category.chart if c.HasField("margin")]
        multilines = [c.title for c in category.chart if c.HasField("multiline")]
        shown[category.title] = multilines + margins[::-1]
    return written, shown


def _series(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _texts(acc, tag):
    return [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag + "/text_summary")
    ]


def _dashboard(callbacks):
    return next(cb for cb in callbacks if isinstance(cb, StabilityDashboard))


def test_default_set_writes_the_stability_tab_and_readings(tmp_path, caplog):
    callbacks = _callbacks()
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    t = trainer(
        max_steps=40,
        log_every_n_steps=5,
        logger=[csv, tb],
        callbacks=callbacks,
        profiler=SimpleProfiler(dirpath=tmp_path, filename="profile"),
    )
    with caplog.at_level(logging.INFO):
        t.fit(TinyClassifier(lr=0.05), loader(classification_data()))

    (run,) = find_runs(tmp_path / "tb")
    acc = _read(run)
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "stability/sharpness/lambda_max",
        "stability/sharpness/eos_ratio",
        "stability/grad/norm",
        "stability/meta/deviation",
        "stability/ref/edge",
        "stability/ref/lambda_edge",
        TIMELINE.LEVEL,
        TIMELINE.LR_APPLIED,
        TIMELINE.LR_SCHEDULE,
    ):
        assert tag in scalars, tag
    # every curvature check (steps 10, 20, 30, 40) reached TensorBoard, at its own step
    assert len(acc.Scalars("stability/sharpness/lambda_max")) == 4
    # SGD with momentum 0.9 at lr 0.05: the edge is 2 (1 + 0.9) / 0.05, not 2 / lr, and it is
    # the edge the ratio is measured against
    edge = dict(_series(acc, "stability/ref/lambda_edge"))
    assert edge and all(v == pytest.approx(2 * 1.9 / 0.05) for v in edge.values())
    ratio = dict(_series(acc, "stability/sharpness/eos_ratio"))
    for step, lam in _series(acc, "stability/sharpness/lambda_max"):
        assert lam / edge[step] == pytest.approx(ratio[step], rel=1e-5)
    assert "stability/ref/preconditioned_edge" not in scalars  # not an Adam run

    # The tab: first row = the user's loss, the edge ratio, the level, the learning rate;
    # only the charts of attached callbacks; every chart has data; units in every title.
    layout = _layout(acc)
    head = layout["Stability"]
    assert [c.tags[0] for c in head] == [
        "train_loss",
        "stability/sharpness/eos_ratio",
        TIMELINE.LEVEL,
        TIMELINE.LR_APPLIED,
    ]
    assert "stability/ref/edge" in head[1].tags and "1 = edge" in head[1].title
    assert "0 ok, 1 watch, 2 warning, 3 critical" in head[2].title
    assert not any(c.regex for c in head)  # margin charts: never smoothed
    # TensorBoard shows a category's margin charts in reverse of the written order, so they
    # are written reversed and shown in the layout's order
    written, shown = _written_and_shown(acc)
    assert written["Stability"] == [c.title for c in reversed(head)]
    assert shown["Stability"] == [c.title for c in head]
    for title, charts in layout.items():  # multiline charts show first in any category
        in_layout = [c.title for c in charts if c.regex] + [c.title for c in charts if not c.regex]
        assert shown[title] == in_layout, title
    assert "Stability: perturbation audit" not in layout  # no audit attached
    assert "Stability: actions" not in layout  # actions="none"
    for charts in layout.values():
        for chart in charts:
            assert chart_tags(chart, scalars), f"empty chart: {chart.title}"
            assert "(" in chart.title, f"no unit: {chart.title}"
    flat = [c for charts in layout.values() for c in charts]
    critical = next(c for c in flat if "critical sharpness" in c.title)
    assert critical.tags == ("stability/sharpness/critical",)  # on its own scale

    # the level is a step series of whole levels
    assert {v for _, v in _series(acc, TIMELINE.LEVEL)} <= {0.0, 1.0, 2.0, 3.0}
    # learning rate without actions: applied = scheduled, factor 1
    applied = dict(_series(acc, TIMELINE.LR_APPLIED))
    assert applied == pytest.approx(dict(_series(acc, TIMELINE.LR_SCHEDULE)))
    assert list(applied.values()) == pytest.approx([0.05] * len(applied))

    # the CSV logger got the scalars too
    csv_text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "stability/sharpness/lambda_max" in csv_text

    # the live summary is the report's summary of the event files
    dashboard = _dashboard(callbacks)
    live = dashboard.last_summary
    report = summarize("this run", load_run(run))
    assert live.rows == report.rows
    assert live.headline == report.headline
    assert live.highest_level == report.highest_level
    lambdas = [e.value for e in acc.Scalars("stability/sharpness/lambda_max")]
    assert live.values["peak lambda_max"] == pytest.approx(confirmed_max(lambdas), rel=1e-6)
    norms = [e.value for e in acc.Scalars("stability/grad/norm")]
    assert live.values["peak gradient norm"] == pytest.approx(max(norms))
    assert live.healthy is True and live.headline.startswith("Healthy")
    monitored = dict(live.monitored)
    assert monitored["curvature"].startswith("watched: 4 logged readings")
    assert monitored["perturbation audit"] == "not monitored"
    # time per callback comes from the Trainer's profiler
    assert set(live.seconds_in_callbacks) >= {"SharpnessMonitor", "GradientMonitor", "EarlyWarning"}
    assert "Stability summary" in caplog.text and "Healthy" in caplog.text
    assert _texts(acc, TIMELINE.SUMMARY)
    setup = _texts(acc, TIMELINE.SETUP)[0][1]
    assert "SharpnessMonitor" in setup and "`train_loss`" in setup


class BarReader(Callback):
    def __init__(self, bar):
        self.bar = bar
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(self.bar.get_metrics(trainer, pl_module))


def test_progress_bar_shows_level_and_ratio():
    callbacks = _callbacks()
    bar = TQDMProgressBar()
    reader = BarReader(bar)
    t = trainer(max_steps=12, callbacks=[*callbacks, bar, reader], enable_progress_bar=True)
    t.fit(TinyClassifier(), loader(classification_data()))
    assert reader.seen[0]["stab"] == "ok"
    assert float(reader.seen[-1]["eos"]) > 0
    assert not vars(bar).get("get_metrics")  # nothing of the bar's was replaced


def test_dashboard_without_tensorboard_is_silent(tmp_path):
    t = trainer(
        max_steps=10, log_every_n_steps=5, logger=CSVLogger(tmp_path), callbacks=_callbacks()
    )
    t.fit(TinyClassifier(), loader(classification_data()))
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert torch.isfinite(t.callback_metrics["stability/grad/norm"])


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="actions must be one of"):
        stability_callbacks(actions="panic")
    with pytest.raises(ValueError, match="sharpness must be True, False or a dict"):
        stability_callbacks(sharpness="often")
    with pytest.raises(ValueError, match="loss_tag must be"):
        StabilityDashboard(loss_tag="")


def nan_batch_run(tmp_path, name="with_callbacks", **trainer_kwargs):
    """The 8th batch of each epoch is NaN: CRITICAL, a backoff and a rollback at step 7.
    Returns the model, the dashboard, the log directory and the warning callback."""
    data = classification_data(n=320)
    x, y = data.tensors
    x = x.clone()
    x[7 * 32 : 8 * 32] = float("nan")
    callbacks = stability_callbacks(
        actions="backoff",
        sharpness=False,
        drift=False,
        rollback={"every": 2},
        warning={"warmup": 3},
        dashboard={"summary": False},
    )
    tb = TensorBoardLogger(tmp_path, name=name)
    t = trainer(max_steps=10, log_every_n_steps=1, logger=tb, callbacks=callbacks, **trainer_kwargs)
    model = TinyClassifier()
    t.fit(model, loader(torch.utils.data.TensorDataset(x, y), shuffle=False))
    warning = next(cb for cb in callbacks if isinstance(cb, EarlyWarning))
    return model, _dashboard(callbacks), tb.log_dir, warning


def test_events_of_a_step_are_one_text_entry_and_step_series(tmp_path):
    model, dashboard, log_dir, warning = nan_batch_run(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    acc = _read(log_dir)

    # one text entry per step, with every event of the step, the cause first; it is the
    # only text record of events, and holds each warning's whole message
    texts = _texts(acc, TIMELINE.TEXT)
    assert len({step for step, _ in texts}) == len(texts)
    text_tags = {tag.removesuffix("/text_summary") for tag in acc.Tags()["tensors"]}
    assert text_tags - {LAYOUT_TAG} == {TIMELINE.TEXT, TIMELINE.SETUP, TIMELINE.SUMMARY}
    written = [e for s, t in texts for e in parse_entries(s, t) if e.is_cause]
    assert warning.events
    assert [e.text for e in written] == [" ".join(e.message.split()) for e in warning.events]
    (step, text) = next((s, t) for s, t in texts if "rollback" in t)
    sources = [e.source for e in parse_entries(step, text)]
    assert sources == ["early_warning", "lr_backoff", "rollback"]
    assert parse_entries(step, text)[0].level == 3

    # the level shows CRITICAL at that step though the rollback re-armed it at once, and
    # is a step function around it
    level = dict(_series(acc, TIMELINE.LEVEL))
    assert level[step] == 3.0 and level[step - 1] == 0.0 and level[step + 1] == 0.0
    rollbacks = dict(_series(acc, TIMELINE.ROLLBACKS))
    assert rollbacks[step - 1] == 0.0 and rollbacks[step] == 1.0
    # the learning rate: the cut applies from the next step; the schedule is untouched
    applied = dict(_series(acc, TIMELINE.LR_APPLIED))
    schedule = dict(_series(acc, TIMELINE.LR_SCHEDULE))
    factor = dict(_series(acc, TIMELINE.LR_FACTOR))
    assert applied[step] == pytest.approx(0.05) and applied[step + 1] == pytest.approx(0.025)
    assert list(schedule.values()) == pytest.approx([0.05] * len(schedule))
    assert factor[step + 1] == pytest.approx(0.5)
    # the loss at the event is marked on the loss chart (NaN: the poisoned batch)
    assert math.isnan(dict(_series(acc, TIMELINE.EVENT_LOSS))[step])

    summary = dashboard.last_summary
    assert summary.highest_level == 3 and summary.healthy is False
    assert summary.values["highest level"] == 3.0
    assert [e.source for e in summary.causes[:3]] == ["early_warning", "lr_backoff", "rollback"]


def test_learning_rate_as_applied_includes_the_guards_clamp(tmp_path):
    # StepLR halves the requested rate every step; with a fixed edge reading of 4 at
    # lr 0.1 the guard (margin 0.5) applies 1.5/4 and 1.5/2 of the first two steps
    def halving(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    tb = TensorBoardLogger(tmp_path)
    callbacks = [FixedEdge(4.0, 0.1), LRGuard(margin=0.5, confirm=1), StabilityDashboard()]
    t = trainer(max_steps=4, log_every_n_steps=1, logger=tb, callbacks=callbacks)
    t.fit(LinearRegression(0.1, halving), full_batch(regression_data()))
    acc = _read(tb.log_dir)
    applied = [v for _, v in _series(acc, TIMELINE.LR_APPLIED)]
    schedule = [v for _, v in _series(acc, TIMELINE.LR_SCHEDULE)]
    assert applied == pytest.approx([0.0375, 0.0375, 0.025, 0.0125], rel=1e-6)
    assert schedule == pytest.approx([0.1, 0.05, 0.025, 0.0125], rel=1e-6)
    layout = _layout(acc)
    assert "stability/action/lr_guard_scale" in layout["Stability: actions"][0].tags


@pytest.mark.parametrize("adaptive", [False, True])
def test_adaptive_clipping_gets_the_clipping_chart_and_is_named_an_action(tmp_path, adaptive):
    from lightning_stability.actions.adaptive_clip import AdaptiveGradientClipping

    tb = TensorBoardLogger(tmp_path)
    callbacks = [GradientMonitor(), StabilityDashboard()]
    if adaptive:
        callbacks.insert(1, AdaptiveGradientClipping(warmup=2))
    t = trainer(max_steps=4, log_every_n_steps=1, logger=tb, callbacks=callbacks)
    t.fit(TinyClassifier(), loader(classification_data(128)))
    acc = _read(tb.log_dir)
    titles = [c.title for charts in _layout(acc).values() for c in charts]
    clipping = [t for t in titles if t.startswith("gradient clipping")]
    assert bool(clipping) == adaptive
    names = dict(summarize("run", load_run(tb.log_dir)).monitored)["actions"]
    assert ("AdaptiveGradientClipping" in names) == adaptive
