"""What every measuring callback shares: publishing readings, and the loss of a probe batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stability.callback_identity import IdentifiedCallback
from lightning_stability.vocabulary import PREFIX

__all__ = [
    "LossFn",
    "NoProbeLoss",
    "Reading",
    "StabilityProbe",
    "logs_this_step",
    "module_loss",
    "muted_view",
    "needs_loss_fn",
    "step_loss",
    "write_to_loggers",
]


LossFn = Callable[[pl.LightningModule, Any], Tensor]
"""``loss_fn(module, batch) -> scalar tensor``: a user-supplied probe loss."""


class NoProbeLoss(ValueError):
    """The loss of a probe batch cannot be had: the module uses manual optimization and
    no ``loss_fn`` was given, or the loss source returned no scalar loss for the batch."""


class Reading(NamedTuple):
    """One published measurement: its value and the optimizer step it was taken at."""

    value: float
    step: int


class StabilityProbe(IdentifiedCallback):
    """Base class of the callbacks that measure.

    A probe never changes training. Each measurement is published with
    :meth:`publish`: kept in :attr:`readings` (the latest value of every key, with the
    step it was taken at, which is what the warning layer consumes) and logged through
    ``pl_module.log`` so that every attached logger receives it. Keys are full tags,
    e.g. ``"stability/grad/norm"``.

    Where a probe cannot measure (a set-up it does not support, a batch without a loss) it
    never ends the run: it warns once (:meth:`warn_once`), saying why and what to do, and
    leaves out what it cannot read (:meth:`step_aside`); the other readings go on.
    """

    rolling: ClassVar[tuple[str, ...]] = ()
    """Names of the probe's :class:`RollingWindow` attributes: a rollback clears them and
    the checkpoint holds them (``state_dict`` under the same names)."""

    def __init__(self) -> None:
        super().__init__()
        self.readings: dict[str, Reading] = {}
        self._paused_until = -1
        self.set_aside: dict[str, str] = {}
        """What this probe stopped measuring for the rest of the fit, and why."""
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        """Warn (rank zero) with ``message`` the first time ``key`` comes up in this fit."""
        if key in self._warned:
            return
        self._warned.add(key)
        rank_zero_warn(f"{type(self).__name__}: {message}")

    def step_aside(self, what: str, message: str) -> None:
        """Stop measuring ``what`` for the rest of the fit and warn once with ``message``
        (why, and what the user can do about it)."""
        self.set_aside.setdefault(what, message)
        self.warn_once(f"aside:{what}", message)

    def is_set_aside(self, what: str) -> bool:
        return what in self.set_aside

    def rearm(self, step: int, pause: int = 0) -> None:
        """Called by a rollback at ``step`` on every rank: drop the readings and rolling
        statistics that describe the abandoned trajectory, and keep the next ``pause``
        steps (whose updates are skipped) out of rolling statistics."""
        self.readings.clear()
        for name in self.rolling:
            getattr(self, name).clear()
        self._paused_until = step + pause

    def accumulating(self, trainer: pl.Trainer) -> bool:
        """Whether this step's values may enter rolling statistics (not while paused)."""
        return trainer.global_step >= self._paused_until

    @override
    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).state_dict() for name in self.rolling}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in self.rolling:
            getattr(self, name).load_state_dict(state_dict[name])

    def publish(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        values: Mapping[str, float],
        *,
        log: bool = True,
    ) -> None:
        """Record ``values`` (keys relative to ``stability/``) at the current step and log
        them. Values must already agree across ranks; only rank 0's loggers write.

        In step-level hooks the values go to the loggers directly (and into
        ``trainer.callback_metrics``) rather than through ``pl_module.log``: Lightning writes
        step metrics only every ``log_every_n_steps``, keeping the last value and stamping
        it with the flush step, so a sparse reading (a curvature check every 500 steps)
        would be overwritten, or written late at the wrong step and again at later flushes.
        Dense, every-step readings pass ``log=logs_this_step(trainer)`` to keep Lightning's
        cadence. In epoch-level hooks ``pl_module.log`` is used as usual."""
        step = trainer.global_step
        direct = log and getattr(pl_module, "_current_fx_name", None) in STEP_HOOKS
        published = {
            (name if name.startswith(PREFIX) else PREFIX + name): float(value)
            for name, value in values.items()
        }
        for key, value in published.items():
            self.readings[key] = Reading(value, step)
            if direct:
                trainer.callback_metrics[key] = torch.tensor(value)
            elif log:
                pl_module.log(key, value, batch_size=1)
        if direct:
            write_to_loggers(trainer, published)


STEP_HOOKS = frozenset(
    {
        "on_train_batch_start",
        "on_train_batch_end",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
    }
)
"""The per-step training hooks (between two optimizer steps), where a reading is a step
metric."""


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes step metrics to the loggers at the current training step
    (every ``trainer.log_every_n_steps``). Dense, every-step readings log only then, as
    Lightning's own metrics do."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True)) or bool(trainer.fast_dev_run)


def write_to_loggers(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Write ``metrics`` to every logger now, on rank 0, at the step Lightning itself uses
    for step metrics (as ``LearningRateMonitor`` does)."""
    if not trainer.is_global_zero:
        return
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def step_loss(trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> Tensor | None:
    """The batch's training loss from ``on_train_batch_end``'s ``outputs`` (a tensor or a
    dict with ``"loss"``), detached, as a float scalar on the scale ``training_step``
    returned it (Lightning's division by ``accumulate_grad_batches`` undone); ``None`` when
    ``training_step`` skipped the batch."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        return None
    loss = loss.detach().float().reshape(())
    accumulate = trainer.accumulate_grad_batches
    if pl_module.automatic_optimization and accumulate != 1:  # a product costs microseconds
        loss = loss * accumulate
    return loss


def muted_view(pl_module: pl.LightningModule) -> pl.LightningModule:
    """A view of ``pl_module`` through which a probe re-runs ``training_step`` without
    anything it logs being seen as a training metric.

    The view is a new object of the module's own class that shares the module's state
    (parameters, buffers, submodules, hooks and Trainer), so the loss it computes is the
    module's loss at its current weights and gradients flow into the module's parameters;
    its ``log`` and ``log_dict`` discard their arguments. Neither the module nor the
    Trainer is modified: what ``training_step`` logs, and any plain attribute it sets on
    ``self``, stays on the view, which is dropped after the call.
    """
    view = object.__new__(type(pl_module))
    vars(view).update(vars(pl_module), log=_discard, log_dict=_discard)
    return view


def _discard(*args: Any, **kwargs: Any) -> None:
    """``LightningModule.log`` for a probe's view: the value is not a training metric."""


MANUAL_OPTIMIZATION = (
    "the module uses manual optimization, so its training_step (which steps the "
    "optimizers) cannot be re-run on a probe batch"
)
"""Why a probe that needs a loss cannot re-run ``training_step`` under manual optimization."""


def module_loss(
    pl_module: pl.LightningModule,
    batch: Any,
    batch_idx: int = 0,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """The scalar loss of ``batch`` as the module defines it.

    Uses ``loss_fn(module, batch)`` when given, else the module's own
    ``training_step(batch, batch_idx)`` (a tensor, or a dict with ``"loss"``) with its
    logging silenced. The batch is moved to the module's device first.

    Raises:
        NoProbeLoss: the module uses manual optimization (its ``training_step`` steps the
            optimizer, so it cannot be re-run as a probe) and no ``loss_fn`` was given,
            or the result is not a scalar floating-point tensor (``training_step`` skipped
            the batch by returning ``None``, or returned no ``"loss"``).
    """
    if loss_fn is None and not pl_module.automatic_optimization:
        raise NoProbeLoss(MANUAL_OPTIMIZATION)
    batch = move_data_to_device(batch, pl_module.device)
    if loss_fn is not None:
        out = loss_fn(pl_module, batch)
        source = "loss_fn"
    else:
        out = muted_view(pl_module).training_step(batch, batch_idx)
        source = "training_step"
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise NoProbeLoss(
            f"probe batch has no loss: {source} returned {type(out).__name__}; expected a "
            "scalar tensor or a dict with a scalar 'loss'"
        )
    return loss.reshape(())


def needs_loss_fn(pl_module: pl.LightningModule, loss_fn: LossFn | None) -> bool:
    """Whether a probe that re-evaluates the loss has no way to: manual optimization and
    no ``loss_fn``."""
    return loss_fn is None and not pl_module.automatic_optimization


def detach_batch(batch: Any) -> Any:
    """A copy of ``batch`` whose tensors are detached clones, safe to keep between steps."""
    from lightning.fabric.utilities.apply_func import apply_to_collection

    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


def is_global_zero(trainer: pl.Trainer) -> bool:
    return bool(trainer.is_global_zero)
