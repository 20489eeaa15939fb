"""Training loss, its tail over a window, and its critical-slowing-down indicators."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_stability.estimators.online_stats import RollingWindow
from lightning_stability.probes.base import StabilityProbe, logs_this_step, step_loss
from lightning_stability.vocabulary import (
    LOSS_AC1,
    LOSS_NONFINITE,
    LOSS_SAMPLE_MAX,
    LOSS_SAMPLE_Q,
    LOSS_SPREAD,
    LOSS_TAIL_MAX,
    LOSS_TAIL_Q,
    LOSS_VALUE,
    LOSS_VAR,
    check_positive_int,
)

__all__ = ["PER_SAMPLE_LOSS_KEY", "LossMonitor"]

PER_SAMPLE_LOSS_KEY = "per_sample_loss"
"""Key under which ``training_step`` may return its per-sample losses (a 1-d tensor) next
to ``"loss"``; the monitor then also reports their quantile and maximum."""


class LossMonitor(StabilityProbe):
    """Per-step training loss, non-finite detection and the tail of the loss distribution.

    Averages can improve while the worst case worsens, so besides the loss the monitor
    reports the maximum and a high quantile of the batch losses over a window. Read in
    ``on_train_batch_end`` from the loss ``training_step`` returned (multiplied back by
    ``accumulate_grad_batches``, which Lightning divides it by under automatic
    optimization); nothing is recomputed. Batches for which ``training_step`` returns no
    loss are left out (under manual optimization, with a warning the first time).

    Readings (``stability/loss/...``, every batch; passed to ``pl_module.log`` on the steps
    where Lightning writes to the loggers):

    - ``value``: the batch loss, averaged over ranks.
    - ``nonfinite``: 1 when the loss is non-finite on any rank, else 0. Non-finite losses
      are kept out of the windows so that the statistics stay usable.
    - ``tail_max``, ``tail_q``: maximum and ``quantile``-quantile over the last ``window``
      batches of the worst rank's loss (the maximum over ranks).
    - ``spread``: ``tail_q`` minus the window median of that worst-rank loss (loss units).
    - ``var``, ``ac1``: variance and lag-1 autocorrelation of ``value`` over the window;
      rising together they indicate critical slowing down (Scheffer et al. 2009,
      *Early-warning signals for critical transitions*).
    - ``sample_q``, ``sample_max``: when ``training_step`` returns a dict with
      :data:`PER_SAMPLE_LOSS_KEY`, the ``quantile``-quantile and the maximum of this
      batch's per-sample losses (each rank's quantile, then the maximum over ranks).

    The loss values of all ranks are gathered with one ``all_gather`` per batch, so every
    rank publishes the same numbers.

    Args:
        window: batches in the rolling window; default 100.
        quantile: the tail quantile, in (0, 1); default 0.95.
    """

    rolling = ("loss_window", "worst_window")

    def __init__(self, window: int = 100, quantile: float = 0.95) -> None:
        super().__init__()
        check_positive_int(window, "window")
        if not isinstance(quantile, (int, float)) or not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be a number in (0, 1), got {quantile!r}")
        self.window = window
        self.quantile = float(quantile)
        self.loss_window = RollingWindow(window)
        self.worst_window = RollingWindow(window)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(window=self.window, quantile=self.quantile)

    @override
    @torch.no_grad()
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = step_loss(trainer, pl_module, outputs)
        if loss is None:
            if not pl_module.automatic_optimization:
                self.warn_once(
                    "no_loss",
                    "training_step returned no loss (manual optimization), so the loss "
                    "readings (stability/loss/*) are taken only on batches where it does. "
                    "Return the loss to watch from training_step (a scalar tensor, or a "
                    "dict with 'loss').",
                )
            return  # under automatic optimization, training_step skipped this batch
        row = [loss]
        per_sample = outputs.get(PER_SAMPLE_LOSS_KEY) if isinstance(outputs, Mapping) else None
        if isinstance(per_sample, Tensor) and per_sample.numel() > 0:
            ps = per_sample.detach().float().reshape(-1).to(loss.device)
            row += [torch.quantile(ps, self.quantile), ps.max()]
        local = torch.stack(row)
        gathered = trainer.strategy.all_gather(local).reshape(-1, local.numel())
        host = gathered.tolist()  # the one synchronisation of the step
        losses = [r[0] for r in host]
        finite = all(math.isfinite(v) for v in losses)

        values: dict[str, float] = {
            LOSS_VALUE: sum(losses) / len(losses),
            LOSS_NONFINITE: 0.0 if finite else 1.0,
        }
        if finite and self.accumulating(trainer):
            self.loss_window.update(values[LOSS_VALUE])
            self.worst_window.update(max(losses))
        if len(self.worst_window):  # empty after a rollback; nan would read as non-finite
            values[LOSS_TAIL_MAX] = self.worst_window.max()
            values[LOSS_TAIL_Q] = self.worst_window.quantile(self.quantile)
            values[LOSS_SPREAD] = values[LOSS_TAIL_Q] - self.worst_window.quantile(0.5)
        values[LOSS_VAR] = self.loss_window.var()
        values[LOSS_AC1] = self.loss_window.ac1()
        if len(row) == 3:
            values[LOSS_SAMPLE_Q] = max(r[1] for r in host)
            values[LOSS_SAMPLE_MAX] = max(r[2] for r in host)
        self.publish(trainer, pl_module, values, log=logs_this_step(trainer))
