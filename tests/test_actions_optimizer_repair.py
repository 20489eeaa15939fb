"""The optimizer-repair rung: Adam with beta2 <= beta1^2 takes steps many times its learning
rate; the repair bounds them, comes before any other rung, and survives rollbacks and
resumes."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_actions_events import ScriptedSource

from lightning_stability.actions import AdamRepair, LRBackoff, Rollback, StagedTraining
from lightning_stability.actions.optimizer_repair import RepairRung, unbounded_groups


def largest_step_over_lr(betas: tuple[float, float], steps: int = 80) -> float:
    """Largest |update| / lr of torch's Adam on one parameter fed gradients that decay
    geometrically (a loud stretch followed by a quiet one)."""
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1.0, betas=betas, eps=0.0)
    worst = 0.0
    for t in range(steps):
        before = p.detach().clone()
        p.grad = torch.tensor([1.25**-t], dtype=torch.float64)
        opt.step()
        worst = max(worst, float((p.detach() - before).abs()))
    return worst


def bound(beta1: float, beta2: float, steps: int = 80) -> float:
    """Cauchy-Schwarz on m_t = (1 - beta1) sum_k beta1^k g_{t-k} against
    v_t = (1 - beta2) sum_k beta2^k g_{t-k}^2 with rho = beta1^2 / beta2 < 1:
    |m_hat_t| / sqrt(v_hat_t) <= (1 - beta1) sqrt((1 - beta2^t)(1 - rho^t))
    / ((1 - beta1^t) sqrt((1 - beta2)(1 - rho))), whatever the gradients; the largest
    value over the first ``steps`` steps."""
    rho = beta1**2 / beta2
    return max(
        (1 - beta1)
        * math.sqrt((1 - beta2**t) * (1 - rho**t))
        / ((1 - beta1**t) * math.sqrt((1 - beta2) * (1 - rho)))
        for t in range(1, steps + 1)
    )


def test_the_update_is_unbounded_below_beta1_squared_and_bounded_after_the_repair() -> None:
    unsafe = largest_step_over_lr((0.9, 0.5))
    safe = largest_step_over_lr((0.9, 0.95))
    assert unsafe > 1e3  # the ratio grows like (beta1 / sqrt(beta2))^t
    assert safe <= bound(0.9, 0.95)


def test_plan_touches_only_groups_it_can_bound() -> None:
    w = [torch.nn.Parameter(torch.zeros(2)) for _ in range(4)]
    opt = torch.optim.Adam(
        [
            {"params": [w[0]], "betas": (0.9, 0.5)},  # unbounded: repaired
            {"params": [w[1]], "betas": (0.9, 0.999)},  # fine
            {"params": [w[2]], "betas": (0.99, 0.9)},  # unbounded, but 0.95 <= 0.99^2
            {"params": [w[3]], "betas": (0.9, 0.81), "eps": 1e-12},  # the boundary counts
        ]
    )
    assert unbounded_groups(opt) == [0, 2, 3]
    plan = AdamRepair(beta2=0.95, min_eps=1e-8).plan(opt)
    assert plan == {
        0: {"betas": (0.9, 0.95)},
        3: {"betas": (0.9, 0.95), "eps": 1e-8},
    }
    AdamRepair.apply(opt, plan)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert opt.param_groups[3]["eps"] == 1e-8
    assert opt.param_groups[2]["betas"] == (0.99, 0.9)
    assert AdamRepair().plan(torch.optim.SGD(w, lr=0.1)) == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"beta2": 1.0}, "beta2 must be a number in"), ({"min_eps": 0}, "min_eps must be")],
)
def test_invalid_repair(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        AdamRepair(**kwargs)


def test_invalid_optimizer_repair_argument() -> None:
    with pytest.raises(ValueError, match="optimizer_repair must be an AdamRepair or None"):
        StagedTraining(optimizer_repair={"beta2": 0.9})
    with pytest.raises(ValueError, match="optimizer_repair must be an AdamRepair or None"):
        LRBackoff(optimizer_repair=0.95)


class UnsafeAdam(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.9, 0.5))


def test_staged_training_repairs_before_climbing() -> None:
    staged = StagedTraining(calm_steps=None)
    t = trainer(max_steps=8, callbacks=[ScriptedSource({2: "warning", 4: "warning"}), staged])
    t.fit(UnsafeAdam(lr=0.01), loader(classification_data(512), shuffle=False))
    assert t.optimizers[0].param_groups[0]["betas"] == (0.9, 0.95)
    assert staged.stage == 1  # the first WARNING was answered by the repair, the second climbed
    assert [e.step for e in staged.events] == [2, 4]
    assert "beta2 0.5 -> 0.95" in staged.events[0].message
    staged.undo_optimizer_repair(t)
    assert t.optimizers[0].param_groups[0]["betas"] == (0.9, 0.5)


def test_lr_backoff_repairs_before_cutting_and_a_healthy_optimizer_is_cut() -> None:
    backoff = LRBackoff()
    t = trainer(max_steps=6, callbacks=[ScriptedSource({2: "warning", 4: "warning"}), backoff])
    t.fit(UnsafeAdam(lr=0.01), loader(classification_data(512), shuffle=False))
    assert t.optimizers[0].param_groups[0]["betas"] == (0.9, 0.95)
    assert backoff.backoffs == 1 and backoff.scales[0][0] == 0.5

    plain = LRBackoff()
    t = trainer(max_steps=4, callbacks=[ScriptedSource({2: "warning"}), plain])
    t.fit(TinyClassifier(lr=0.01, opt="adam"), loader(classification_data(512), shuffle=False))
    assert plain.backoffs == 1 and not plain.repair.applied


def test_a_rollback_keeps_the_repair() -> None:
    # the only snapshot is step 0's, taken before the repair; rolling back to it reloads
    # the optimizer's param groups (beta2 0.5), and the repair must be put back
    staged = StagedTraining(calm_steps=None)
    rollback = Rollback(every=100)
    script = {5: "warning", 9: "critical"}
    t = trainer(max_steps=12, callbacks=[ScriptedSource(script), staged, rollback])
    t.fit(UnsafeAdam(lr=0.01), loader(classification_data(512), shuffle=False))
    assert rollback.rollbacks == 1
    assert t.optimizers[0].param_groups[0]["betas"] == (0.9, 0.95)
    assert staged.repair.applied


def test_resume_keeps_the_repair(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    staged = StagedTraining(calm_steps=None)
    t = trainer(
        max_steps=4,
        enable_checkpointing=True,
        callbacks=[ScriptedSource({2: "warning"}), staged, ckpt],
    )
    t.fit(UnsafeAdam(lr=0.01), loader(classification_data(512), shuffle=False))
    path = next(tmp_path.glob("*.ckpt"))

    resumed = StagedTraining(calm_steps=None)
    t2 = trainer(max_steps=6, callbacks=[ScriptedSource({}), resumed])
    t2.fit(UnsafeAdam(lr=0.01), loader(classification_data(512), shuffle=False), ckpt_path=path)
    assert t2.optimizers[0].param_groups[0]["betas"] == (0.9, 0.95)
    assert resumed.repair.state_dict() == staged.repair.state_dict()
    assert resumed.repair.originals == {0: {0: {"betas": (0.9, 0.5)}}}


def test_rung_state_round_trip_and_merge() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], betas=(0.9, 0.6))
    rung = RepairRung(AdamRepair())
    assert rung.climb([opt]) is not None
    assert rung.climb([opt]) is None  # nothing left to repair
    fresh = RepairRung(AdamRepair())
    fresh.merge(rung.state_dict())
    opt.param_groups[0]["betas"] = (0.9, 0.6)
    fresh.reapply([opt])
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_a_warning_that_the_repair_answers_rolls_back_before_the_unbounded_updates() -> None:
    """The WARNING at 12 is answered by the repair (beta2 0.5 -> 0.95): the trouble is what
    the unbounded updates did, so the Rollback returns to the good state of step 5 and the
    repaired optimizer goes on from there, at the same learning rate (the repair answered
    the event, no cut). The same WARNING on a bounded Adam is cut, not rolled back."""
    from test_actions_rollback import StateRecorder

    backoff, rollback, after = LRBackoff(), Rollback(every=5), StateRecorder()
    t = trainer(max_steps=14, callbacks=[ScriptedSource({12: "warning"}), backoff, rollback, after])
    t.fit(UnsafeAdam(lr=0.01), loader(classification_data(512), shuffle=False))
    assert [e.step for e in rollback.events] == [12]
    assert "to step 5" in rollback.events[0].message
    assert "optimizer repair" in rollback.events[0].message
    assert rollback.events[0].message.endswith("; optimizer repaired")
    assert torch.equal(after.states[12][0], after.states[5][0])
    assert t.optimizers[0].param_groups[0]["betas"] == (0.9, 0.95)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)
    assert backoff.backoffs == 0

    backoff, rollback = LRBackoff(), Rollback(every=5)
    t = trainer(max_steps=14, callbacks=[ScriptedSource({12: "warning"}), backoff, rollback])
    t.fit(TinyClassifier(lr=0.01, opt="adam"), loader(classification_data(512), shuffle=False))
    assert rollback.events == [] and backoff.backoffs == 1
