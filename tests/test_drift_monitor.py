"""RepresentationDriftMonitor: CKA readings against direct computation, no side effects,
DDP union semantics, resume."""

from __future__ import annotations

import copy
import csv

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
    monitor = RepresentationDriftMonitor(probe_size=64)
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
    monitor = RepresentationDriftMonitor(probe_size=96)
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
    monitor = RepresentationDriftMonitor(probe_size=64)
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
            callbacks = [RepresentationDriftMonitor(probe_size=48, every_n_steps=2, source="train")]
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
        ({"probe_size": 2}, "probe_size"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_epochs": -1}, "every_n_epochs"),
        ({"source": "test"}, "source"),
        ({"max_layers": 0}, "max_layers"),
        ({"probe_inputs": torch.zeros(3, 2)}, "probe_inputs"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RepresentationDriftMonitor(**kwargs)


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
    m1 = RepresentationDriftMonitor(probe_size=40, seed=7)
    m1._prepare_probe(fake)
    assert torch.equal(torch.get_rng_state(), state)
    m2 = RepresentationDriftMonitor(probe_size=40, seed=7)
    m2._prepare_probe(fake)
    assert m1.probe_indices == m2.probe_indices and len(set(m1.probe_indices)) == 40
    assert m1.probe_indices != sorted(m1.probe_indices)  # a random draw, not the first 40
    # The inputs are the dataset's items at those indices (first element of the batch).
    assert torch.equal(m1._inputs[:, 0].round(), torch.tensor(m1.probe_indices).float())


def _resume_run(tmp_path, epochs, ckpt_path=None, save=False):
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.2)
    monitor = RepresentationDriftMonitor(probe_size=64)
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
    monitor = RepresentationDriftMonitor(probe_size=32)
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
        "local_n": int(monitor._inputs.shape[0]),
        "snapshots": recorder.snapshots,
    }


@pytest.mark.ddp
def test_ddp_equals_single_process_on_the_union(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.3)
    monitor = RepresentationDriftMonitor(probe_size=64, source="train")
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


def test_probe_set_comes_from_the_validation_set_when_there_is_one():
    val = classification_data(n=40, seed=5)
    monitor = RepresentationDriftMonitor(probe_size=100, every_n_epochs=0, every_n_steps=2)
    t = trainer(max_steps=4, callbacks=[monitor], limit_val_batches=1)
    t.fit(
        TinyClassifier(lr=0.0),
        loader(classification_data(n=128), shuffle=False),
        loader(val, shuffle=False),
    )
    assert sorted(monitor.probe_indices) == list(range(40))  # capped at the set's size
    assert torch.equal(monitor._inputs, val.tensors[0][monitor.probe_indices])
    assert monitor.num_checks == 1 + 2  # start, steps 2 and 4; no epoch-end check
