"""The default set in a real run: what lands in TensorBoard, the progress bar and the
end-of-run summary."""

import pytest
import torch
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import (
    STORE_EVERYTHING_SIZE_GUIDANCE,
    EventAccumulator,
)

from lightning_stability import StabilityDashboard, stability_callbacks
from lightning_stability.report import confirmed_max, find_runs


def _callbacks():
    return stability_callbacks(
        sharpness={"every_n_steps": 10, "directional_every_n_steps": 5},
        gradients={"window": 20},
        warning={"warmup": 10},
    )


def test_default_set_writes_the_stability_tab_and_readings(tmp_path, capsys):
    callbacks = _callbacks()
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    t = trainer(max_steps=40, log_every_n_steps=5, logger=[csv, tb], callbacks=callbacks)
    t.fit(TinyClassifier(lr=0.05), loader(classification_data()))

    (run,) = find_runs(tmp_path / "tb")
    acc = EventAccumulator(str(run), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "stability/sharpness/lambda_max",
        "stability/sharpness/eos_ratio",
        "stability/sharpness/directional",
        "stability/grad/norm",
        "stability/loss/value",
        "stability/meta/deviation",
        "stability/meta/level",
        "stability/ref/edge",
        "stability/ref/lambda_edge",
    ):
        assert tag in scalars, tag
    # every curvature check (steps 10, 20, 30, 40) reached TensorBoard, at its own step
    assert len(acc.Scalars("stability/sharpness/lambda_max")) == 4
    # SGD with momentum 0.9 at lr 0.05: the edge is 2 (1 + 0.9) / 0.05, not 2 / lr, and it is
    # the edge the ratio is measured against
    edge = {e.step: e.value for e in acc.Scalars("stability/ref/lambda_edge")}
    assert edge and all(v == pytest.approx(2 * 1.9 / 0.05) for v in edge.values())
    ratio = {e.step: e.value for e in acc.Scalars("stability/sharpness/eos_ratio")}
    for e in acc.Scalars("stability/sharpness/lambda_max"):
        assert e.value / edge[e.step] == pytest.approx(ratio[e.step], rel=1e-5)
    assert "stability/ref/preconditioned_edge" not in scalars  # not an Adam run
    # the custom-scalars layout (a plugin tensor) is there once
    tensors = acc.Tags()["tensors"]
    assert "custom_scalars__config__" in tensors
    assert "stability/summary/text_summary" in tensors

    # the CSV logger got the scalars too
    csv_text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "stability/sharpness/lambda_max" in csv_text

    dashboard = next(cb for cb in callbacks if isinstance(cb, StabilityDashboard))
    summary = dict(dashboard.last_summary.rows)
    lambdas = [e.value for e in acc.Scalars("stability/sharpness/lambda_max")]
    assert summary["peak lambda_max"] == pytest.approx(confirmed_max(lambdas), rel=1e-6)
    # gradient readings are stamped before the step increments; the peak still sees them
    norms = [e.value for e in acc.Scalars("stability/grad/norm")]
    assert summary["peak gradient norm"] >= max(norms) > 0
    assert set(dashboard.last_summary.seconds_in_callbacks) >= {
        "SharpnessMonitor",
        "GradientMonitor",
        "EarlyWarning",
    }
    assert "Stability summary" in capsys.readouterr().out


def test_progress_bar_shows_level_and_ratio():
    callbacks = _callbacks()
    bar = TQDMProgressBar()
    t = trainer(max_steps=12, callbacks=[*callbacks, bar], enable_progress_bar=True)
    model = TinyClassifier()
    t.fit(model, loader(classification_data()))
    # during fit the bar's metrics carry the level; after teardown the wrapper is gone
    assert "get_metrics" not in bar.__dict__
    dashboard = next(cb for cb in callbacks if isinstance(cb, StabilityDashboard))
    dashboard.setup(t, model, "fit")
    metrics = bar.get_metrics(t, model)
    assert metrics["stab"] == "ok"
    assert float(metrics["eos"]) > 0
    dashboard.teardown(t, model, "fit")


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


def test_actions_and_warnings_reach_tensorboard_as_text(tmp_path):
    data = classification_data(n=320)
    x, y = data.tensors
    x = x.clone()
    x[7 * 32 : 8 * 32] = float("nan")  # the 8th batch poisons the loss
    callbacks = stability_callbacks(
        actions="backoff",
        sharpness=False,
        rollback={"every": 2},
        warning={"warmup": 3},
        dashboard={"summary": False},
    )
    tb = TensorBoardLogger(tmp_path)
    t = trainer(max_steps=10, log_every_n_steps=1, logger=tb, callbacks=callbacks)
    model = TinyClassifier()
    t.fit(model, loader(torch.utils.data.TensorDataset(x, y), shuffle=False))
    assert all(torch.isfinite(p).all() for p in model.parameters())

    acc = EventAccumulator(tb.log_dir, size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    texts = {
        tag: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
        if tag.endswith("text_summary")
    }
    assert any("critical" in m for m in texts["stability/events/text_summary"])
    assert any(m.startswith("**rollback**") for m in texts["stability/actions/text_summary"])
    dashboard = next(cb for cb in callbacks if isinstance(cb, StabilityDashboard))
    assert any("rollback" in text for _, text in dashboard.last_summary.events)
