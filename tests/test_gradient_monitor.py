"""GradientMonitor against gradients measured by hand, clipping, resume, DDP; adaptive clipping."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import (
    DumpOnFitEnd,
    TinyClassifier,
    classification_data,
    ddp_trainer,
    flat_weights,
    load_ranks,
    loader,
    trainer,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_stability.actions.adaptive_clip import AdaptiveGradientClipping
from lightning_stability.probes.gradients import GradientMonitor
from lightning_stability.probes.loss import LossMonitor


class HandRecorder(Callback):
    """Placed after the monitor: the hand-computed pre-clip norm, the monitor's readings of
    the same step, the norm the optimizer receives, and the weights before each step."""

    def __init__(self, monitor: GradientMonitor | None = None) -> None:
        self.monitor = monitor
        self.pre, self.post, self.maxabs, self.weights, self.readings = [], [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.pre.append(float(torch.nn.utils.get_total_norm(grads)))
        self.maxabs.append(max(float(g.abs().max()) for g in grads))
        self.weights.append(flat_weights(pl_module))
        if self.monitor is not None:
            self.readings.append({k: r.value for k, r in self.monitor.readings.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.post.append(float(torch.nn.utils.get_total_norm(grads)))
        if self.monitor is not None and self.monitor._measure_post_clip:
            self.readings[-1].update({k: r.value for k, r in self.monitor.readings.items()})


def _fit(callbacks, steps=16, model=None, **kw):
    torch.manual_seed(0)
    model = model or TinyClassifier(lr=0.5)
    t = trainer(max_steps=steps, callbacks=callbacks, **kw)
    t.fit(model, loader(classification_data(), shuffle=False))
    return model, t


def _between_median(values: list[float]) -> float:
    """A threshold halfway between two middle values, so that no step ties with it."""
    v = sorted(values)
    return 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_pre_clip_norm_and_clip_events_match_hand_computation(algorithm):
    monitor = GradientMonitor(window=8, group_depth=2, log_every_n_steps=1)
    rec = HandRecorder(monitor)
    probe = HandRecorder()
    _fit([probe])
    threshold = _between_median(probe.maxabs if algorithm == "value" else probe.pre)
    _fit([monitor, rec], gradient_clip_val=threshold, gradient_clip_algorithm=algorithm)
    seen = rec.maxabs if algorithm == "value" else rec.pre
    expected = [float(v > threshold) for v in seen]
    events = [r["stability/grad/clip_event"] for r in rec.readings]
    assert 0 < sum(expected) < len(expected)  # the scripted run has both kinds of steps
    assert events == expected
    for i, r in enumerate(rec.readings):
        assert r["stability/grad/norm"] == pytest.approx(rec.pre[i], rel=1e-6)
        assert r["stability/grad/clip_threshold"] == threshold
        window = expected[max(0, i - 7) : i + 1]
        assert r["stability/grad/clip_rate"] == pytest.approx(sum(window) / len(window))
        if algorithm == "norm":
            # Ground truth that clipping really engaged exactly on those steps.
            assert (rec.post[i] < rec.pre[i] * (1 - 1e-6)) == bool(expected[i])
    # Per-group norms (group_depth=2: the two Linear layers) combine to the total norm.
    last = rec.readings[0]
    groups = {k: v for k, v in last.items() if k.startswith("stability/grad/group/")}
    assert set(groups) == {"stability/grad/group/net.0", "stability/grad/group/net.2"}
    assert math.sqrt(sum(v * v for v in groups.values())) == pytest.approx(rec.pre[0], rel=1e-5)


class EvenStepClipper(TinyClassifier):
    """Custom clipping: halves the gradients on even steps only."""

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        if self.trainer.global_step % 2 == 0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.5)


def test_custom_configure_gradient_clipping_is_detected_from_the_received_norm():
    monitor = GradientMonitor(window=100)
    rec = HandRecorder(monitor)
    _fit([monitor, rec], steps=8, model=EvenStepClipper(lr=0.5))
    assert [r["stability/grad/clip_event"] for r in rec.readings] == [1.0, 0.0] * 4
    assert rec.readings[-1]["stability/grad/clip_rate"] == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ["full", "sample"])
def test_update_ratio_matches_weight_change(mode):
    monitor = GradientMonitor(update_ratio=mode, update_sample=10_000, group_depth=0)
    rec = HandRecorder(monitor)
    _fit([monitor, rec], steps=6)
    assert "stability/grad/update_ratio" not in rec.readings[0]  # no previous step yet
    for i in range(1, 6):
        w_prev, w_now = rec.weights[i - 1], rec.weights[i]
        truth = float((w_now - w_prev).norm() / w_now.norm())
        r = rec.readings[i]
        assert r["stability/grad/update_ratio"] == pytest.approx(truth, rel=1e-5)
        assert r["stability/grad/weight_norm"] == pytest.approx(float(w_now.norm()), rel=1e-6)


def test_sampled_update_ratio_is_close_with_a_fraction_of_the_coordinates():
    torch.manual_seed(0)
    model = TinyClassifier(d=64, hidden=256, classes=10)
    monitor = GradientMonitor(update_sample=4096, group_depth=0)
    rec = HandRecorder(monitor)
    data = TensorDataset(torch.randn(64, 64), torch.randint(0, 10, (64,)))
    t = trainer(max_steps=4, callbacks=[monitor, rec])
    t.fit(model, loader(data, shuffle=False))
    n = sum(p.numel() for p in model.parameters())
    assert n > 4 * 4096  # really a subset
    for i in range(1, 4):
        truth = float((rec.weights[i] - rec.weights[i - 1]).norm() / rec.weights[i].norm())
        assert rec.readings[i]["stability/grad/update_ratio"] == pytest.approx(truth, rel=0.1)


@pytest.mark.parametrize("which", ["grad", "loss", "both"])
def test_monitors_leave_training_bit_identical(which):
    def run(callbacks):
        torch.manual_seed(0)
        model = TinyClassifier(opt="adam", norm=True, dropout=0.2, lr=0.01)
        t = trainer(max_steps=12, callbacks=callbacks, gradient_clip_val=0.5, log_every_n_steps=1)
        t.fit(model, loader(classification_data(), shuffle=True))
        return flat_weights(model)

    bare = run([])
    monitors = {
        "grad": [GradientMonitor(window=4, log_every_n_steps=1)],
        "loss": [LossMonitor(window=4)],
        "both": [GradientMonitor(window=4, log_every_n_steps=1), LossMonitor(window=4)],
    }[which]
    monitored = run(monitors)
    assert monitors[0].readings  # it did measure
    assert torch.equal(bare, monitored)


def test_nonfinite_gradients_are_counted():
    x = torch.randn(64, 10)
    x[3, 0] = float("inf")
    data = TensorDataset(x, torch.randint(0, 3, (64,)))
    monitor = GradientMonitor()
    t = trainer(max_steps=1, callbacks=[monitor])
    t.fit(TinyClassifier(), loader(data, batch_size=64, shuffle=False))
    assert monitor.readings["stability/grad/nonfinite"].value > 0
    assert math.isnan(monitor.readings["stability/grad/norm"].value)


def test_resume_keeps_windows_and_emas(tmp_path):
    def callbacks():
        return [
            GradientMonitor(window=50),
            LossMonitor(window=50),
            AdaptiveGradientClipping(warmup=100, alpha=0.1),
        ]

    first = callbacks()
    _, t1 = _fit(first, steps=6)
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    torch.load(ckpt, weights_only=True)  # callback state is plain data
    resumed = callbacks()
    t2 = trainer(max_steps=9, callbacks=resumed)
    t2.fit(TinyClassifier(lr=0.5), loader(classification_data(), shuffle=False), ckpt_path=ckpt)
    g1, l1, a1 = first
    g2, l2, a2 = resumed
    # The restored windows continue: the first run's values, then three new ones.
    assert g2.norm_window.values()[:6] == g1.norm_window.values()
    assert len(g2.norm_window) == 9 and g2.norm_window.total == 9
    assert l2.loss_window.values()[:6] == l1.loss_window.values()
    assert l2.worst_window.values()[:6] == l1.worst_window.values() and l2.loss_window.total == 9
    # The EMA went on from the saved one: replaying the three new norms reproduces it.
    ema = a1.ema
    for v in g2.norm_window.values()[6:]:
        ema.update(v)
    assert (a2.ema.mean, a2.ema.count) == (pytest.approx(ema.mean, rel=1e-9), 9)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="update_ratio"):
        GradientMonitor(update_ratio="exact")
    with pytest.raises(ValueError, match="window"):
        GradientMonitor(window=0)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        GradientMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match="mode"):
        AdaptiveGradientClipping(mode="auto")
    with pytest.raises(ValueError, match="percentile"):
        AdaptiveGradientClipping(percentile=0)


# ------------------------------------------------------------------ adaptive clipping

SPIKE_STEP = 14


def _spiked_loader():
    x, y = classification_data(n=32 * 20).tensors
    x = x.clone()
    x[32 * SPIKE_STEP : 32 * (SPIKE_STEP + 1)] *= 100.0
    return loader(TensorDataset(x, y), shuffle=False)


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_adaptive_clipping_bounds_a_planted_spike_and_leaves_other_steps(mode):
    def run(callbacks):
        torch.manual_seed(0)
        model = TinyClassifier(lr=0.05)
        rec = HandRecorder()
        t = trainer(max_steps=SPIKE_STEP + 4, callbacks=[*callbacks, rec])
        t.fit(model, _spiked_loader())
        return rec

    bare = run([])
    clip = AdaptiveGradientClipping(mode=mode, z=4.0, percentile=100.0, warmup=5)
    monitor = GradientMonitor()
    seen = []
    clip.add_listener(lambda event, trainer, module: seen.append(event))
    clipped = run([clip, monitor])  # the action first: the monitor must still see pre-clip
    assert bare.pre[SPIKE_STEP] > 3 * max(bare.pre[:SPIKE_STEP])  # the spike is real
    assert [e.step for e in clip.events] == [SPIKE_STEP]
    assert seen == clip.events and clip.events[0].source == "adaptive_clip"
    threshold = clip.events[0].details["threshold"]
    assert clipped.post[SPIKE_STEP] == pytest.approx(threshold, rel=1e-4)
    assert clipped.post[SPIKE_STEP] < 2 * max(bare.pre[:SPIKE_STEP])  # back in the usual range
    # Ordinary steps untouched: identical weights up to and including the spike step.
    for i in range(SPIKE_STEP + 1):
        assert torch.equal(clipped.weights[i], bare.weights[i])
    # The monitor measured the spike before the action scaled it, though it runs later.
    assert monitor.norm_window.values()[SPIKE_STEP] == pytest.approx(bare.pre[SPIKE_STEP], rel=1e-6)
    assert monitor.clip_window.values()[SPIKE_STEP] == 1.0
    assert sum(monitor.clip_window.values()) == 1.0


# ------------------------------------------------------------------------------ DDP


def _readings_history(trainer, pl_module):
    rec = next(c for c in trainer.callbacks if isinstance(c, _History))
    return {"rank": trainer.global_rank, "history": rec.history}


class _History(Callback):
    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        merged = {}
        for cb in trainer.callbacks:
            if isinstance(cb, (GradientMonitor, LossMonitor)):
                merged.update({k: r.value for k, r in cb.readings.items()})
        self.history.append(merged)


@pytest.mark.ddp
def test_ddp_ranks_publish_the_same_synchronised_values(tmp_path):
    steps = 4
    logger = CSVLogger(tmp_path / "logs", name="run")
    t = ddp_trainer(
        max_steps=steps,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[
            GradientMonitor(log_every_n_steps=1),
            LossMonitor(),
            _History(),
            DumpOnFitEnd(tmp_path, _readings_history),
        ],
    )
    torch.manual_seed(0)
    t.fit(TinyClassifier(lr=0.5), loader(classification_data(), batch_size=16, shuffle=False))
    r0, r1 = load_ranks(tmp_path)
    assert len(r0["history"]) == steps
    for a, b in zip(r0["history"], r1["history"]):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)

    # Ground truth: one process on the union of both ranks' batches, whose mean-loss
    # gradient is the all-reduced one. Lightning gives training loaders a shuffling
    # DistributedSampler seeded from PL_GLOBAL_SEED; rebuild the same index sets.
    dataset = classification_data()
    seed = int(os.getenv("PL_GLOBAL_SEED", 0))
    per_rank = [
        list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=seed))
        for r in range(2)
    ]
    batches = [
        per_rank[0][16 * k : 16 * k + 16] + per_rank[1][16 * k : 16 * k + 16] for k in range(steps)
    ]
    single = _History()
    t1 = trainer(max_steps=steps, callbacks=[GradientMonitor(), LossMonitor(), single])
    torch.manual_seed(0)
    t1.fit(TinyClassifier(lr=0.5), DataLoader(dataset, batch_sampler=batches))
    for multi, one in zip(r0["history"], single.history):
        for key in ("stability/grad/norm", "stability/loss/value", "stability/grad/weight_norm"):
            assert multi[key] == pytest.approx(one[key], rel=1e-5)
    # The worst rank's loss is at least the mean.
    assert r0["history"][0]["stability/loss/tail_max"] >= r0["history"][0]["stability/loss/value"]

    runs = list((tmp_path / "logs" / "run").iterdir())
    assert len(runs) == 1  # only rank 0 writes
    header = (runs[0] / "metrics.csv").read_text().splitlines()[0]
    assert "stability/grad/norm" in header and "stability/loss/tail_q" in header


def test_amp_norms_are_of_unscaled_gradients():
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    monitor = GradientMonitor()
    rec = HandRecorder(monitor)
    _fit(
        [monitor, rec],
        steps=4,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        gradient_clip_val=10.0,
    )
    reference = HandRecorder()
    _fit([reference], steps=1)
    assert scaler.get_scale() > 1.0  # the loss really was scaled
    assert rec.readings[0]["stability/grad/norm"] == pytest.approx(reference.pre[0], rel=2e-2)
    for r, pre in zip(rec.readings, rec.pre):
        assert r["stability/grad/norm"] == pytest.approx(pre, rel=1e-6)
        assert r["stability/grad/clip_event"] == 0.0


class TwoGroupAdam(TinyClassifier):
    """Adam with one group per layer, the second with the given ``betas``."""

    def __init__(self, betas: tuple[float, float]) -> None:
        super().__init__(opt="adam", lr=1e-3)
        self.betas = betas

    def configure_optimizers(self):
        first, *_, last = [m for m in self.net if isinstance(m, torch.nn.Linear)]
        return torch.optim.Adam(
            [{"params": first.parameters()}, {"params": last.parameters(), "betas": self.betas}],
            lr=self.lr,
        )


def test_unbounded_adam_groups_is_the_beta2_below_beta1_squared_rule():
    from lightning_stability.probes.gradients import unbounded_adam_groups

    w = [torch.nn.Parameter(torch.zeros(2))]
    cases = {(0.9, 0.999): [], (0.9, 0.82): [], (0.9, 0.8): ["optimizer 0, group 0"]}
    for (b1, b2), expected in cases.items():
        found = unbounded_adam_groups([torch.optim.Adam(w, betas=(b1, b2))])
        assert [f.split(" (")[0] for f in found] == expected, (b1, b2)
    # no betas at all (SGD) is never flagged
    assert unbounded_adam_groups([torch.optim.SGD(w, lr=0.1)]) == []


@pytest.mark.parametrize("betas, warns", [((0.9, 0.5), True), ((0.9, 0.95), False)])
def test_fit_start_warns_about_the_group_with_unbounded_adam_steps(betas, warns, recwarn):
    t = trainer(max_steps=2, callbacks=[GradientMonitor()])
    t.fit(TwoGroupAdam(betas), loader(classification_data(64)))
    messages = [str(w.message) for w in recwarn if "beta2 < beta1**2" in str(w.message)]
    if warns:
        assert len(messages) == 1
        assert "optimizer 0, group 1 (betas=0.9, 0.5)" in messages[0]
        assert "group 0" not in messages[0]
    else:
        assert messages == []
