"""PerturbationAudit in real Trainer runs: margins against ground truth, an untouched live run,
checkpoint state, DDP agreement."""

import io
from typing import Any

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
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stability import AuditConfig
from lightning_stability.estimators.hvp import HessianOperator
from lightning_stability.probes.audit import PerturbationAudit

MARGIN = "stability/audit/optimization/lr_margin"


class QuadraticModule(pl.LightningModule):
    """loss = 1/2 (w - w*)^T A (w - w*), eigenvalues of A known; plain SGD. The batch is
    ignored, so every step is a full (deterministic) gradient step."""

    def __init__(self, eigs: list[float], lr: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        n = len(eigs)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        self.register_buffer("a", q @ torch.diag(torch.tensor(eigs)) @ q.T)
        self.register_buffer("target", torch.randn(n, generator=g))
        self.w = nn.Parameter(torch.randn(n, generator=g))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        d = self.w - self.target
        loss = 0.5 * d @ self.a @ d
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def dummy_loader(n: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def test_quadratic_margin_is_two_over_lr_lambda_max():
    eigs, lr = [8.0, 5.0, 2.0, 1.0, 0.3], 0.01
    audit = PerturbationAudit(
        audit=AuditConfig(horizon=40, dimensions=("optimization",)), every_n_epochs=1, num_batches=1
    )
    trainer(max_epochs=1, max_steps=-1, callbacks=[audit]).fit(
        QuadraticModule(eigs, lr), dummy_loader()
    )
    expected = 2.0 / (lr * max(eigs))  # 25
    (margin,) = audit.margins
    assert abs(margin - expected) / expected < 0.10
    assert audit.readings[MARGIN].value == margin


class TanhRegressor(pl.LightningModule):
    """A small tanh MLP fitted by full-batch gradient descent with squared loss: the setting
    in which progressive sharpening drives lambda_max to 2/lr (Cohen et al. 2021)."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.head(self.net(x)) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    return TensorDataset(x, torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3])


class SharpnessAtAudit(pl.Callback):
    """Ground truth beside the audit: lambda_max of the full-batch loss by power iteration on
    exact Hessian-vector products, at the same epochs."""

    def __init__(self, every: int, batch) -> None:
        self.every, self.batch, self.values = every, batch, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every:
            return
        closure = lambda: pl_module.training_step(self.batch, 0)  # noqa: E731
        with HessianOperator(closure, list(pl_module.parameters())) as h:
            v = torch.randn(h.dim, generator=torch.Generator().manual_seed(0))
            for _ in range(60):
                v = h.matvec(v)
                lam = v.norm().item()
                v = v / lam
        self.values.append(lam)


def test_full_batch_margin_falls_towards_one_at_the_edge_of_stability():
    lr, every = 0.1, 60
    data = regression_data()
    audit = PerturbationAudit(
        audit=AuditConfig(horizon=20, dimensions=("optimization",)),
        every_n_epochs=every,
        num_batches=1,
    )
    truth = SharpnessAtAudit(every, data.tensors)
    trainer(max_epochs=5 * every, max_steps=-1, callbacks=[truth, audit]).fit(
        TanhRegressor(lr), DataLoader(data, batch_size=len(data))
    )
    margins = audit.margins
    assert len(margins) == 5
    # Early on, the margin is the quadratic prediction 2 / (lr lambda_max).
    predicted = 2.0 / (lr * truth.values[0])
    assert predicted > 2.0
    assert abs(margins[0] - predicted) / predicted < 0.2
    # Progressive sharpening brings lambda_max to 2/lr, and the margin down to about 1.
    assert truth.values[-1] * lr / 2 == pytest.approx(1.0, abs=0.15)
    assert margins[-1] < margins[0]
    assert 0.7 <= margins[-1] <= 1.5


class StepAwareClassifier(TinyClassifier):
    """Its training step reads the Trainer and logs, as real modules do."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("epoch_seen", float(self.trainer.current_epoch))
        return loss


class StopsFromACopy(StepAwareClassifier):
    """Sets ``self.trainer.should_stop`` whenever a copy of it runs ``training_step``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.original = id(self)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if id(self) != self.original:
            self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)


def test_the_audit_copy_reads_the_trainer_but_cannot_change_it():
    audit = PerturbationAudit(
        audit=AuditConfig(horizon=3, bisection_steps=1), every_n_epochs=1, num_batches=1
    )
    model = StopsFromACopy(opt="adam", lr=0.02)
    t = trainer(max_epochs=3, max_steps=-1, callbacks=[audit])
    t.fit(model, loader(classification_data(n=64), batch_size=32))
    assert not t.should_stop
    assert t.current_epoch == 3
    assert len(audit.history) == 3
    assert "audit" not in audit.set_aside


def fit_classifier(callbacks, **overrides) -> tuple[nn.Module, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = StepAwareClassifier(opt="adam", lr=0.02, norm=True, dropout=0.2)
    t = trainer(max_epochs=2, max_steps=-1, callbacks=callbacks, **overrides)
    t.fit(model, loader(classification_data(n=128), batch_size=32, shuffle=True))
    return model, t


def test_live_run_is_bit_identical_with_and_without_the_audit():
    audit = PerturbationAudit(
        audit=AuditConfig(horizon=5, bisection_steps=1, epsilon=1e-2),
        every_n_epochs=1,
        num_batches=2,
    )
    with_audit, t = fit_classifier([audit], gradient_clip_val=1.0)
    without, _ = fit_classifier([], gradient_clip_val=1.0)
    assert torch.equal(flat_weights(with_audit), flat_weights(without))
    assert all(torch.equal(a, b) for a, b in zip(with_audit.buffers(), without.buffers()))
    assert len(audit.history) == 2
    for dim in ("parametric", "data", "learning_signal"):
        assert f"stability/audit/{dim}/param_distance" in audit.readings
        assert f"stability/audit/{dim}/param_distance" in t.callback_metrics
    assert audit.readings[MARGIN].value >= 1.0  # a healthy run tolerates its own step size
    assert audit.readings["stability/audit/parametric/param_growth"].value > 0


def test_state_dict_survives_a_weights_only_checkpoint():
    audit = PerturbationAudit(
        audit=AuditConfig(horizon=5, dimensions=("optimization", "learning_signal")), num_batches=1
    )
    fit_classifier([audit])
    buffer = io.BytesIO()
    torch.save(audit.state_dict(), buffer)
    buffer.seek(0)
    restored = PerturbationAudit()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.history == audit.history
    assert restored.margins == audit.margins and len(restored.margins) == 2


def test_history_is_kept_in_the_checkpoint_and_continues_on_resume(tmp_path):
    def make() -> PerturbationAudit:
        return PerturbationAudit(
            audit=AuditConfig(horizon=3, dimensions=("optimization",)), num_batches=1
        )

    audit = make()
    _, t = fit_classifier([audit], default_root_dir=tmp_path)
    path = tmp_path / "audit.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"][audit.state_key]
    assert saved["history"] == audit.history and len(audit.history) == 2

    resumed = make()
    pl.seed_everything(0, verbose=False)
    model = StepAwareClassifier(opt="adam", lr=0.02, norm=True, dropout=0.2)
    trainer(max_epochs=3, max_steps=-1, callbacks=[resumed]).fit(
        model, loader(classification_data(n=128), batch_size=32), ckpt_path=path
    )
    assert resumed.history[:2] == audit.history
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]


def test_manual_optimization_without_loss_fn_warns_and_steps_aside():
    class Manual(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            opt = self.optimizers()
            loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return loss

    audit = PerturbationAudit(
        audit=AuditConfig(horizon=2, dimensions=("learning_signal",)), num_batches=1
    )
    t = trainer(max_epochs=2, max_steps=-1, callbacks=[audit])
    with pytest.warns(UserWarning, match="manual optimization.*loss_fn=") as caught:
        t.fit(Manual(), loader(classification_data(n=32)))
    assert t.current_epoch == 2  # the run went on
    assert len([w for w in caught if "PerturbationAudit" in str(w.message)]) == 1
    assert audit.history == [] and not audit.readings

    def loss_fn(module, batch):
        return nn.functional.cross_entropy(module(batch[0]), batch[1])

    audit = PerturbationAudit(
        audit=AuditConfig(horizon=2, dimensions=("learning_signal",)),
        num_batches=1,
        loss_fn=loss_fn,
    )
    trainer(max_epochs=1, max_steps=-1, callbacks=[audit]).fit(
        Manual(), loader(classification_data(n=32))
    )
    assert "stability/audit/learning_signal/param_distance" in audit.readings


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_epochs": 0},
        {"num_batches": 0},
        {"horizon": -1},
        {"dimensions": ("learning",)},
        {"lr_multipliers": (1.0, 1.0)},
        {"divergence_factor": 0.5},
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs):
    own = {k: v for k, v in kwargs.items() if k in ("every_n_epochs", "num_batches")}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        if own:
            PerturbationAudit(**own)
        else:
            PerturbationAudit(audit=AuditConfig(**kwargs))


def margin_and_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    audit = next((c for c in trainer.callbacks if isinstance(c, PerturbationAudit)), None)
    return {
        "weights": flat_weights(pl_module),
        "readings": None if audit is None else {k: r.value for k, r in audit.readings.items()},
        "history": None if audit is None else audit.history,
    }


@pytest.mark.ddp
def test_ddp_ranks_publish_the_same_margin_and_training_is_unchanged(tmp_path):
    runs = {}
    for name, use in (("with", True), ("without", False)):
        out = tmp_path / name
        out.mkdir()
        callbacks: list[pl.Callback] = [DumpOnFitEnd(out, margin_and_weights)]
        if use:
            callbacks.append(
                PerturbationAudit(
                    audit=AuditConfig(
                        horizon=4, bisection_steps=1, dimensions=("optimization", "data")
                    ),
                    num_batches=1,
                )
            )
        pl.seed_everything(0, verbose=False)
        model = TinyClassifier(dropout=0.1)
        t = ddp_trainer(max_epochs=1, max_steps=-1, callbacks=callbacks)
        t.fit(model, loader(classification_data(n=64), batch_size=16, shuffle=False))
        runs[name] = load_ranks(out)
    r0, r1 = runs["with"]
    assert r0["readings"] and r0["readings"] == r1["readings"]
    assert MARGIN in r0["readings"]
    assert r0["history"] == r1["history"]
    for with_audit, without in zip(runs["with"], runs["without"]):
        assert torch.equal(with_audit["weights"], without["weights"])
