"""PerturbationAudit: how the training dynamics respond to controlled disturbances, measured on a
forked copy of the run so that the run itself never changes."""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_stability.configuration import regroup
from lightning_stability.estimators.isolation import frozen_rng, preserved_state
from lightning_stability.estimators.perturbation import (
    AuditConfig,
    Fork,
    PerturbationAuditor,
)
from lightning_stability.probes.base import (
    MANUAL_OPTIMIZATION,
    LossFn,
    StabilityProbe,
    detach_batch,
    module_loss,
    needs_loss_fn,
    step_loss,
)
from lightning_stability.vocabulary import audit_key, check_positive_int

AUDIT_FLAT_ALIASES = {
    name: ("audit", name)
    for name in (
        "horizon",
        "epsilon",
        "lr_multipliers",
        "dimensions",
        "input_noise",
        "label_noise",
        "signal_noise",
        "bisection_steps",
        "divergence_factor",
    )
}
"""The flat keywords of ``PerturbationAudit`` before its settings were grouped."""

__all__ = ["PerturbationAudit"]


class _Cached(NamedTuple):
    """A cached training batch and the ``batch_idx`` ``training_step`` is re-run with."""

    batch: Any
    batch_idx: int


class _TrainerView:
    """What the audit's copy of the module sees as ``self.trainer``: every attribute is read
    from the live Trainer (``global_step``, ``current_epoch``, the loops ``self.log`` writes
    through), and an attribute the copy's ``training_step`` sets (``self.trainer.should_stop =
    True`` on a diverging rollout) stays on this view, so a rollout never sets an attribute of
    the run's Trainer. The objects read through it (loops, strategy, loggers) are the live ones.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self._live = trainer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live, name)


class PerturbationAudit(StabilityProbe):
    """Controlled perturbation auditing of the training trajectory (Zhang et al. 2026,
    arXiv:2601.13160), opt-in and periodic.

    At the end of every ``every_n_epochs``-th training epoch the current state (weights,
    buffers, optimizer state and hyper-parameters) is forked into a disposable copy, and each
    configured disturbance is rolled out for ``horizon`` optimizer steps on the first
    ``num_batches`` batches of that epoch for which ``training_step`` returned a loss
    (cached, cycled, re-run with the ``batch_idx`` they had), against an unperturbed
    rollout over the same batches:

    * ``parametric``: weights displaced by Gaussian noise of relative scale ``epsilon``;
    * ``optimization``: learning rate multiplied by ``m``; the margin is the largest ``m`` on
      (a bisection of) ``lr_multipliers`` whose rollout does not diverge. Near the edge of
      stability it falls towards 1; for SGD on a quadratic it is ``2 / (lr lambda_max)``;
    * ``data``: input noise (``input_noise`` x the input's std) and label noise (a fraction
      ``label_noise`` of the entries of integer tensors resampled from the batch);
    * ``learning_signal``: Gaussian gradient noise of norm ``signal_noise`` x the gradient norm.

    A rollout *diverges* when any loss it sees is non-finite or exceeds ``divergence_factor``
    times the loss of the start weights on the same batch. Just above the edge divergence is
    slow, so on a quadratic the margin is biased upwards by about
    ``ln(divergence_factor / s) / (4 horizon)`` relative, ``s`` being the top eigendirection's
    share of the loss (a longer ``horizon`` tightens it), see
    :mod:`lightning_stability.estimators.perturbation`.

    Readings (``stability/audit/...``, published at the audit's step; non-finite values are
    kept in :attr:`history` but not logged): ``optimization/lr_margin``,
    ``optimization/lr_diverge``, ``<dim>/loss_gap``, ``<dim>/param_distance``,
    ``<dim>/diverged``, ``parametric/param_growth``, ``parametric/loss_gap_growth``,
    ``reference/loss_ratio``, ``reference/diverged``, ``rollouts``.

    Isolation: the live module and optimizer are only read; the copy's loss is the module's own
    ``training_step`` (logging silenced; ``self.trainer`` is a view that reads the live Trainer
    but whose attributes the copy cannot set) or ``loss_fn``; the global RNG is restored
    afterwards and every disturbance draws from a private generator seeded by ``seed`` and the
    audit count. Rollouts hold the learning rate in force at the audit (the
    scheduler is not advanced), clip by norm when the Trainer does (``gradient_clip_val`` with
    the ``"norm"`` algorithm), and run in float32 when the weights are 16-bit.

    Distributed: the audit runs on rank 0 only, on rank 0's cached batches; the readings are
    broadcast with ``trainer.strategy.broadcast`` so every rank publishes the same values (the
    other ranks wait at the broadcast). Models with ``SyncBatchNorm`` cannot be audited this
    way (the copy would wait for ranks that do not run it).

    Where it cannot audit (manual optimization without ``loss_fn``, more than one optimizer,
    a failure of the rollouts on rank 0), it warns once, saying why, and audits no more in
    this fit; training goes on.

    Args:
        every_n_epochs: audit at the end of epochs ``n-1, 2n-1, ...`` (positive; default 1).
        num_batches: batches cached per audited epoch (positive; default 4).
        audit: what an audit perturbs and how hard: horizon, dimensions (a subset of
            :data:`~lightning_stability.vocabulary.DIMENSIONS`), noise scales, the
            learning-rate grid and bisection, the divergence factor
            (:class:`~lightning_stability.estimators.perturbation.AuditConfig`; default
            ``AuditConfig()``).
        seed: base seed of the disturbances (default 0).
        loss_fn: ``loss_fn(module, batch) -> scalar``; default: the module's ``training_step``.
        **deprecated: the flat keywords of the previous release (``horizon=20``, ...),
            folded into ``audit`` with a ``DeprecationWarning`` that names it.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_batches: int = 4,
        audit: AuditConfig | None = None,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        **deprecated: Any,
    ) -> None:
        super().__init__()
        check_positive_int(every_n_epochs, "every_n_epochs")
        check_positive_int(num_batches, "num_batches")
        self.config = regroup(
            "PerturbationAudit", deprecated, AUDIT_FLAT_ALIASES, {"audit": (AuditConfig, audit)}
        )["audit"]
        self.every_n_epochs = every_n_epochs
        self.num_batches = num_batches
        self.seed = int(seed)
        self.loss_fn = loss_fn
        self.history: list[dict[str, Any]] = []
        self.last_seconds: float = math.nan
        self._batches: list[_Cached] = []
        self._candidate: _Cached | None = None

    def _due(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Known before the first step on every rank alike: say so now, not at epoch end.
        if needs_loss_fn(pl_module, self.loss_fn):
            self.step_aside(
                "audit",
                f"{MANUAL_OPTIMIZATION}; no audit in this run. To audit, pass "
                "loss_fn=lambda module, batch: <scalar loss> (rolled out with the first "
                "optimizer).",
            )
        elif len(trainer.optimizers) != 1:
            self.step_aside(
                "audit",
                f"the rollouts need exactly one optimizer, found {len(trainer.optimizers)}; "
                "no audit in this run.",
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._candidate = None
        if self.is_set_aside("audit") or not (trainer.is_global_zero and self._due(trainer)):
            return
        if len(self._batches) < self.num_batches:
            self._candidate = _Cached(detach_batch(batch), batch_idx)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # A batch that training_step skipped (no loss) would give the rollouts no loss.
        candidate, self._candidate = self._candidate, None
        if candidate is not None and (
            self.loss_fn is not None or step_loss(trainer, pl_module, outputs) is not None
        ):
            self._batches.append(candidate)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer) or self.is_set_aside("audit"):
            self._batches = []
            return
        values: dict[str, float] | None = None
        message: str | None = None
        if trainer.is_global_zero and self._batches:
            start = time.perf_counter()
            try:
                values = self.audit(trainer, pl_module, self._batches)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
            self.last_seconds = time.perf_counter() - start
        self._batches = []
        values, message = trainer.strategy.broadcast((values, message), src=0)
        if message is not None:
            # The audit is a diagnostic on a forked copy: its failure says nothing about
            # the run, which goes on.
            self.step_aside(
                "audit",
                f"the audit failed on rank 0 ({message}); no further audits in this run. "
                "A loss_fn=lambda module, batch: <scalar loss> may avoid what failed.",
            )
            return
        if values is None:  # no batch was seen this epoch
            return
        self.history.append(
            {"epoch": trainer.current_epoch, "step": trainer.global_step, "values": values}
        )
        finite = {audit_key(k): v for k, v in values.items() if math.isfinite(v)}
        self.publish(trainer, pl_module, finite)

    def audit(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]
    ) -> dict[str, float]:
        """Run one audit now on ``batches`` (on this process only) and return its readings,
        keys relative to ``stability/audit/``. A batch given as a ``(batch, batch_idx)``
        named tuple from the cache is re-run with its ``batch_idx``, any other with 0.

        Raises:
            ValueError: the trainer has more than one optimizer, or the module uses
                manual optimization and no ``loss_fn`` was given.
        """
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"PerturbationAudit needs exactly one optimizer, found {len(trainer.optimizers)}"
            )
        config = self.config
        clip = trainer.gradient_clip_val
        if clip and (trainer.gradient_clip_algorithm or "norm") == "norm":
            config = AuditConfig(**{**vars(config), "max_grad_norm": float(clip)})
        generator = torch.Generator().manual_seed(self.seed + 7919 * len(self.history))
        devices = list({p.device for p in pl_module.parameters()})
        with preserved_state(pl_module), frozen_rng(devices):
            fork = Fork(pl_module, trainer.optimizers[0])
            if isinstance(fork.module, pl.LightningModule):
                # A LightningModule drops its trainer when copied; the copy's training_step
                # reads self.trainer (global_step, current_epoch, self.log's result
                # collection), so it gets a view of the live Trainer whose attributes it
                # cannot set.
                fork.module.trainer = _TrainerView(trainer)  # type: ignore[assignment]

            def loss(module: torch.nn.Module, batch: Any) -> torch.Tensor:
                batch, batch_idx = batch if isinstance(batch, _Cached) else (batch, 0)
                return module_loss(module, batch, batch_idx, self.loss_fn)  # type: ignore[arg-type]

            result = PerturbationAuditor(fork, loss, batches, config, generator).run()
        values = dict(result.values)
        values["rollouts"] = float(result.rollouts)
        return values

    @property
    def margins(self) -> list[float]:
        """Learning-rate margin of every audit so far (empty without the optimization dimension)."""
        return [
            h["values"]["optimization/lr_margin"]
            for h in self.history
            if "optimization/lr_margin" in h["values"]
        ]

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs,
            horizon=self.config.horizon,
            dimensions=self.config.dimensions,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h, values=dict(h["values"])) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h, values=dict(h["values"])) for h in state_dict.get("history", [])]
