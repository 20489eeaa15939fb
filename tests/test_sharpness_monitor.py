"""SharpnessMonitor against exact Hessians, bit-identical training, the edge of stability
under full-batch gradient descent, DDP, resume and mixed precision."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
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
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stability import SharpnessCadence, SharpnessEstimator, SharpnessMeasures
from lightning_stability.estimators.hvp import unflatten
from lightning_stability.probes.config import SHARPNESS_FLAT_ALIASES
from lightning_stability.probes.sharpness import SharpnessMonitor

KEY = "stability/sharpness/"


# ----------------------------------------------------------------------------- helpers
def exact_hessian(module: nn.Module, batches: list) -> torch.Tensor:
    """Float64 Hessian of the mean cross-entropy of ``module`` over ``batches``."""
    m = copy.deepcopy(module).double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p.detach() for n, p in m.named_parameters() if p.requires_grad]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss(w):
        tensors = dict(zip(names, unflatten(w, params)))
        losses = [
            nn.functional.cross_entropy(torch.func.functional_call(m, tensors, (x.double(),)), y)
            for x, y in batches
        ]
        return torch.stack(losses).mean()

    return torch.autograd.functional.hessian(loss, flat), torch.autograd.functional.jacobian(
        loss, flat
    )


def monitor_of(t: pl.Trainer) -> SharpnessMonitor:
    return next(cb for cb in t.callbacks if isinstance(cb, SharpnessMonitor))


def value(cb: SharpnessMonitor, name: str) -> float:
    return cb.readings[KEY + name].value


class CheckSteps(Callback):
    """Records the steps at which the monitor ran Lanczos (placed after it)."""

    def __init__(self, monitor: SharpnessMonitor) -> None:
        self.monitor, self.steps = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = self.monitor.readings.get(KEY + "lambda_max")
        if r is not None and r.step == trainer.global_step and r.step not in self.steps:
            self.steps.append(r.step)


# ------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_readings_match_the_exact_hessian(opt):
    model = TinyClassifier(opt=opt, lr=0.05)
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=5, directional_every_n_steps=5),
        estimator=SharpnessEstimator(k=2, tol=1e-6, max_iter=60),
    )
    t = trainer(max_steps=5, callbacks=[cb])
    t.fit(model, loader(classification_data()))
    h, g = exact_hessian(model, cb._batches)
    eig = torch.linalg.eigvalsh(h)
    assert value(cb, "lambda_max") == pytest.approx(float(eig[-1]), rel=1e-4)
    assert value(cb, "lambda_1") == pytest.approx(float(eig[-2]), rel=1e-4)
    directional = float(g @ h @ g / (g @ g))
    assert value(cb, "directional") == pytest.approx(directional, rel=1e-3)
    # SGD: the same momentum-aware edge as eos_ratio, 2 (1 + 0.9) / lr; Adam: 2 / lr
    edge = 2 * 1.9 / 0.05 if opt == "sgd" else 2 / 0.05
    assert value(cb, "directional_ratio") == pytest.approx(directional / edge, rel=1e-3)
    assert value(cb, "critical") > 0 and math.isfinite(value(cb, "critical"))
    assert value(cb, "hvps") >= 2
    optimizer = t.optimizers[0]
    if opt == "sgd":  # momentum 0.9: edge 2 (1 + 0.9) / lr
        assert value(cb, "eos_ratio") == pytest.approx(float(eig[-1]) * 0.05 / 3.8, rel=1e-4)
        assert KEY + "preconditioned" not in cb.readings
    else:
        d = []
        for p in model.parameters():
            s = optimizer.state[p]
            d.append((s["exp_avg_sq"].double() / (1 - 0.999 ** float(s["step"]))).sqrt() + 1e-8)
        d = torch.cat([x.reshape(-1) for x in d])
        pre = float(torch.linalg.eigvals(h / d[:, None]).real.max())
        assert value(cb, "preconditioned") == pytest.approx(pre, rel=1e-3)
        assert value(cb, "eos_ratio") == pytest.approx(pre * 0.05 * 0.1 / (2 * 1.9), rel=1e-3)


# ----------------------------------------------------------------- no side effects
@pytest.mark.parametrize(("opt", "accumulate"), [("sgd", 1), ("adam", 1), ("sgd", 2)])
def test_training_is_bit_identical_with_and_without_the_monitor(opt, accumulate):
    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        model = TinyClassifier(opt=opt, norm=True, dropout=0.3)
        t = trainer(
            max_steps=9,
            callbacks=callbacks,
            gradient_clip_val=0.5,
            accumulate_grad_batches=accumulate,
        )
        t.fit(model, loader(classification_data(), batch_size=16, shuffle=True))
        return flat_weights(model), [b.clone() for b in model.buffers()]

    cb = SharpnessMonitor(
        cadence=SharpnessCadence(
            every_n_steps=3, directional_every_n_steps=2, ratio_threshold=1e-6
        ),
        measures=SharpnessMeasures(trace=True, trace_samples=6),
    )
    weights, buffers = run([cb])
    bare_weights, bare_buffers = run([])
    assert torch.equal(weights, bare_weights)
    assert all(torch.equal(a, b) for a, b in zip(buffers, bare_buffers))
    # It did measure, with every reading that runs during a step (not vacuous).
    for name in ("lambda_max", "eos_ratio", "directional", "critical", "trace", "shift"):
        assert KEY + name in cb.readings, name
    assert (KEY + "preconditioned" in cb.readings) == (opt == "adam")


# ------------------------------------------------------------- edge of stability
def test_full_batch_gd_sharpness_rises_to_two_over_lr():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:300], dtype=torch.float32) / 16, torch.tensor(y[:300])
    lr = 0.25

    class MSEMLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
            )

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            target = nn.functional.one_hot(yb, 10).float()
            return 0.5 * ((self.net(xb) - target) ** 2).sum(dim=1).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=10, adaptive=False),
        estimator=SharpnessEstimator(max_iter=20),
        measures=SharpnessMeasures(directional=False),
    )
    ratios = {}

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            r = cb.readings.get(KEY + "eos_ratio")
            if r is not None and r.step == trainer.global_step:
                ratios[r.step] = r.value
                assert cb.readings[KEY + "lambda_max"].value * lr / 2 == pytest.approx(r.value)

    t = trainer(max_steps=200, callbacks=[cb, Record()])
    t.fit(MSEMLP(), DataLoader(TensorDataset(x, y), batch_size=len(x)))
    steps = sorted(ratios)
    assert ratios[steps[0]] < 0.9  # starts below the edge (progressive sharpening)
    late = torch.tensor([ratios[s] for s in steps if s >= 120])
    assert 0.9 <= float(late.median()) <= 1.3
    assert float(late.min()) >= 0.75 and float(late.max()) <= 1.45


# ------------------------------------------------------------------------- DDP
def _ddp_extract(trainer, pl_module):
    cb = monitor_of(trainer)
    return {
        "weights": flat_weights(pl_module),
        "batches": cb._batches,
        "readings": {k: r.value for k, r in cb.readings.items()},
    }


@pytest.mark.ddp
def test_ddp_lambda_max_is_that_of_the_union_of_rank_batches(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = TinyClassifier()
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=3, directional_every_n_steps=3),
        estimator=SharpnessEstimator(tol=1e-6, max_iter=60),
    )
    t = ddp_trainer(
        max_steps=3,
        callbacks=[cb, DumpOnFitEnd(tmp_path, _ddp_extract)],
        logger=CSVLogger(tmp_path / "logs"),
        log_every_n_steps=1,
    )
    t.fit(model, loader(classification_data(), batch_size=16, shuffle=False))
    r0, r1 = load_ranks(tmp_path)
    assert r0["readings"] == r1["readings"]
    assert not torch.equal(r0["batches"][0][0], r1["batches"][0][0])  # each rank its own batch
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(r0["weights"], model.parameters())
    union = [
        (
            torch.cat([r0["batches"][0][0], r1["batches"][0][0]]),
            torch.cat([r0["batches"][0][1], r1["batches"][0][1]]),
        )
    ]
    h, g = exact_hessian(model, union)
    assert r0["readings"][KEY + "lambda_max"] == pytest.approx(
        float(torch.linalg.eigvalsh(h)[-1]), rel=1e-4
    )
    assert r0["readings"][KEY + "directional"] == pytest.approx(
        float(g @ h @ g / (g @ g)), rel=1e-3
    )
    csvs = list((tmp_path / "logs").rglob("metrics.csv"))
    assert len(csvs) == 1 and KEY + "lambda_max" in csvs[0].read_text().splitlines()[0]


# ----------------------------------------------------------------- state / resume
def test_resume_keeps_cadence_eigenvector_and_counters(tmp_path):
    def monitor():  # ratio_threshold tiny: the first check tightens the cadence 8 -> 2
        return SharpnessMonitor(
            cadence=SharpnessCadence(
                every_n_steps=8, directional_every_n_steps=8, ratio_threshold=1e-9
            )
        )

    pl.seed_everything(0, verbose=False)
    cb = monitor()
    steps = CheckSteps(cb)
    t = trainer(max_steps=10, callbacks=[cb, steps])
    model = TinyClassifier()
    data = loader(classification_data(), shuffle=False)
    t.fit(model, data)
    assert steps.steps == [8, 10] and cb.interval == 2
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][cb.state_key]
    assert state["eigvecs"].shape == (sum(p.numel() for p in model.parameters()), 1)
    assert state["next_check"] == 12 and state["num_checks"] == 2

    cb2 = monitor()
    steps2 = CheckSteps(cb2)
    trainer(max_steps=14, callbacks=[cb2, steps2]).fit(TinyClassifier(), data, ckpt_path=path)
    assert steps2.steps == [12, 14]  # a fresh monitor would check at 11 and 13
    assert cb2.num_checks == 4
    assert KEY + "shift" in cb2.readings and cb2.readings[KEY + "shift"].step >= 12
    # The probe batch travels with the checkpoint: the resumed monitor measures the same one.
    assert all(torch.equal(a, b) for a, b in zip(cb2._batches[0], cb._batches[0]))


# ----------------------------------------------------------------- adaptive cadence
class Watch(Callback):
    """Stands in for the warning layer: asks for closer watch before step ``until``."""

    def __init__(self, until: int) -> None:
        self.until = until
        self.request_closer_watch = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.request_closer_watch = trainer.global_step < self.until


def test_closer_watch_request_tightens_then_backs_off():
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=8, ratio_threshold=1e9),
        measures=SharpnessMeasures(directional=False),
    )
    steps = CheckSteps(cb)
    trainer(max_steps=16, callbacks=[Watch(until=7), cb, steps]).fit(
        TinyClassifier(), loader(classification_data())
    )
    assert steps.steps == [2, 4, 6, 8, 16]


# ------------------------------------------------------------------ mixed precision
def test_bf16_mixed_measures_in_float32():
    model = TinyClassifier()
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=4, directional_every_n_steps=4),
        estimator=SharpnessEstimator(tol=1e-6, max_iter=60),
    )
    trainer(max_steps=4, callbacks=[cb], precision="bf16-mixed").fit(
        model, loader(classification_data())
    )
    h, g = exact_hessian(model, cb._batches)
    assert value(cb, "lambda_max") == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-4)
    assert value(cb, "directional") == pytest.approx(float(g @ h @ g / (g @ g)), rel=1e-3)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": -3}, "every_n_steps"),
        ({"k": 0}, "k"),
        ({"backend": "scipy"}, "backend"),
        ({"directional_every_n_steps": 0}, "directional_every_n_steps"),
        ({"dtype": "float16"}, "dtype"),
        ({"adaptive_factor": 0}, "adaptive_factor"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    (field,) = kwargs
    group, _ = SHARPNESS_FLAT_ALIASES[field]
    config = {"cadence": SharpnessCadence, "estimator": SharpnessEstimator}[group]
    with pytest.raises(ValueError, match=name):
        SharpnessMonitor(**{group: config(**kwargs)})


def test_shuffled_probe_loader_without_generator_is_refused():
    data = classification_data()
    with pytest.raises(ValueError, match="probe_dataloader"):
        SharpnessMonitor(probe_dataloader=DataLoader(data, batch_size=8, shuffle=True))
    ok = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    SharpnessMonitor(probe_dataloader=ok)


def test_a_module_that_returns_no_loss_gets_a_warning_not_an_error():
    class NoLoss(TinyClassifier):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx).backward()
            return None

    cb = SharpnessMonitor(cadence=SharpnessCadence(every_n_steps=1))
    t = trainer(max_steps=3, callbacks=[cb])
    with pytest.warns(UserWarning, match="SharpnessMonitor: no probe batch yet"):
        t.fit(NoLoss(), loader(classification_data()))
    assert t.global_step == 3 and "stability/sharpness/lambda_max" not in cb.readings

    # a fixed probe batch without a loss: each check is skipped, with one warning
    data = classification_data()
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=1),
        probe_batch=(data.tensors[0][:8], data.tensors[1][:8]),
    )
    t = trainer(max_steps=3, callbacks=[cb])
    with pytest.warns(UserWarning, match="probe batch has no loss") as caught:
        t.fit(NoLoss(), loader(data))
    assert t.global_step == 3 and "stability/sharpness/lambda_max" not in cb.readings
    assert len([w for w in caught if "SharpnessMonitor" in str(w.message)]) == 1


def test_user_loss_fn_and_supplied_batches_are_averaged():
    data = classification_data()
    batches = [(data.tensors[0][i : i + 8], data.tensors[1][i : i + 8]) for i in (0, 8)]
    probe = DataLoader(TensorDataset(data.tensors[0][:16], data.tensors[1][:16]), batch_size=8)

    def loss_fn(module, batch):
        x, y = batch
        return nn.functional.cross_entropy(module(x), y)

    model = TinyClassifier()
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=3),
        estimator=SharpnessEstimator(tol=1e-6, max_iter=60),
        num_probe_batches=2,
        probe_dataloader=probe,
        loss_fn=loss_fn,
    )
    trainer(max_steps=3, callbacks=[cb]).fit(model, loader(data))
    h, _ = exact_hessian(model, batches)
    assert value(cb, "lambda_max") == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-4)


# ------------------------------------------------------------------- TensorBoard
def test_tensorboard_gets_scalars_and_the_spectral_density(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = TinyClassifier()
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=2, density_every_n_checks=2),
        measures=SharpnessMeasures(directional=False),
    )
    logger = TensorBoardLogger(tmp_path)
    trainer(max_steps=4, callbacks=[cb], logger=logger, log_every_n_steps=1).fit(
        model, loader(classification_data())
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0}).Reload()
    logged = {e.step: e.value for e in events.Scalars(KEY + "lambda_max")}
    assert logged[3] == pytest.approx(value(cb, "lambda_max"))  # 0-based logger steps
    assert 0 not in logged  # nothing before the first check
    (hist,) = events.Histograms(KEY + "density")
    assert hist.step == 4
    # Bucket counts are eigenvalue counts: they sum to the number of parameters.
    dim = sum(p.numel() for p in model.parameters())
    assert hist.histogram_value.num == pytest.approx(dim, rel=0.02)
    assert hist.histogram_value.max >= value(cb, "lambda_max") * 0.95
    (image,) = events.Images(KEY + "density_plot")
    assert image.step == 4 and image.width > 100 and image.height > 100


def test_pyhessian_backend_agrees_with_the_exact_hessian():
    model = TinyClassifier()
    cb = SharpnessMonitor(
        cadence=SharpnessCadence(every_n_steps=3),
        estimator=SharpnessEstimator(backend="pyhessian", tol=1e-6, max_iter=200),
        measures=SharpnessMeasures(directional=False),
    )
    trainer(max_steps=3, callbacks=[cb]).fit(model, loader(classification_data()))
    h, _ = exact_hessian(model, cb._batches)
    eig = torch.linalg.eigvalsh(h)
    top = float(eig.abs().max())  # power iteration: largest magnitude
    assert abs(value(cb, "lambda_max")) == pytest.approx(top, rel=1e-3)
    assert value(cb, "hvps") > 1


def test_probe_dataloader_leaves_the_global_rng_alone():
    data = classification_data()
    probe = DataLoader(data, batch_size=8, shuffle=False)  # iterating it draws a base seed

    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        model = TinyClassifier(dropout=0.3)
        trainer(max_steps=6, callbacks=callbacks).fit(model, loader(data, shuffle=True))
        return flat_weights(model)

    cb = SharpnessMonitor(cadence=SharpnessCadence(every_n_steps=3), probe_dataloader=probe)
    assert torch.equal(run([cb]), run([]))
    assert KEY + "lambda_max" in cb.readings


def test_configurable_from_yaml():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(SharpnessMonitor, "monitor")
    cfg = parser.parse_string(
        "monitor:\n"
        "  cadence:\n    every_n_steps: 7\n    directional_every_n_steps: 2\n"
        "    ratio_threshold: 0.5\n"
        "  estimator:\n    k: 3\n    backend: pyhessian\n    dtype: float64\n"
    )
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes
    cb = build(cfg).monitor
    assert isinstance(cb, SharpnessMonitor)
    assert (cb.every_n_steps, cb.k, cb.backend, cb.dtype) == (7, 3, "pyhessian", torch.float64)
    assert (cb.directional_every_n_steps, cb.ratio_threshold) == (2, 0.5)


def test_non_finite_curvature_is_a_reading_not_a_crash():
    class Poisoned(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    next(pl_module.parameters())[0, 0] = float("nan")

    model = TinyClassifier()
    cb = SharpnessMonitor(cadence=SharpnessCadence(every_n_steps=4, directional_every_n_steps=4))
    trainer(max_steps=4, callbacks=[Poisoned(), cb]).fit(model, loader(classification_data()))
    assert value(cb, "nonfinite") == 1.0
    assert cb.readings[KEY + "nonfinite"].step == 4
