"""The scenario suite: the divergence rule, the perturbations, and real runs that diverge
(or do not) as their scenario says."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer as make_trainer
from lightning.fabric.utilities.spike import TrainingSpikeException
from lightning.pytorch.callbacks import SpikeDetection
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.scenarios.divergence import DivergenceRule, divergence_step
from benchmarks.scenarios.perturbations import CorruptedLoader, RoutingFeedback
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
