"""Gradient norms, clipping events and update size, measured every optimizer step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stability.estimators.online_stats import RollingWindow
from lightning_stability.estimators.sharding import (
    any_sharded,
    flat_sharded,
    global_count_nonfinite,
    global_max,
    global_sq_norms,
    local_shard,
    sum_over_shards,
)
from lightning_stability.probes.base import StabilityProbe, logs_this_step
from lightning_stability.vocabulary import (
    GRAD_CLIP_EVENT,
    GRAD_CLIP_RATE,
    GRAD_CLIP_THRESHOLD,
    GRAD_NONFINITE,
    GRAD_NORM,
    GRAD_NORM_AC1,
    GRAD_NORM_VAR,
    GRAD_UPDATE_RATIO,
    GRAD_WEIGHT_NORM,
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    grad_group_key,
    grad_group_update_key,
)

__all__ = ["GradientMonitor", "unbounded_adam_groups"]

_UPDATE_MODES = ("sample", "full", "off")


def _positive_int(value: Any, argument: str, *, allow_zero: bool = False) -> int:
    (check_nonnegative_int if allow_zero else check_positive_int)(value, argument)
    return value


def unbounded_adam_groups(optimizers: list[Any]) -> list[str]:
    """The param groups (``"optimizer i, group j"``) whose ``betas`` have
    ``beta2 < beta1**2``.

    Adam's first moment is ``(1 - b1) sum_k b1^k g_{t-k}`` and its second moment is at
    least ``(1 - b2) b2^k g_{t-k}^2`` for every ``k``, so the per-coordinate update
    ``|m| / sqrt(v)`` is bounded by ``(1 - b1) / sqrt(1 - b2) / (1 - b1 / sqrt(b2))``
    only when ``b1 < sqrt(b2)`` (the condition of Zhang et al., 2022, "Adam Can Converge
    Without Any Modification On Update Rules"). Below it, the first moment forgets a
    large gradient more slowly than ``sqrt(v)`` does, so a large gradient followed by a
    run of small ones gives an arbitrarily large step: loss spikes that a lower learning
    rate only makes rarer.
    """
    found = []
    for i, optimizer in enumerate(optimizers):
        for j, group in enumerate(getattr(optimizer, "param_groups", [])):
            betas = group.get("betas")
            if isinstance(betas, (tuple, list)) and len(betas) == 2:
                beta1, beta2 = (float(b) for b in betas)
                if beta2 < beta1**2:
                    found.append(f"optimizer {i}, group {j} (betas={beta1:g}, {beta2:g})")
    return found


def _stacked_f32(norms: list[Tensor], device: torch.device) -> Tensor:
    """The 0-dim ``norms`` as one float32 vector on ``device`` (converting only those that
    are not float32 there already)."""
    return torch.stack(
        [
            n if n.dtype == torch.float32 and n.device == device else n.to(device, torch.float32)
            for n in norms
        ]
    )


def _overrides_clipping(pl_module: pl.LightningModule) -> bool:
    return (
        type(pl_module).configure_gradient_clipping
        is not pl.LightningModule.configure_gradient_clipping
    )


class GradientMonitor(StabilityProbe):
    """Total and per-group gradient norms, clipping events and the relative update size.

    Measured in ``on_before_optimizer_step``, which Lightning calls after the backward
    pass (so after DDP's gradient all-reduce: every rank sees the same norm), after AMP's
    ``unscale_`` (norms of the true gradients) and before ``configure_gradient_clipping``
    (so the norm is the pre-clip norm). All values are computed as tensors and brought to
    the host with one synchronisation per step. Sharded parameters (``DTensor``, as under
    FSDP2) are measured over all their shards: each rank's local squares are summed over
    the ranks with one all-reduce per quantity (gradient norms, weight norms, update
    size), so every rank sees the norm a single process would.

    Readings (``stability/grad/...``, every optimizer step):

    - ``norm``: total L2 norm of all gradients before clipping, as
      ``torch.nn.utils.get_total_norm``.
    - ``nonfinite``: number of non-finite gradient entries (counted only when the norm is
      non-finite, since a finite norm implies finite entries).
    - ``weight_norm``: L2 norm of the trainable parameters before the step.
    - ``update_ratio``: ``||w_t - w_{t-1}|| / ||w_t||`` for the most recent completed step
      (see ``update_ratio`` below).
    - ``norm_var``, ``norm_ac1``: variance and lag-1 autocorrelation of the norm over the
      last ``window`` steps (critical-slowing-down indicators).
    - ``clip_event`` (0/1), ``clip_rate`` (fraction of the last ``window`` steps that
      clipped) and ``clip_threshold``, when clipping is configured. "Engaged" means: for
      ``gradient_clip_algorithm="norm"`` the pre-clip norm exceeded ``gradient_clip_val``;
      for ``"value"`` some ``|g|`` exceeded it. When the module overrides
      ``configure_gradient_clipping`` (or a callback declares ``clips_gradients = True``),
      the rule is unknown, so the norm of the gradients the optimizer actually receives is
      measured in ``on_train_batch_end`` (before the next ``zero_grad``) and the step counts
      as clipped when it is below the pre-clip norm; this costs one more norm pass and one
      more synchronisation per step, only in that case.

    At fit start it warns (rank zero, once) about any param group whose ``betas`` have
    ``beta2 < beta1**2``, where Adam's step has no bound (:func:`unbounded_adam_groups`).

    Manual optimization: measured at every ``optimizer.step()`` the training step makes.
    With several optimizers (a GAN), the readings are those of the first optimizer's
    parameters at its step, so that they form one series. Clipping readings need
    Lightning's own clipping, which manual optimization does not use, so they are left out.

    Readings are updated every step; they are passed to ``pl_module.log`` only on the
    steps where Lightning writes to the loggers
    (:func:`~lightning_stability.probes.base.logs_this_step`).

    Every ``log_every_n_steps`` steps also, per parameter group (parameter names cut to
    their first ``group_depth`` components, e.g. ``encoder``, ``head``):
    ``stability/grad/group/<name>`` (gradient norm) and
    ``stability/grad/group_update/<name>`` (update ratio).

    Args:
        window: steps in the rolling windows for ``clip_rate``, ``norm_var``, ``norm_ac1``.
            Default 100.
        log_every_n_steps: period of the per-group readings; ``None`` (default) takes them
            on the steps where the Trainer writes to its loggers (its ``log_every_n_steps``).
            An explicit period should be a multiple of the Trainer's to reach the loggers.
        group_depth: number of leading name components that form a group; 1 groups by
            top-level module, 0 turns per-group readings off. Default 1.
        update_ratio: how ``||w_t - w_{t-1}||`` is obtained. ``"sample"`` (default) keeps a
            fixed random subset of ``update_sample`` coordinates (chosen once, spread over
            the tensors in proportion to their size, from a private generator seeded with
            ``seed``, so the global RNG is never touched) and scales each tensor's sampled
            squared change by ``numel / samples``: an unbiased estimate of the squared norm
            at a memory cost of ``update_sample`` numbers. ``"full"`` keeps an exact copy of
            every trainable parameter (memory: one extra copy of the weights; one copy pass
            per step). ``"off"`` skips it. When the model has at most ``update_sample``
            coordinates, ``"sample"`` is exact. Since the change of step ``t`` is measured
            at the start of step ``t + 1``, the last step of a run is not reported, and any
            change to the weights between steps is counted as part of the update.
        update_sample: coordinates kept by ``update_ratio="sample"``. Default 65536.
        seed: seed of the private generator choosing the sampled coordinates. Default 0.
    """

    rolling = ("norm_window", "clip_window")

    def __init__(
        self,
        window: int = 100,
        log_every_n_steps: int | None = None,
        group_depth: int = 1,
        update_ratio: str = "sample",
        update_sample: int = 65536,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.window = _positive_int(window, "window")
        if log_every_n_steps is not None:
            _positive_int(log_every_n_steps, "log_every_n_steps")
        self.log_every_n_steps = log_every_n_steps
        self.group_depth = _positive_int(group_depth, "group_depth", allow_zero=True)
        check_choice(update_ratio, "update_ratio", _UPDATE_MODES)
        self.update_ratio = update_ratio
        self.update_sample = _positive_int(update_sample, "update_sample")
        self.seed = int(seed)

        self.norm_window = RollingWindow(window)
        self.clip_window = RollingWindow(window)

        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._sharded = False
        self._group_of: list[int] = []
        self._groups: list[str] = []
        self._sample_idx: list[Tensor | None] = []
        self._sample_scale = torch.ones(0)
        self._snapshot: list[Tensor] | None = None
        self._measure_post_clip = False
        self._observed_step = -1
        self._with_grad: tuple[list[int], Tensor | None] = ([], None)  # its tensor, reused
        self._latest: dict[str, Tensor] = {}
        self._pending_post: Tensor | None = None

    # ------------------------------------------------------------------ setup

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            window=self.window,
            log_every_n_steps=self.log_every_n_steps,
            group_depth=self.group_depth,
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        if len(trainer.optimizers) > 1:
            # Another optimizer's stale gradients are not this step's; alternating between
            # optimizers would interleave two series in the rolling statistics.
            first = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            named = [(n, p) for n, p in named if id(p) in first]
            rank_zero_info(
                f"GradientMonitor: {len(trainer.optimizers)} optimizers; the gradient readings "
                "cover the first optimizer's parameters, measured at its step."
            )
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._sharded = any_sharded(self._params)
        if trainer.world_size > 1 and flat_sharded(self._params):
            rank_zero_warn(
                "GradientMonitor: the parameters are FSDP1 flattened shards (FSDPStrategy), "
                "which are not supported: the gradient readings are of each rank's own "
                "shard, not of the model. Shard with FSDP2's fully_shard (e.g. through "
                "ModelParallelStrategy) for norms over all shards."
            )
        self._groups, self._group_of = [], []
        index: dict[str, int] = {}
        for name in self._names:
            group = ".".join(name.split(".")[: self.group_depth]) if self.group_depth else ""
            self._group_of.append(index.setdefault(group, len(index)))
        self._groups = list(index)
        self._build_sample()
        self._snapshot = None
        self._observed_step = -1
        self._measure_post_clip = pl_module.automatic_optimization and (
            _overrides_clipping(pl_module)
            or any(getattr(cb, "clips_gradients", False) for cb in trainer.callbacks)
        )
        unbounded = unbounded_adam_groups(trainer.optimizers)
        if unbounded:
            rank_zero_warn(
                "GradientMonitor: beta2 < beta1**2 in " + "; ".join(unbounded) + ". Adam's "
                "update m/sqrt(v) then has no bound, so a lower learning rate makes loss "
                "spikes rarer but does not rule them out; set beta2 above beta1**2 "
                "(PyTorch's default, 0.999, is)."
            )

    def _build_sample(self) -> None:
        self._sample_idx = []
        total = sum(local_shard(p).numel() for p in self._params)
        self._sample_scale = torch.ones(len(self._params))
        if self.update_ratio != "sample" or total <= self.update_sample:
            self._sample_idx = [None] * len(self._params)
            return
        gen = torch.Generator().manual_seed(self.seed)
        for p in self._params:
            n = local_shard(p).numel()
            k = min(n, max(1, round(self.update_sample * n / total)))
            idx = torch.randperm(n, generator=gen)[:k].sort().values
            self._sample_idx.append(None if k == n else idx.to(p.device))
        # Each tensor's sampled squared change times numel/samples: unbiased for its total.
        self._sample_scale = torch.tensor(
            [
                1.0 if i is None else local_shard(p).numel() / i.numel()
                for p, i in zip(self._params, self._sample_idx)
            ]
        )

    # --------------------------------------------------------------- measuring

    def _log_groups(self, trainer: pl.Trainer) -> bool:
        if not self.group_depth:
            return False
        if self.log_every_n_steps is None:
            return logs_this_step(trainer)
        return trainer.global_step % self.log_every_n_steps == 0

    def _norms(self, tensors: list[Tensor], device: torch.device) -> Tensor:
        """Per-tensor L2 norms (float32 vector on ``device``); over all shards of sharded
        parameters and gradients (FSDP), whose local parts alone are not the norm."""
        if self._sharded:
            return global_sq_norms(tensors, device).sqrt()
        return _stacked_f32(torch._foreach_norm(tensors, 2.0), device)

    def _sum_over_shards(self, per_param: Tensor) -> Tensor:
        """Per-parameter values computed on local shards, summed over the shards."""
        return sum_over_shards(self._params, per_param)

    def _take_snapshot(self) -> list[Tensor]:
        out = []
        for p, idx in zip(self._params, self._sample_idx):
            flat = local_shard(p).detach().reshape(-1)
            out.append(flat.clone() if idx is None else flat.index_select(0, idx))
        return out

    @torch.no_grad()
    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Measure the current gradients once per optimizer step and return the tensors
        (``"norm"``: pre-clip total norm, 0-dim float32). Idempotent within a step, so a
        clipping action can call it before it modifies the gradients, whatever the order
        of the callbacks."""
        if self._observed_step == trainer.global_step and self._latest:
            return self._latest
        self._observed_step = trainer.global_step
        with_grad = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not with_grad:
            self._latest = {}
            return self._latest
        grads = [self._params[i].grad for i in with_grad]
        device = grads[0].device
        per = self._norms(grads, device)
        out: dict[str, Tensor] = {"norm": torch.linalg.vector_norm(per), "per": per}
        if self._with_grad[0] != with_grad:
            self._with_grad = (with_grad, torch.tensor(with_grad))
        out["with_grad"] = self._with_grad[1]
        # under no_grad the parameters themselves (no detached views needed)
        wper = self._norms(self._params, device)
        out["wper"] = wper
        out["weight_norm"] = torch.linalg.vector_norm(wper)
        if self._clip_algorithm(trainer) == "value":
            out["maxabs"] = (
                global_max(grads, device)
                if self._sharded
                else _stacked_f32(torch._foreach_norm(grads, math.inf), device).max()
            )
        if self.update_ratio != "off":
            if self._snapshot is not None:
                now = self._take_snapshot()
                diff = torch._foreach_sub(now, self._snapshot)
                dsq = _stacked_f32(torch._foreach_norm(diff, 2.0), device).square()
                out["dsq"] = dsq * self._sample_scale.to(device)
                if self._sharded:
                    out["dsq"] = self._sum_over_shards(out["dsq"])
                self._snapshot = now
            else:
                self._snapshot = self._take_snapshot()
        self._latest = out
        return out

    @staticmethod
    def _clip_algorithm(trainer: pl.Trainer) -> str | None:
        module = trainer.lightning_module
        if module is not None and not module.automatic_optimization:
            return None  # Lightning clips only under automatic optimization
        val = trainer.gradient_clip_val
        if not val or val <= 0:
            return None
        algo = trainer.gradient_clip_algorithm
        return str(getattr(algo, "value", algo) or "norm").lower()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if len(trainer.optimizers) > 1 and optimizer is not trainer.optimizers[0]:
            return
        out = self.observe(trainer, pl_module)
        if not out:
            return
        scalars = [out["norm"], out["weight_norm"]]
        if "maxabs" in out:
            scalars.append(out["maxabs"])
        if "dsq" in out:
            scalars.append(torch.sqrt(out["dsq"].sum()))
        host = torch.stack(scalars).tolist()  # the one synchronisation of the step
        norm, weight_norm = host[0], host[1]
        maxabs = host[2] if "maxabs" in out else math.nan
        dw = host[-1] if "dsq" in out else math.nan

        values: dict[str, float] = {GRAD_NORM: norm, GRAD_WEIGHT_NORM: weight_norm}
        nonfinite = 0
        if not math.isfinite(norm):
            grads = [self._params[i].grad for i in out["with_grad"].tolist()]
            if self._sharded:
                nonfinite = global_count_nonfinite(grads)
            else:
                nonfinite = int(sum(int((~torch.isfinite(g)).sum()) for g in grads))
        elif self.accumulating(trainer):
            self.norm_window.update(norm)
        values[GRAD_NONFINITE] = float(nonfinite)
        if "dsq" in out:
            values[GRAD_UPDATE_RATIO] = dw / weight_norm if weight_norm > 0 else math.nan
        values[GRAD_NORM_VAR] = self.norm_window.var()
        values[GRAD_NORM_AC1] = self.norm_window.ac1()

        algo = self._clip_algorithm(trainer)
        if algo is not None:
            values[GRAD_CLIP_THRESHOLD] = float(trainer.gradient_clip_val)
        if self._measure_post_clip:
            self._pending_post = out["norm"]
        elif algo is not None:
            engaged = (
                maxabs > trainer.gradient_clip_val
                if algo == "value"
                else norm > trainer.gradient_clip_val
            )
            self.clip_window.update(float(engaged))
            values[GRAD_CLIP_EVENT] = float(engaged)
            values[GRAD_CLIP_RATE] = self.clip_window.mean()

        if self._log_groups(trainer):
            values.update(self._group_values(out))
        self.publish(trainer, pl_module, values, log=logs_this_step(trainer))

    def _group_values(self, out: Mapping[str, Tensor]) -> dict[str, float]:
        per = out["per"]
        device = per.device
        gid_all = torch.tensor(self._group_of, device=device)
        gid = gid_all[out["with_grad"].to(device)]
        n = len(self._groups)
        gsq = torch.zeros(n, device=device).index_add_(0, gid, per.square())
        stacked = [gsq.sqrt()]
        if "dsq" in out:
            dsq = torch.zeros(n, device=device).index_add_(0, gid_all, out["dsq"])
            wsq = torch.zeros(n, device=device).index_add_(0, gid_all, out["wper"].square())
            stacked.append(dsq.sqrt() / wsq.sqrt())
        host = torch.stack(stacked).tolist()
        values = {grad_group_key(g): host[0][i] for i, g in enumerate(self._groups)}
        if "dsq" in out:
            values.update(
                {grad_group_update_key(g): host[1][i] for i, g in enumerate(self._groups)}
            )
        return values

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
        if self._pending_post is None:
            return
        pre, self._pending_post = self._pending_post, None
        grads = [p.grad for p in self._params if p.grad is not None]
        if self._sharded:
            post = torch.linalg.vector_norm(self._norms(grads, pre.device))
        else:
            post = torch.linalg.vector_norm(
                torch.stack(
                    [
                        n.to(device=pre.device, dtype=torch.float32)
                        for n in torch._foreach_norm(grads, 2.0)
                    ]
                )
            )
        pre_f, post_f = torch.stack([pre, post]).tolist()
        # A non-finite norm that became finite was clipped too.
        engaged = post_f < pre_f * (1.0 - 1e-6) if math.isfinite(pre_f) else math.isfinite(post_f)
        self.clip_window.update(float(engaged))
        self.publish(
            trainer,
            pl_module,
            {GRAD_CLIP_EVENT: float(engaged), GRAD_CLIP_RATE: self.clip_window.mean()},
            log=logs_this_step(trainer),
        )
