"""RepresentationDriftMonitor: CKA readings against direct computation, no side effects,
DDP union semantics, resume."""

from __future__ import annotations

import copy
import csv
import warnings

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
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_stability import DriftCadence, DriftLimits, DriftProbe
from lightning_stability.estimators.cka import linear_cka
from lightning_stability.probes.drift import (
    RepresentationDriftMonitor,
    default_input_fn,
    default_layers,
)

LAYERS = ["net.0", "net.1", "net.2"]


def _fit(model, monitor=None, epochs=2, extra=(), **kw):
    callbacks = ([monitor] if monitor is not None else []) + list(extra)
    t = trainer(max_steps=-1, max_epochs=epochs, callbacks=callbacks, **kw)
    t.fit(model, loader(classification_data(n=128), shuffle=kw.pop("shuffle", False)))
    return t


def _values(monitor, prefix):
    return {k: r.value for k, r in monitor.readings.items() if k.startswith(prefix)}


def test_no_training_between_checks_gives_one():
    model = TinyClassifier(lr=0.0)
    monitor = RepresentationDriftMonitor(
        cadence=DriftCadence(min_steps=0), probe=DriftProbe(probe_size=64)
    )
    _fit(model, monitor)
    assert monitor.layer_names == LAYERS
    for name in LAYERS:
        assert monitor.readings[f"stability/cka/{name}"].value == pytest.approx(1.0, abs=1e-6)
        assert monitor.readings[f"stability/cka_initial/{name}"].value == pytest.approx(
            1.0, abs=1e-6
        )
    assert monitor.readings["stability/cka/min"].value == pytest.approx(1.0, abs=1e-6)
    assert monitor.num_checks == 3  # start of training + two epoch ends
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


class _Perturb(Callback):
    """Replaces one layer's weights by large random ones before the second epoch."""

    def __init__(self, layer: str) -> None:
        self.layer = layer

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            module = dict(pl_module.named_modules())[self.layer]
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                module.weight.copy_(5.0 * torch.randn(module.weight.shape, generator=g))


def test_large_perturbation_drops_cka_of_that_layer_only():
    # The 3-unit output layer: a wide random linear map would nearly preserve the geometry
    # of its input (and so its CKA); a narrow one cannot.
    model = TinyClassifier(lr=0.0, hidden=32)
    monitor = RepresentationDriftMonitor(probe=DriftProbe(probe_size=96))
    _fit(model, monitor, extra=[_Perturb("net.2")])
    cka = _values(monitor, "stability/cka/")
    assert cka["stability/cka/net.2"] < 0.7
    assert monitor.readings["stability/cka_initial/net.2"].value < 0.7
    for upstream in ("net.0", "net.1"):
        assert cka[f"stability/cka/{upstream}"] == pytest.approx(1.0, abs=1e-6)
    assert cka["stability/cka/min"] == cka["stability/cka/net.2"]


def test_frozen_first_layer_keeps_cka_one_while_the_rest_drifts():
    model = TinyClassifier(lr=0.5)
    for p in model.net[0].parameters():
        p.requires_grad_(False)
    before = flat_weights(model.net[2])
    monitor = RepresentationDriftMonitor(probe=DriftProbe(probe_size=64))
    _fit(model, monitor, epochs=3)
    assert not torch.equal(flat_weights(model.net[2]), before)  # the rest did train
    # net.0 and its tanh depend only on the fixed probe inputs and frozen weights.
    for name in ("net.0", "net.1"):
        assert monitor.readings[f"stability/cka/{name}"].value == pytest.approx(1.0, abs=1e-6)
        assert monitor.readings[f"stability/cka_initial/{name}"].value == pytest.approx(
            1.0, abs=1e-6
        )
    assert monitor.readings["stability/cka_initial/net.2"].value < 1.0 - 1e-3


def test_training_is_bit_identical_with_and_without_the_monitor():
    def run(with_monitor):
        torch.manual_seed(0)
        model = TinyClassifier(norm=True, dropout=0.3, lr=0.1)
        callbacks = []
        if with_monitor:
            callbacks = [
                RepresentationDriftMonitor(
                    cadence=DriftCadence(every_n_steps=2),
                    probe=DriftProbe(probe_size=48, source="train"),
                )
            ]
        t = trainer(max_steps=-1, max_epochs=2, callbacks=callbacks)
        t.fit(model, loader(classification_data(n=128), shuffle=True))
        return model, callbacks

    bare, _ = run(False)
    probed, callbacks = run(True)
    assert callbacks[0].num_checks == 1 + 4  # start + steps 2, 4, 6, 8
    assert torch.equal(flat_weights(bare), flat_weights(probed))
    for b1, b2 in zip(bare.buffers(), probed.buffers()):
        assert torch.equal(b1, b2)
    assert probed.training


def _relu_model() -> TinyClassifier:
    model = TinyClassifier(lr=0.0, hidden=20)
    model.net[1] = nn.ReLU()
    with torch.no_grad():
        model.net[0].bias[:5] = -100.0  # five units that never fire
    return model


def test_activation_health_matches_direct_computation():
    model = _relu_model()
    probe = classification_data(n=64, seed=3).tensors[0]
    monitor = RepresentationDriftMonitor(probe_inputs=probe)
    _fit(model, monitor, epochs=1)
    with torch.no_grad():
        hidden = model.net[1](model.net[0](probe)).double()
        logits = model(probe).double()
    want_dead = float((hidden.amax(0) <= 0).double().mean())
    assert want_dead >= 5 / 20
    values = _values(monitor, "stability/act/")
    assert values["stability/act/net.1/dead_fraction"] == pytest.approx(want_dead)
    assert values["stability/act/net.1/rms"] == pytest.approx(float(hidden.square().mean().sqrt()))
    assert values["stability/act/net.2/rms"] == pytest.approx(float(logits.square().mean().sqrt()))
    assert "stability/act/net.0/dead_fraction" not in values  # not ReLU-like


def test_layer_selection_and_errors():
    model = TinyClassifier(dropout=0.2, norm=True)
    assert default_layers(model, 8) == ["net.0", "net.1", "net.2", "net.4"]  # dropout skipped
    assert default_layers(model, 2) == ["net.0", "net.4"]
    monitor = RepresentationDriftMonitor(layers=["net.[02]"], layer_types=["Tanh"])
    assert monitor._resolve_layers(model) == ["net.0", "net.2"]
    with pytest.raises(ValueError, match=r"no module named 'net\.9'.*available: net, net\.0"):
        RepresentationDriftMonitor(layers=["net.9"])._resolve_layers(model)
    with pytest.raises(ValueError, match=r"layer_types.*Conv2d"):
        RepresentationDriftMonitor(layer_types=["Conv2d"])._resolve_layers(model)

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.head = nn.Linear(8, 2)

    assert default_layers(Blocks(), 8) == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert default_layers(nn.Sequential(nn.Linear(3, 3)), 8) == ["0"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (lambda: {"probe": DriftProbe(probe_size=2)}, "probe_size"),
        (lambda: {"cadence": DriftCadence(every_n_steps=0)}, "every_n_steps"),
        (lambda: {"cadence": DriftCadence(every_n_epochs=-1)}, "every_n_epochs"),
        (lambda: {"probe": DriftProbe(source="test")}, "source"),
        (lambda: {"limits": DriftLimits(max_features=0)}, "max_features"),
        (lambda: {"cadence": DriftCadence(every_n_steps=True)}, "every_n_steps"),
        (lambda: {"input_fn": 3}, "input_fn"),
        (lambda: {"max_layers": 0}, "max_layers"),
        (lambda: {"probe_inputs": torch.zeros(3, 2)}, "probe_inputs"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RepresentationDriftMonitor(**kwargs())


def test_default_input_fn():
    x = torch.zeros(3, 2)
    assert default_input_fn(x) is x
    assert default_input_fn((x, 1)) is x
    assert default_input_fn({"input": x, "y": 1}) is x
    with pytest.raises(ValueError, match="input_fn"):
        default_input_fn({"pixels": x})


class _NoisyDataset(torch.utils.data.Dataset):
    """Draws from the global RNG on every read, like a random augmentation."""

    def __init__(self, n: int = 100) -> None:
        self.x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.rand(3), i


def test_probe_set_is_drawn_without_touching_the_global_rng():
    from types import SimpleNamespace

    fake = SimpleNamespace(
        world_size=1,
        global_rank=0,
        val_dataloaders=None,
        train_dataloader=loader(_NoisyDataset(), shuffle=True),
    )
    state = torch.get_rng_state()
    m1 = RepresentationDriftMonitor(probe=DriftProbe(probe_size=40, seed=7))
    m1._prepare_probe(fake)
    assert torch.equal(torch.get_rng_state(), state)
    m2 = RepresentationDriftMonitor(probe=DriftProbe(probe_size=40, seed=7))
    m2._prepare_probe(fake)
    assert m1.probe_indices == m2.probe_indices and len(set(m1.probe_indices)) == 40
    assert m1.probe_indices != sorted(m1.probe_indices)  # a random draw, not the first 40
    # The probe batch holds the dataset's items at those indices.
    x, idx = m1._inputs
    assert torch.equal(x[:, 0].round(), torch.tensor(m1.probe_indices).float())
    assert idx.tolist() == m1.probe_indices


def _resume_run(tmp_path, epochs, ckpt_path=None, save=False):
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.2)
    monitor = RepresentationDriftMonitor(
        cadence=DriftCadence(min_steps=0), probe=DriftProbe(probe_size=64)
    )
    extra = [ModelCheckpoint(dirpath=tmp_path, save_last=True)] if save else []
    t = trainer(
        max_steps=-1, max_epochs=epochs, callbacks=[monitor, *extra], enable_checkpointing=save
    )
    t.fit(model, loader(classification_data(n=128), shuffle=False), ckpt_path=ckpt_path)
    return monitor


def test_resume_keeps_references_and_counters(tmp_path):
    _resume_run(tmp_path, epochs=2, save=True)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "RepresentationDriftMonitor" in k]
    assert state["num_checks"] == 3 and len(state["history"]) == 2
    resumed = _resume_run(tmp_path, epochs=4, ckpt_path=str(tmp_path / "last.ckpt"))
    straight = _resume_run(tmp_path / "fresh", epochs=4)
    assert resumed.num_checks == straight.num_checks == 5
    assert resumed.last_check_step == straight.last_check_step
    assert resumed.probe_indices == straight.probe_indices
    for key, reading in straight.readings.items():
        assert resumed.readings[key].value == pytest.approx(reading.value, abs=1e-9), key
    assert straight.readings["stability/cka_initial/net.2"].value < 0.999  # it did drift
    assert len(resumed.history) == len(straight.history) == 4


def test_heatmap_goes_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor = RepresentationDriftMonitor(
        cadence=DriftCadence(min_steps=0), probe=DriftProbe(probe_size=32)
    )
    _fit(TinyClassifier(), monitor, epochs=2, logger=logger)
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["stability/cka_heatmap"]
    assert len(acc.Images("stability/cka_heatmap")) == 2
    assert "stability/cka/net.0" in acc.Tags()["scalars"]


class _RecordWeights(Callback):
    def __init__(self) -> None:
        self.snapshots: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.snapshots.append(copy.deepcopy(pl_module.state_dict()))

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshots.append(copy.deepcopy(pl_module.state_dict()))


def _ddp_extract(trainer, pl_module):
    monitor = next(c for c in trainer.callbacks if isinstance(c, RepresentationDriftMonitor))
    recorder = next(c for c in trainer.callbacks if isinstance(c, _RecordWeights))
    return {
        "readings": {k: r.value for k, r in monitor.readings.items()},
        "indices": monitor.probe_indices,
        "local_n": int(monitor._probe_n),
        "snapshots": recorder.snapshots,
    }


@pytest.mark.ddp
def test_ddp_equals_single_process_on_the_union(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.3)
    monitor = RepresentationDriftMonitor(
        cadence=DriftCadence(min_steps=0), probe=DriftProbe(probe_size=64, source="train")
    )
    t = ddp_trainer(
        max_steps=-1,
        max_epochs=2,
        callbacks=[monitor, _RecordWeights(), DumpOnFitEnd(tmp_path, _ddp_extract)],
        logger=CSVLogger(tmp_path / "csv", name="", version=0),
    )
    data = classification_data(n=128)
    t.fit(model, loader(data, shuffle=False))
    r0, r1 = load_ranks(tmp_path)
    assert r0["readings"] == r1["readings"]  # every rank sees the same values
    assert r0["indices"] == r1["indices"] and r0["local_n"] == r1["local_n"] == 32

    # Single process, whole probe set, the weights each check saw.
    x = data.tensors[0][r0["indices"]]
    reference = TinyClassifier()
    acts = []
    for snapshot in r0["snapshots"]:
        reference.load_state_dict(snapshot)
        reference.eval()
        captured = {}
        with torch.no_grad():
            h = x
            for i, layer in enumerate(reference.net):
                h = layer(h)
                captured[f"net.{i}"] = h
        acts.append(captured)
    first, previous, last = acts
    for name in LAYERS:
        want = linear_cka(previous[name], last[name], debiased=True).item()
        want_initial = linear_cka(first[name], last[name], debiased=True).item()
        assert r0["readings"][f"stability/cka/{name}"] == pytest.approx(want, abs=1e-6)
        assert r0["readings"][f"stability/cka_initial/{name}"] == pytest.approx(
            want_initial, abs=1e-6
        )
    assert r0["readings"]["stability/cka_initial/net.2"] < 0.999

    # Logged once (rank 0): one row per epoch-end check, not one per rank.
    (metrics,) = list((tmp_path / "csv").rglob("metrics.csv"))
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["stability/cka/net.0"]) for r in rows if r.get("stability/cka/net.0")]
    assert len(logged) == 2
    assert logged[-1] == pytest.approx(r0["readings"]["stability/cka/net.0"])


def test_bf16_weights_are_measured_in_float32():
    model = TinyClassifier(lr=0.0)
    probe = classification_data(n=32, seed=4).tensors[0]
    monitor = RepresentationDriftMonitor(probe_inputs=probe)
    _fit(model, monitor, epochs=1, precision="bf16-true")
    assert next(model.parameters()).dtype == torch.bfloat16  # the run itself stayed bf16
    upcast = copy.deepcopy(model).float()
    with torch.no_grad():
        want32 = float(upcast(probe).double().square().mean().sqrt())
        want16 = float(model(probe.bfloat16()).double().square().mean().sqrt())
    got = monitor.readings["stability/act/net.2/rms"].value
    assert got == pytest.approx(want32, rel=1e-6)
    assert abs(want16 - want32) > 1e-6 * want32  # bf16 would have been distinguishable
    assert monitor.readings["stability/cka/net.2"].value == pytest.approx(1.0, abs=1e-6)


def test_probe_set_comes_from_the_validation_set_when_asked():
    val = classification_data(n=40, seed=5)
    monitor = RepresentationDriftMonitor(
        cadence=DriftCadence(every_n_epochs=0, every_n_steps=2),
        probe=DriftProbe(probe_size=100, source="val"),
    )
    t = trainer(max_steps=4, callbacks=[monitor], limit_val_batches=1)
    t.fit(
        TinyClassifier(lr=0.0),
        loader(classification_data(n=128), shuffle=False),
        loader(val, shuffle=False),
    )
    assert sorted(monitor.probe_indices) == list(range(40))  # capped at the set's size
    assert torch.equal(monitor._inputs[0], val.tensors[0][monitor.probe_indices])
    assert monitor.num_checks == 1 + 2  # start, steps 2 and 4; no epoch-end check

    # "auto" draws from the training set when the probe runs through training_step (which
    # is written for training batches), from the validation set for the forward path.
    for kwargs, want in (({}, 128), ({"input_fn": lambda batch: batch[0]}, 40)):
        monitor = RepresentationDriftMonitor(
            cadence=DriftCadence(every_n_epochs=0), probe=DriftProbe(probe_size=200), **kwargs
        )
        t = trainer(max_steps=1, callbacks=[monitor], limit_val_batches=1)
        t.fit(
            TinyClassifier(lr=0.0),
            loader(classification_data(n=128), shuffle=False),
            loader(val, shuffle=False),
        )
        assert len(monitor.probe_indices) == want


# ----------------------------------------------------------------------------------------
# The default path: the module's own training_step on the probe batch, hooks on the layers


class DictSamples(torch.utils.data.Dataset):
    """Samples as dicts whose keys no default knows."""

    def __init__(self, n: int = 128, seed: int = 0) -> None:
        self.data = classification_data(n, seed=seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"features": x, "label": y}


class NoForward(pl.LightningModule):
    """No ``forward``: the step calls ``self.net`` on a dict batch, draws input noise and
    has BatchNorm and dropout; a loss module as a child."""

    def __init__(self, lr: float = 0.1, noise: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3)
        )
        self.head_unused = nn.Linear(3, 3)  # only in validation
        self.criterion = nn.CrossEntropyLoss()
        self.lr = lr
        self.noise = noise

    def training_step(self, batch, batch_idx):
        x = batch["features"]
        x = x + self.noise * torch.randn_like(x)
        loss = self.criterion(self.net(x), batch["label"])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class _EpochReadings(Callback):
    """Registered after the monitors: what was published by the end of every epoch."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        drift = next(c for c in trainer.callbacks if isinstance(c, RepresentationDriftMonitor))
        self.rows.append({"step": trainer.global_step, **{k: r for k, r in drift.readings.items()}})


def _default_set_fit(drift, epochs=2, n=1000, batch_size=2, seed=0, **kw):
    from lightning_stability.defaults import stability_callbacks

    torch.manual_seed(seed)
    model = NoForward(**kw)
    recorder = _EpochReadings()
    callbacks = [*stability_callbacks(drift=drift, dashboard=False)]
    if drift is not False:
        callbacks.append(recorder)
    t = trainer(max_steps=-1, max_epochs=epochs, callbacks=callbacks)
    t.fit(model, loader(DictSamples(n), batch_size=batch_size, shuffle=True))
    return model, t, recorder


def test_default_set_measures_a_module_without_forward_on_dict_batches():
    # epochs of 500 steps: at the default cadence, a check at every epoch end
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, t, recorder = _default_set_fit(drift=True, lr=0.02)
    drift = next(c for c in t.callbacks if isinstance(c, RepresentationDriftMonitor))
    said = [str(w.message) for w in caught if "RepresentationDriftMonitor" in str(w.message)]
    # the layer only validation uses is dropped, named, once; the loss module never chosen
    assert len(said) == 1 and "'head_unused'" in said[0], said
    assert drift.layer_names == ["net.0", "net.1", "net.2", "net.4"]
    assert drift.by_epoch and drift.num_checks == 1 + 2
    assert [row["step"] for row in recorder.rows] == [500, 1000]
    for row in recorder.rows:  # a CKA reading taken at the end of every epoch
        for name in ("min", *drift.layer_names):
            reading = row[f"stability/cka/{name}"]
            # debiased CKA can dip below 0 for unrelated representations
            assert reading.step == row["step"] and -0.5 < reading.value <= 1.0 + 1e-9
    assert recorder.rows[-1]["stability/cka_initial/net.4"].value < 0.999  # it drifted
    assert 0.0 <= recorder.rows[-1]["stability/act/net.2/dead_fraction"].value <= 1.0
    assert not any(m._forward_hooks for m in model.modules())
    assert model.training


def test_default_set_on_short_epochs_checks_at_the_start_and_the_end():
    _, t, recorder = _default_set_fit(drift=True, epochs=3, n=128, batch_size=32)
    drift = next(c for c in t.callbacks if isinstance(c, RepresentationDriftMonitor))
    assert drift.num_checks == 2 and [row["step"] for row in drift.history] == [12]
    assert recorder.rows[-1]["stability/cka/min"].step == 12


def test_default_set_is_bit_identical_with_and_without_drift():
    short = {"n": 128, "batch_size": 32, "epochs": 3}
    bare, t_bare, _ = _default_set_fit(drift=False, **short)
    probed, t_probed, _ = _default_set_fit(drift={"min_steps": 0}, **short)
    drift = next(c for c in t_probed.callbacks if isinstance(c, RepresentationDriftMonitor))
    assert drift.num_checks == 1 + 3
    assert torch.equal(flat_weights(bare), flat_weights(probed))
    for b1, b2 in zip(bare.buffers(), probed.buffers()):
        assert torch.equal(b1, b2)
    # the probe's training_step logs nothing that is seen
    assert torch.equal(
        t_bare.callback_metrics["train_loss"], t_probed.callback_metrics["train_loss"]
    )


def test_noise_drawn_in_the_step_is_the_same_at_every_check():
    # lr 0: nothing moves, so CKA is 1 exactly when the step's noise repeats at every check
    monitor = RepresentationDriftMonitor(
        cadence=DriftCadence(min_steps=0), probe=DriftProbe(probe_size=64)
    )
    torch.manual_seed(0)
    t = trainer(max_steps=-1, max_epochs=2, callbacks=[monitor])
    t.fit(NoForward(lr=0.0, noise=1.0), loader(DictSamples(), shuffle=True))
    assert monitor.num_checks == 3
    # the first layer sees only the noisy input (BatchNorm's running statistics, which the
    # later layers use in eval mode, do move at lr 0)
    assert monitor.readings["stability/cka/net.0"].value == pytest.approx(1.0, abs=1e-9)
    assert monitor.readings["stability/cka_initial/net.0"].value == pytest.approx(1.0, abs=1e-9)


def test_cadence_epoch_ends_or_steps_never_both():
    def run(every_n_steps, epochs=3, min_steps=0):
        monitor = RepresentationDriftMonitor(
            cadence=DriftCadence(every_n_steps=every_n_steps, min_steps=min_steps),
            probe=DriftProbe(probe_size=32),
        )
        steps = []

        class Steps(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                steps.append(monitor.last_check_step)

        _fit(TinyClassifier(), monitor, epochs=epochs, extra=[Steps()])  # 4 steps an epoch
        return monitor, steps

    monitor, _ = run(every_n_steps=8)  # epochs shorter: epoch ends
    assert monitor.by_epoch and monitor.num_checks == 1 + 3
    assert [row["step"] for row in monitor.history] == [4, 8, 12]
    monitor, _ = run(every_n_steps=3)  # epochs longer: every 3 steps, evenly spaced
    assert not monitor.by_epoch
    assert [row["step"] for row in monitor.history] == [3, 6, 9, 12]
    monitor, _ = run(every_n_steps=None)
    assert monitor.by_epoch and [row["step"] for row in monitor.history] == [4, 8, 12]
    # short epochs: epoch ends at least min_steps apart, and the last epoch's end
    monitor, _ = run(every_n_steps=1000, epochs=7, min_steps=10)
    assert monitor.by_epoch and [row["step"] for row in monitor.history] == [12, 24, 28]


def test_wide_layers_are_hashed_to_max_features():
    monitor = RepresentationDriftMonitor(
        probe=DriftProbe(seed=3), limits=DriftLimits(max_features=256)
    )
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 20, generator=g, dtype=torch.float64)
    mix = torch.randn(20, 4096, generator=g, dtype=torch.float64)
    x = z @ mix + 0.3 * torch.randn(64, 4096, generator=g, dtype=torch.float64)
    moved = z + 0.7 * torch.randn(64, 20, generator=g, dtype=torch.float64)
    y = moved @ mix + 0.3 * torch.randn(64, 4096, generator=g, dtype=torch.float64)
    hx, hy = monitor._narrow("enc", x), monitor._narrow("enc", y)
    assert hx.shape == (64, 256)
    assert torch.equal(
        hx,
        RepresentationDriftMonitor(
            probe=DriftProbe(seed=3), limits=DriftLimits(max_features=256)
        )._narrow("enc", x),
    )
    assert not torch.equal(hx, monitor._narrow("dec", x))  # a projection per layer
    assert monitor._narrow("narrow", x[:, :256]) is not None
    assert torch.equal(monitor._narrow("narrow", x[:, :256]), x[:, :256])  # at the cap: as is
    # a structured representation keeps its CKA through the hashing
    full = linear_cka(x, y, debiased=True).item()
    hashed = linear_cka(hx, hy, debiased=True).item()
    assert 0.5 < full < 0.8 and hashed == pytest.approx(full, abs=0.05)
    # inner products are kept in expectation: the average over hashings is close
    grams = torch.stack(
        [
            RepresentationDriftMonitor(
                probe=DriftProbe(seed=s), limits=DriftLimits(max_features=256)
            )
            ._narrow("enc", x[:8])
            .T.T
            @ RepresentationDriftMonitor(
                probe=DriftProbe(seed=s), limits=DriftLimits(max_features=256)
            )
            ._narrow("enc", y[:8])
            .T
            for s in range(64)
        ]
    ).mean(0)
    exact = x[:8] @ y[:8].T
    assert torch.allclose(grams, exact, atol=0.05 * float(exact.abs().max()))

    # in a run: the wide layer is measured through its hashed features, health on the raw
    class Wide(TinyClassifier):
        def __init__(self):
            super().__init__(hidden=2048, lr=0.0)
            self.net[1] = nn.ReLU()

    monitor = RepresentationDriftMonitor(
        probe=DriftProbe(probe_size=48), limits=DriftLimits(max_features=128)
    )
    model = Wide()
    _fit(model, monitor, epochs=1)
    assert monitor._previous["net.0"].num_samples == 48
    assert {d for (_, d, _) in monitor._hashing} == {2048}
    x = classification_data(n=128).tensors[0][monitor.probe_indices]
    with torch.no_grad():
        hidden = model.net[1](model.net[0](x)).double()
    assert monitor.readings["stability/act/net.1/rms"].value == pytest.approx(
        float(hidden.square().mean().sqrt())
    )
    assert monitor.readings["stability/act/net.1/dead_fraction"].value == pytest.approx(
        float((hidden.amax(0) <= 0).double().mean())
    )


class _SkipsFirst(TinyClassifier):
    def training_step(self, batch, batch_idx):
        if batch_idx % 3 == 0:
            return None
        return super().training_step(batch, batch_idx)


def test_a_step_that_skips_batch_idx_zero_is_run_with_the_next_index():
    monitor = RepresentationDriftMonitor(probe=DriftProbe(probe_size=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(_SkipsFirst(), monitor, epochs=2)
    assert not [w for w in caught if "RepresentationDriftMonitor" in str(w.message)]
    assert monitor._batch_idx == 1 and "stability/cka/min" in monitor.readings


class _Manual(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_needs_input_fn():
    monitor = RepresentationDriftMonitor(probe=DriftProbe(probe_size=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = _fit(_Manual(), monitor, epochs=2)
    assert t.current_epoch == 2
    (said,) = [str(w.message) for w in caught if "RepresentationDriftMonitor" in str(w.message)]
    assert "manual optimization" in said and "input_fn=" in said
    assert not monitor.readings

    monitor = RepresentationDriftMonitor(
        probe=DriftProbe(probe_size=32), input_fn=lambda batch: batch[0]
    )
    _fit(_Manual(), monitor, epochs=2)
    assert "stability/cka/min" in monitor.readings
