"""Set-ups a probe cannot fully measure (manual optimization, a training_step that skips
batches) run to the end with the default set: each probe warns once and steps aside from
what it cannot read, and the rest of the set goes on."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, classification_data, loader, trainer
from torch import nn

from lightning_stability import AuditConfig, DriftCadence, DriftProbe, stability_callbacks
from lightning_stability.probes import (
    GradientMonitor,
    LossMonitor,
    PerturbationAudit,
    RepresentationDriftMonitor,
    SharpnessMonitor,
)
from lightning_stability.probes.drift import default_input_fn


class TinyGAN(pl.LightningModule):
    """A generator and a discriminator, two optimizers, manual optimization; the training
    step returns the generator's loss."""

    def __init__(self, d: int = 10, z: int = 4, lr: float = 0.01) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(z, 16), nn.Tanh(), nn.Linear(16, d))
        self.discriminator = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))
        self.z = z
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        noise = torch.randn(real.shape[0], self.z)

        fake = self.generator(noise)
        ones = torch.ones(real.shape[0], 1)
        d_loss = bce(self.discriminator(real), ones) + bce(
            self.discriminator(fake.detach()), torch.zeros_like(ones)
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

        g_loss = bce(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log("g_loss", g_loss)
        return g_loss

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=self.lr),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr),
        )


def generator_loss(module: TinyGAN, batch: Any) -> torch.Tensor:
    """A probe loss for the GAN: the generator's loss on a fixed noise draw."""
    real, _ = batch
    noise = torch.randn(real.shape[0], module.z, generator=torch.Generator().manual_seed(0))
    logits = module.discriminator(module.generator(noise.to(real)))
    return nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


class SkipsEveryThird(TinyClassifier):
    """Returns None (Lightning skips the batch) for every third batch, the first included."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch_idx % 3 == 0:
            return None
        return super().training_step(batch, batch_idx)


def _small_cadences(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        sharpness={"every_n_steps": 4, "directional_every_n_steps": 2, "max_iter": 40},
        gradients={"window": 8},
        loss={"window": 8},
    )
    kwargs.update(overrides)
    return kwargs


def _fit(model, callbacks, max_steps, **kwargs):
    t = trainer(max_steps=max_steps, callbacks=callbacks, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, loader(classification_data(512), shuffle=False))
    return t, [str(w.message) for w in caught]


def _probe(callbacks, cls):
    (found,) = [cb for cb in callbacks if isinstance(cb, cls)]
    return found


def _stability_warnings(messages: list[str]) -> list[str]:
    names = (
        "SharpnessMonitor",
        "GradientMonitor",
        "LossMonitor",
        "RepresentationDriftMonitor",
        "PerturbationAudit",
        "EarlyWarning",
        "Rollback",
        "StagedTraining",
        "LRBackoff",
        "LRGuard",
    )
    return [m for m in messages if m.startswith(names)]


def _published(callbacks) -> set[str]:
    return {key for cb in callbacks for key in getattr(cb, "readings", {})}


def _curvature(readings) -> set[str]:
    # lr_change follows the learning rate, not a measurement
    return {k for k in readings if k.startswith("stability/sharpness/")} - {
        "stability/sharpness/lr_change"
    }


@pytest.mark.parametrize("actions", ["none", "staged"])
def test_gan_with_manual_optimization_runs_to_max_steps(actions):
    callbacks = stability_callbacks(actions=actions, **_small_cadences())
    t, messages = _fit(TinyGAN(), callbacks, max_steps=24)
    assert t.global_step == 24
    said = _stability_warnings(messages)
    # staged training also says once that its clipping and accumulation do nothing here
    staged = [m for m in said if m.startswith("StagedTraining")]
    assert len(staged) == (actions == "staged") and all("manual optimization" in m for m in staged)
    # drift re-runs training_step too, which manual optimization rules out
    (drift,) = [m for m in said if m.startswith("RepresentationDriftMonitor")]
    assert "manual optimization" in drift and "input_fn=" in drift
    (warning,) = [m for m in said if m not in staged and m != drift]
    assert warning.startswith("SharpnessMonitor") and "manual optimization" in warning
    assert "loss_fn=" in warning  # what to do
    assert not _curvature(_probe(callbacks, SharpnessMonitor).readings)
    assert _published(callbacks) >= {"stability/loss/value", "stability/grad/norm"}
    assert "stability/meta/level" in t.callback_metrics


def test_gan_with_a_loss_fn_measures_curvature():
    sharpness = {
        "every_n_steps": 4,
        "directional_every_n_steps": 2,
        "max_iter": 5,
        "loss_fn": generator_loss,
    }
    callbacks = stability_callbacks(**_small_cadences(sharpness=sharpness), drift=False)
    t, messages = _fit(TinyGAN(), callbacks, max_steps=12)
    assert t.global_step == 12
    assert not _stability_warnings(messages)
    readings = _curvature(_probe(callbacks, SharpnessMonitor).readings)
    assert {"stability/sharpness/lambda_max", "stability/sharpness/directional"} <= readings


@pytest.mark.parametrize("actions", ["none", "staged"])
def test_training_step_returning_none_for_every_third_batch(actions):
    callbacks = stability_callbacks(actions=actions, **_small_cadences())
    t, messages = _fit(SkipsEveryThird(), callbacks, max_steps=16)
    assert t.global_step == 16
    assert not _stability_warnings(messages)  # every reading can be taken: nothing to say
    sharp = _probe(callbacks, SharpnessMonitor)
    # batch 0 was skipped, so the probe batch is batch 1, re-run with its own batch_idx
    assert sharp._batch_idx == [1]
    assert {"stability/sharpness/lambda_max", "stability/sharpness/eos_ratio"} <= _curvature(
        sharp.readings
    )
    assert _published(callbacks) >= {"stability/loss/value", "stability/grad/norm"}
    assert "stability/meta/level" in t.callback_metrics


class SilentGAN(TinyGAN):
    """A GAN whose training step returns nothing, as manual optimization allows."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        super().training_step(batch, batch_idx)


def test_manual_optimization_without_a_returned_loss_warns_once_about_loss_readings():
    monitor = LossMonitor(window=4)
    gradients = GradientMonitor(window=4)
    t, messages = _fit(SilentGAN(), [monitor, gradients], max_steps=12)
    assert t.global_step == 12
    (warning,) = _stability_warnings(messages)
    assert warning.startswith("LossMonitor") and "Return the loss" in warning
    assert not monitor.readings
    # gradients are still read, those of the first optimizer (the generator) only
    assert "stability/grad/norm" in gradients.readings
    generator = {id(p) for p in t.lightning_module.generator.parameters()}
    assert {id(p) for p in gradients._params} == generator


def test_gradient_monitor_reports_no_clipping_under_manual_optimization():
    gradients = GradientMonitor(window=4)
    t = trainer(max_steps=4, callbacks=[gradients])
    model = TinyGAN()
    t.fit(model, loader(classification_data(128), shuffle=False))
    # what an action may set mid-run: Lightning does not clip under manual optimization
    t.gradient_clip_val = 1e-6
    assert gradients._clip_algorithm(t) is None
    assert not any("clip" in k for k in gradients.readings)


class DictBatches(torch.utils.data.Dataset):
    """Samples as dicts whose keys the drift monitor's default input_fn does not know."""

    def __init__(self, n: int = 128) -> None:
        self.data = classification_data(n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"features": x, "target": y}


class DictClassifier(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step((batch["features"], batch["target"]), batch_idx)


def test_drift_monitor_measures_dict_batches_and_steps_aside_without_an_input():
    # through training_step (the default), a dict batch needs no argument
    drift = RepresentationDriftMonitor(
        cadence=DriftCadence(every_n_steps=2), probe=DriftProbe(probe_size=16)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=4, callbacks=[drift]).fit(
            DictClassifier(), loader(DictBatches(), shuffle=False)
        )
    assert not [w for w in caught if "RepresentationDriftMonitor" in str(w.message)]
    assert "stability/cka/min" in drift.readings

    # the forward path with an input_fn that cannot find the input: warns once, steps aside
    drift = RepresentationDriftMonitor(
        cadence=DriftCadence(every_n_steps=2),
        probe=DriftProbe(probe_size=16),
        input_fn=default_input_fn,
    )
    losses = LossMonitor(window=4)
    t = trainer(max_steps=8, callbacks=[drift, losses])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(DictClassifier(), loader(DictBatches(), shuffle=False))
    assert t.global_step == 8
    mine = [str(w.message) for w in caught if "RepresentationDriftMonitor" in str(w.message)]
    assert len(mine) == 1 and "input_fn=" in mine[0]
    assert not drift.readings and drift.is_set_aside("drift")
    assert "stability/loss/value" in losses.readings


def test_audit_caches_only_batches_with_a_loss_and_their_batch_idx():
    audit = PerturbationAudit(
        audit=AuditConfig(horizon=2, dimensions=("learning_signal",)), num_batches=2
    )
    t, messages = _fit(SkipsEveryThird(), [audit], max_steps=-1, max_epochs=1)
    assert t.current_epoch == 1
    assert not _stability_warnings(messages) and not audit.set_aside
    assert "stability/audit/learning_signal/param_distance" in audit.readings


class FrozenModule(TinyClassifier):
    """Every parameter frozen; training moves a tensor outside the module, so that the
    run trains while the module has nothing for the curvature probe to measure."""

    def __init__(self) -> None:
        super().__init__()
        for p in self.parameters():
            p.requires_grad_(False)
        self.offset = torch.zeros((), requires_grad=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + self.offset**2

    def configure_optimizers(self):
        return torch.optim.SGD([self.offset], lr=0.1)


def test_a_module_without_trainable_parameters_runs_and_the_curvature_probe_says_so_once():
    callbacks = stability_callbacks(
        drift=False, sharpness={"every_n_steps": 2, "directional_every_n_steps": 2}
    )
    t, messages = _fit(FrozenModule(), callbacks, max_steps=10)
    assert t.global_step == 10
    said = [m for m in _stability_warnings(messages) if "no trainable parameter" in m]
    assert len(said) == 1 and said[0].startswith("SharpnessMonitor")
    assert not _curvature(_probe(callbacks, SharpnessMonitor).readings)


def test_step_lr_reads_a_missing_learning_rate_as_zero():
    from lightning_stability.probes.edge import step_lr

    # optimizers such as Adafactor with relative steps keep lr None
    own_step_size = SimpleNamespace(param_groups=[{"lr": None}, {"lr": 0.01}])
    assert step_lr(own_step_size) == 0.01
