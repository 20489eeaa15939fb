"""The scenario suite: the divergence rule, the perturbations, and real runs that diverge
(or do not) as their scenario says."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer as make_trainer
from lightning.fabric.utilities.spike import TrainingSpikeException
from lightning.pytorch.callbacks import SpikeDetection
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.scenarios.divergence import DivergenceRule, band_exit_step, divergence_step
from benchmarks.scenarios.perturbations import CorruptedLoader, LRRamp, RoutingFeedback
from benchmarks.scenarios.registry import SCENARIOS
from benchmarks.scenarios.runner import run_scenario, stability_set
from benchmarks.scenarios.tasks import MLP


def _decay(n: int, start: float = 2.0, end: float = 1.0) -> list[float]:
    return [end + (start - end) * math.exp(-t / 5) for t in range(n)]


def test_decreasing_loss_does_not_diverge():
    assert divergence_step(_decay(100)) is None


def test_non_finite_loss_diverges_at_once():
    losses = _decay(20)
    losses[7] = math.nan
    assert divergence_step(losses) == 7
    losses[7] = math.inf
    assert divergence_step(losses) == 7


def test_persistent_jump_diverges_at_first_smoothed_excess():
    losses = [1.0] * 30 + [5.0] * 20
    # trailing 5-step median first exceeds 3 x 1.0 once three of its five values are 5.0
    assert divergence_step(losses) == 32
    assert divergence_step(losses, DivergenceRule(smooth=1)) == 30


def test_blip_shorter_than_patience_is_not_divergence():
    assert divergence_step([1.0] * 30 + [5.0] * 8 + [1.0] * 30) is None
    assert divergence_step([1.0] * 30 + [100.0] + [1.0] * 30) is None


def test_excess_below_factor_is_not_divergence():
    assert divergence_step([1.0] * 30 + [2.9] * 40) is None
    assert divergence_step([1.0] * 30 + [2.9] * 40, DivergenceRule(factor=2.0)) == 32


def test_run_ending_before_patience_has_not_diverged():
    assert divergence_step([1.0] * 30 + [5.0] * 11) is None
    assert divergence_step([1.0] * 30 + [5.0] * 12) == 32


def test_floor_keeps_noise_around_a_tiny_loss_from_counting():
    losses = [2.0] * 10 + [1e-4] * 30 + [1e-3] * 30  # 10x, but a thousandth of the start
    assert divergence_step(losses) is None
    assert divergence_step(losses, DivergenceRule(floor_frac=0.0)) == 42


def test_warmup_losses_are_not_a_baseline():
    # a loss that starts low for a few steps (initialisation luck) and settles higher
    losses = [0.1] * 5 + [1.0] * 50
    assert divergence_step(losses) is None


@pytest.mark.parametrize(
    "kwargs", [{"factor": 1.0}, {"patience": 0}, {"smooth": 0}, {"warmup": -1}, {"floor_frac": 1}]
)
def test_rule_rejects_bad_arguments(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        DivergenceRule(**kwargs)


def _plain_loader() -> DataLoader:
    x = torch.arange(40, dtype=torch.float32).view(20, 2)
    y = torch.arange(20) % 4
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def test_corrupted_loader_corrupts_exactly_its_step_range_across_epochs():
    clean = list(_plain_loader())  # 5 batches per epoch
    wrapped = CorruptedLoader(_plain_loader(), start=3, stop=7, mode="scale", scale=100.0)
    seen = [b for _ in range(2) for b in wrapped]
    for i, (x, y) in enumerate(seen):
        cx, cy = clean[i % 5]
        torch.testing.assert_close(x, cx * 100.0 if 3 <= i < 7 else cx)
        torch.testing.assert_close(y, cy)


def test_corrupted_loader_label_modes():
    scrambled = CorruptedLoader(_plain_loader(), 0, 5, mode="scramble", seed=1)
    for (x, y), (cx, cy) in zip(scrambled, _plain_loader()):
        torch.testing.assert_close(x, cx)
        assert sorted(y.tolist()) == sorted(cy.tolist())
    noisy = CorruptedLoader(_plain_loader(), 0, 5, mode="random_labels", num_classes=4, seed=1)
    labels = torch.cat([y for _, y in noisy])
    assert not torch.equal(labels, torch.cat([y for _, y in _plain_loader()]))
    assert labels.min() >= 0 and labels.max() < 4
    with pytest.raises(ValueError, match="mode"):
        CorruptedLoader(_plain_loader(), 0, 5, mode="flip")
    with pytest.raises(ValueError, match="num_classes"):
        CorruptedLoader(_plain_loader(), 0, 5, mode="random_labels")


def test_routing_data_follows_the_models_predictions():
    torch.manual_seed(0)
    model = MLP(8, 1, hidden=8, depth=1, task="regression")
    env = RoutingFeedback(model, deploy_step=2, ramp_steps=1, temperature=0.1, seed=0)
    before = env.shares()
    torch.testing.assert_close(before, torch.full((64,), 1 / 64))
    env.next_batch()
    env.next_batch()
    after = env.shares()
    with torch.no_grad():
        pred = model(env.features).squeeze(-1)
    torch.testing.assert_close(after, torch.softmax(-pred / 0.1, dim=0))
    # the routes the model calls fastest are the ones sampled, and they become slower
    fastest = int(pred.argmin())
    times_before = env.travel_times()[fastest]
    x, _ = env.next_batch()
    assert (x == env.features[fastest]).all(dim=1).float().mean() > 1 / 64
    assert env.travel_times()[fastest] > times_before


def test_stability_set_rejects_unknown_mode_and_bare_is_empty():
    with pytest.raises(ValueError, match="mode"):
        stability_set("loud", SCENARIOS["stable_digits_sgd"])
    assert stability_set("bare", SCENARIOS["stable_digits_sgd"]) == ([], [])


def test_lr_spike_diverges_after_the_jump_and_baselines_only_record():
    scenario = SCENARIOS["lr_spike"]
    record = run_scenario(scenario, seed=0, mode="bare")
    _, _, _, _, max_steps = scenario.make(0)
    assert len(record.losses) == max_steps  # the recording baselines never stop the run
    assert record.lrs[149] == pytest.approx(0.05) and record.lrs[150] == pytest.approx(0.5)
    assert record.divergence_step is not None and 150 <= record.divergence_step < 200
    assert record.divergence_step == divergence_step(record.losses, scenario.rule)
    assert record.early_stopping_step is not None  # val loss passed chance level, run went on


def test_stable_digits_run_does_not_diverge():
    record = run_scenario(SCENARIOS["stable_digits_sgd"], seed=0, mode="bare")
    assert record.divergence_step is None
    assert record.losses[-1] < 0.2 * record.losses[0]
    assert record.early_stopping_step is None


def test_recording_spike_detection_fires_where_lightnings_raises(tmp_path):
    scenario = SCENARIOS["stable_digits_sgd"]
    record = run_scenario(scenario, seed=0, mode="bare")
    assert record.spike_detection_steps  # Lightning's detector fires on this (stable) run
    pl.seed_everything(0, verbose=False)
    module, train, _, _, max_steps = scenario.make(0)
    trainer = make_trainer(
        max_steps=max_steps,
        callbacks=[SpikeDetection(exclude_batches_path=str(tmp_path))],
        default_root_dir=tmp_path,
    )
    with pytest.raises(TrainingSpikeException):
        trainer.fit(module, train)
    assert trainer.global_step - 1 == record.spike_detection_steps[0]


def test_band_exit_step_on_synthetic_losses():
    flat = [1.0 + 0.01 * (t % 3) for t in range(150)]
    assert band_exit_step(flat, onset=100) is None  # noise inside its own band
    assert band_exit_step([*flat, 1.5, 1.0], onset=100) == 150  # a jump above the band
    assert band_exit_step([*flat, 1.0, math.nan], onset=100) == 151  # non-finite
    # the relative floor: a perfectly flat loss tolerates 5% (median + 0.05 * median)
    assert band_exit_step([1.0] * 50 + [1.04, 1.06], onset=0) == 51
    # nothing before the onset counts, and steps with too little history are skipped
    assert band_exit_step([1.0] * 20 + [9.0] + [1.0] * 20, onset=21) is None
    assert band_exit_step([9.0, 1.0, 1.0], onset=0, min_history=5) is None
    # a slow drift stays inside a band that follows it; a fast rise leaves it
    drift = [1.0 + 0.001 * t for t in range(300)]
    assert band_exit_step(drift, onset=0) is None
    assert band_exit_step([*drift[:200], *[1.5 * 1.05**t for t in range(50)]], 150) == 200
    with pytest.raises(ValueError):
        band_exit_step(flat, window=0)


GRADUAL = ("lr_ramp", "progressive_sharpening", "attention_logit_growth", "output_logit_divergence")


@pytest.mark.parametrize("name", GRADUAL)
def test_gradual_scenarios_build_and_train_a_few_steps(name):
    scenario = SCENARIOS[name]
    assert scenario.kind == "diverging" and scenario.gradual
    assert scenario.description and len(scenario.layers) == 2
    pl.seed_everything(0, verbose=False)
    module, train, val, extra, max_steps = scenario.make(0)
    names = dict(module.named_modules())
    assert all(layer in names for layer in scenario.layers)
    assert scenario.onset < max_steps <= 500
    trainer = make_trainer(max_steps=3, callbacks=extra, limit_val_batches=1)
    trainer.fit(module, train, val)
    assert trainer.global_step == 3


def test_lr_ramp_multiplies_per_step_and_composes():
    ramp = LRRamp(start=2, factor=2.0, max_factor=8.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    trainer = SimpleNamespace(optimizers=[opt], global_step=0)
    lrs = []
    for step in range(7):
        trainer.global_step = step
        ramp.on_train_batch_start(trainer, None, None, 0)
        ramp.on_train_batch_start(trainer, None, None, 1)  # a second micro-batch: no-op
        lrs.append(opt.param_groups[0]["lr"])
        if step == 3:
            opt.param_groups[0]["lr"] *= 0.5  # an action halving the lr composes with the ramp
    assert lrs == [1.0, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    resumed = LRRamp(start=2, factor=2.0, max_factor=8.0)
    resumed.load_state_dict(ramp.state_dict())
    assert resumed.total == 8.0 and resumed.last_step == 6
    with pytest.raises(ValueError):
        LRRamp(start=0, factor=0.5)


def test_small_gpt_qk_norm_bounds_attention_logits():
    from benchmarks.scenarios.transformer import SmallGPT

    x = torch.randint(0, 128, (2, 32))
    for qk_norm in (False, True):
        torch.manual_seed(0)
        model = SmallGPT(qk_norm=qk_norm)
        with torch.no_grad():  # inflate the query/key weights, as a high lr does
            for block in model.blocks:
                block.attn.qkv.weight.mul_(30.0)
        assert model(x).shape == (2, 32, 128)
        big = model.attention_logit_max
        assert (big < 20.0) if qk_norm else (big > 100.0)
