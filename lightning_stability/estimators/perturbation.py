"""Controlled perturbation auditing: fork a training state, roll it out for a short horizon
under a structured disturbance, and measure how the dynamics respond.

Following Zhang et al. 2026 ("Training instability in deep learning follows low-dimensional
dynamical principles", arXiv:2601.13160), stability is probed along four dimensions without
changing the learning algorithm of the live run:

* ``parametric``: the start weights are displaced by noise of relative scale ``epsilon``;
* ``optimization``: the learning rate is multiplied by ``m`` for the horizon; the margin is the
  largest ``m`` that does not diverge (found by bisection);
* ``data``: Gaussian noise on floating inputs and resampled entries of integer tensors (labels);
* ``learning_signal``: Gaussian noise added to every gradient.

Each perturbed rollout is compared with an unperturbed rollout from the same start over the same
batches: the growth of the loss gap and of the parameter distance over the horizon.

Divergence criterion: a rollout diverges when any loss it sees (the training loss before each of
the ``horizon`` updates, and the loss after the last one) is non-finite or exceeds
``divergence_factor`` times the loss of the *start* weights on the same batch.

On a quadratic ``1/2 (w - w*)^T A (w - w*)`` under plain SGD with step ``lr`` the rollout is
linear, and every multiplier ``m`` with ``m * lr * lambda_max <= 2`` keeps every eigen-component
from growing, so it never diverges. Above the edge the top component grows by
``|1 - m lr lambda_max|^(2t)`` in loss, so the criterion first fires at a multiplier above
``m* = 2 / (lr lambda_max)`` by a relative bias of about ``ln(divergence_factor / s) / (4 horizon)``
where ``s`` is the top direction's share of the start loss; the bisection adds at most its
bracket ratio on top. The margin is therefore an upper bound that tightens as the horizon
grows.

Everything here is pure PyTorch and works on a disposable copy of the model: the live module and
optimizer are only read.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_stability.vocabulary import DIMENSIONS as _VOCABULARY_DIMENSIONS

__all__ = [
    "DIMENSIONS",
    "AuditConfig",
    "AuditResult",
    "Fork",
    "PerturbationAuditor",
    "Rollout",
    "lr_margin",
    "perturb_batch",
    "perturb_parameters",
]

DIMENSIONS: tuple[str, ...] = tuple(_VOCABULARY_DIMENSIONS[i] for i in (2, 0, 3, 1))
"""The stability dimensions of :mod:`lightning_stability.vocabulary`, in the order an audit
rolls them out: ``("parametric", "optimization", "data", "learning_signal")``."""
_OLD_SPELLINGS = {"optimisation": "optimization", "signal": "learning_signal"}

ForkLossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(module, batch) -> scalar``: the training loss of ``batch`` on a module copy."""


def perturb_parameters(
    params: Sequence[Tensor], epsilon: float, generator: torch.Generator
) -> None:
    """Add Gaussian noise in place, scaled per tensor to ``epsilon * ||p||`` (relative scale, so
    that layers of different magnitude are disturbed alike). A zero tensor gets ``epsilon``
    in absolute units."""
    with torch.no_grad():
        for p in params:
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu")
            noise = noise.to(p.device)
            scale = p.norm().item() or 1.0
            p.add_(noise, alpha=epsilon * scale / (noise.norm().item() or 1.0))


def perturb_batch(
    batch: Any, input_noise: float, label_noise: float, generator: torch.Generator
) -> Any:
    """A disturbed copy of ``batch``.

    Floating tensors (inputs) get Gaussian noise of standard deviation ``input_noise`` times
    the tensor's own standard deviation. In integer tensors (labels, token ids) a fraction
    ``label_noise`` of the entries is replaced by entries drawn at random positions of the same
    tensor, which keeps the label marginal without knowing the number of classes. Booleans and
    non-tensors are left alone. Tensors are found in any nesting of sequences, mappings, named
    tuples and dataclasses (as Lightning moves a batch to its device), in that order.
    """

    def disturb(t: Tensor) -> Tensor:
        if t.is_floating_point() and input_noise > 0:
            noise = torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
            std = t.float().std().item() if t.numel() > 1 else 1.0
            return t + noise * (input_noise * (std if math.isfinite(std) and std > 0 else 1.0))
        if not t.is_floating_point() and t.dtype != torch.bool and label_noise > 0 and t.numel():
            flat = t.reshape(-1).clone()
            mask = (torch.rand(flat.shape, generator=generator) < label_noise).to(t.device)
            source = torch.randint(flat.numel(), flat.shape, generator=generator).to(t.device)
            flat[mask] = flat[source][mask]
            return flat.view_as(t)
        return t

    return apply_to_collection(batch, Tensor, disturb, allow_frozen=True)


@dataclass
class Rollout:
    """One rollout of ``horizon`` updates.

    Attributes:
        losses: training loss before each update (``horizon`` values), then the clean loss of the
            next batch after the last update.
        final: flat float64 copy of the parameters after the horizon (CPU).
        start: flat float64 copy of the parameters the rollout started from (after any
            parametric disturbance).
        diverged: the divergence criterion fired (see module docstring).
    """

    losses: list[float]
    final: Tensor
    start: Tensor
    diverged: bool


@dataclass(frozen=True)
class AuditConfig:
    """What an audit perturbs and how hard.

    Attributes:
        horizon: updates per rollout.
        dimensions: subset of :data:`DIMENSIONS`.
        epsilon: relative scale of the parametric noise.
        input_noise: relative std of the input noise (``data``).
        label_noise: fraction of resampled integer entries (``data``).
        signal_noise: norm of the gradient noise relative to the gradient norm
            (``learning_signal``).
        lr_multipliers: ascending grid bracketing the learning-rate margin.
        bisection_steps: geometric bisections inside the bracket (ratio ``r`` shrinks to
            ``r ** (1 / 2**steps)``).
        divergence_factor: loss ratio to the start loss that counts as divergence (> 1).
        max_grad_norm: clip gradients to this total norm inside rollouts (mirrors the live
            run's clipping); ``None`` for no clipping.
    """

    horizon: int = 20
    dimensions: tuple[str, ...] = DIMENSIONS
    epsilon: float = 1e-3
    input_noise: float = 0.1
    label_noise: float = 0.1
    signal_noise: float = 0.5
    lr_multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    bisection_steps: int = 4
    divergence_factor: float = 2.0
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {self.horizon}")
        old = [d for d in self.dimensions if d in _OLD_SPELLINGS]
        if old:
            warnings.warn(
                f"AuditConfig(dimensions=...): the spellings {old} are deprecated; use "
                f"{[_OLD_SPELLINGS[d] for d in old]} (lightning_stability.vocabulary.DIMENSIONS)",
                DeprecationWarning,
                stacklevel=3,
            )
        dims = tuple(_OLD_SPELLINGS.get(d, d) for d in self.dimensions)
        object.__setattr__(self, "dimensions", dims)
        object.__setattr__(self, "lr_multipliers", tuple(float(m) for m in self.lr_multipliers))
        unknown = [d for d in self.dimensions if d not in DIMENSIONS]
        if unknown or not self.dimensions:
            raise ValueError(
                f"dimensions must be a non-empty subset of {DIMENSIONS}, got {self.dimensions}"
            )
        for name in ("epsilon", "input_noise", "label_noise", "signal_noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.label_noise <= 1:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")
        grid = list(self.lr_multipliers)
        if not grid or any(not m > 0 for m in grid) or grid != sorted(set(grid)):
            raise ValueError(
                "lr_multipliers must be a non-empty, strictly ascending sequence of positive "
                f"numbers, got {self.lr_multipliers}"
            )
        if self.bisection_steps < 0:
            raise ValueError(f"bisection_steps must be >= 0, got {self.bisection_steps}")
        if not self.divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


@dataclass
class AuditResult:
    """Outcome of one audit: flat readings (keys relative to ``audit/``) and the rollouts count."""

    values: dict[str, float] = field(default_factory=dict)
    rollouts: int = 0


class Fork:
    """A disposable copy of a module and its optimizer, resettable to the live state.

    The module is deep-copied once; the optimizer is deep-copied with its parameters mapped to
    the copy's, so that it keeps its class, hyper-parameters and state (momentum, Adam moments)
    without sharing a single tensor with the live one. :meth:`reset` puts the copy back to the
    live weights, buffers and optimizer state (the live objects are only read), so one fork
    serves every rollout of an audit.

    Args:
        module: the live model.
        optimizer: the live optimizer over (some of) ``module``'s parameters.
        dtype: float32/float64 to run rollouts in; half-precision copies are upcast to float32
            when ``None`` so that rollouts never run in 16-bit.
    """

    def __init__(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype | None = None
    ) -> None:
        self.live_module = module
        self.live_optimizer = optimizer
        self.module = copy.deepcopy(module)
        live_params = list(module.parameters())
        copy_params = list(self.module.parameters())
        self._pairs = list(zip(live_params, copy_params))
        self._buffer_pairs = list(zip(module.buffers(), self.module.buffers()))
        memo: dict[int, Any] = {id(a): b for a, b in self._pairs}
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not optimized <= set(memo):
            raise ValueError("optimizer: optimizes tensors that are not parameters of the module")
        self.optimizer = copy.deepcopy(optimizer, memo)
        self.params = [memo[id(p)] for g in optimizer.param_groups for p in g["params"]]
        if dtype is None and any(p.dtype in (torch.float16, torch.bfloat16) for p in copy_params):
            dtype = torch.float32
        self.dtype = dtype
        if dtype is not None:
            self.module.to(dtype)
        for p in copy_params:
            p.grad = None

    def reset(self, lr_multiplier: float = 1.0) -> None:
        """Copy the live weights, buffers and optimizer state into the fork and scale every
        group's learning rate by ``lr_multiplier``."""
        with torch.no_grad():
            for live, own in self._pairs:
                own.copy_(live)
                own.grad = None
            for live, own in self._buffer_pairs:
                own.copy_(live)
        # load_state_dict keeps tensors that need no cast as they are: deep-copy first so the
        # fork never aliases (and updates in place) the live moments.
        self.optimizer.load_state_dict(copy.deepcopy(self.live_optimizer.state_dict()))
        if self.dtype is not None:
            for state in self.optimizer.state.values():
                for k, v in state.items():
                    if isinstance(v, Tensor) and v.is_floating_point() and k != "step":
                        state[k] = v.to(self.dtype)
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * lr_multiplier
        self.module.train(self.live_module.training)

    def cast_batch(self, batch: Any) -> Any:
        """``batch`` with its floating tensors in the fork's dtype when the fork was upcast
        (16-bit inputs would not multiply float32 weights)."""
        if self.dtype is None:
            return batch
        dtype = self.dtype
        return apply_to_collection(
            batch, Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, allow_frozen=True
        )

    def flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in self.params])


@contextlib.contextmanager
def _no_autocast(module: nn.Module) -> Iterator[None]:
    device_types = {p.device.type for p in module.parameters()} or {"cpu"}
    with contextlib.ExitStack() as stack:
        for device_type in device_types:
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


class PerturbationAuditor:
    """Runs the rollouts of one audit on a :class:`Fork`.

    Args:
        fork: the disposable copy (reset before every rollout).
        loss_fn: ``loss_fn(module, batch)`` returning the scalar training loss on the copy.
        batches: cached probe batches, used in turn (``batch[t % len(batches)]`` at update t).
        config: what to perturb and how hard.
        generator: private RNG for every random draw (the global RNG is never used by the
            perturbations; dropout inside ``loss_fn`` still draws from the global RNG, so callers
            wrap the audit in ``frozen_rng``).
    """

    def __init__(
        self,
        fork: Fork,
        loss_fn: ForkLossFn,
        batches: Sequence[Any],
        config: AuditConfig,
        generator: torch.Generator,
    ) -> None:
        if not batches:
            raise ValueError("batches: at least one probe batch is needed")
        self.fork = fork
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.config = config
        self.generator = generator
        self.num_rollouts = 0
        self._start_losses: list[float] | None = None
        self._seed = int(torch.randint(2**62, (1,), generator=generator).item())

    def _loss(self, batch: Any) -> Tensor:
        with _no_autocast(self.fork.module):
            loss = self.loss_fn(self.fork.module, self.fork.cast_batch(batch))
        return loss.reshape(()).float() if loss.dtype in (torch.float16, torch.bfloat16) else loss

    def start_losses(self) -> list[float]:
        """Loss of the live weights on each cached batch (the divergence reference)."""
        if self._start_losses is None:
            self.fork.reset()
            with torch.no_grad():
                self._start_losses = [float(self._loss(b)) for b in self.batches]
        return self._start_losses

    def rollout(
        self,
        lr_multiplier: float = 1.0,
        epsilon: float = 0.0,
        input_noise: float = 0.0,
        label_noise: float = 0.0,
        signal_noise: float = 0.0,
        seed_offset: int = 0,
    ) -> Rollout:
        """Reset the fork, disturb it as asked, and take ``horizon`` optimizer steps.

        Every disturbance draws from a generator seeded from the audit's seed and
        ``seed_offset``, so two rollouts with the same offset see the same noise.
        """
        cfg = self.config
        reference = self.start_losses()
        g = torch.Generator().manual_seed(self._seed + seed_offset)
        fork = self.fork
        fork.reset(lr_multiplier)
        if epsilon > 0:
            perturb_parameters(fork.params, epsilon, g)
        start = fork.flat_params()
        limit = [cfg.divergence_factor * abs(r) for r in reference]
        losses: list[float] = []
        diverged = False
        k = len(self.batches)
        for t in range(cfg.horizon):
            batch = self.batches[t % k]
            if input_noise > 0 or label_noise > 0:
                batch = perturb_batch(batch, input_noise, label_noise, g)
            loss = self._loss(batch)
            value = float(loss.detach())
            losses.append(value)
            if not math.isfinite(value) or value > limit[t % k]:
                diverged = True
                break
            trainable = [p for p in fork.params if p.requires_grad]
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
            if signal_noise > 0:
                norm = torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads if gr is not None))
                noise = [
                    torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in trainable
                ]
                noise_norm = torch.sqrt(sum((n.double() ** 2).sum() for n in noise))
                scale = float(signal_noise * norm / noise_norm) if noise_norm > 0 else 0.0
                grads = tuple(
                    (gr if gr is not None else torch.zeros_like(p)) + n * scale
                    for gr, n, p in zip(grads, noise, trainable)
                )
            for p, gr in zip(trainable, grads):
                p.grad = gr
            if cfg.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            fork.optimizer.step()
            fork.optimizer.zero_grad(set_to_none=True)
        if not diverged:
            with torch.no_grad():
                value = float(self._loss(self.batches[cfg.horizon % k]))
            losses.append(value)
            diverged = not math.isfinite(value) or value > limit[cfg.horizon % k]
        self.num_rollouts += 1
        final = fork.flat_params()
        return Rollout(losses=losses, final=final, start=start, diverged=diverged)

    def lr_margin(self) -> tuple[float, float]:
        """The largest learning-rate multiplier that does not diverge within the horizon, and
        the smallest one seen to diverge (``inf`` if none on the grid did).

        Binary search over ``lr_multipliers`` (assuming stability is monotone in the
        multiplier), then ``bisection_steps`` geometric bisections of the bracket. Returns
        ``(0.0, smallest)`` when even the smallest multiplier diverges.
        """
        return lr_margin(
            lambda m: self.rollout(lr_multiplier=m).diverged,
            self.config.lr_multipliers,
            self.config.bisection_steps,
        )

    def run(self) -> AuditResult:
        """Every configured dimension against one unperturbed reference rollout.

        Readings (keys relative to ``stability/audit/``):

        * ``reference/loss_ratio``: loss after the horizon / loss of the start weights on the
          same batch, unperturbed (< 1: the run is still descending);
        * ``<dim>/loss_gap``: (perturbed - reference) loss after the horizon, relative to the
          reference loss (``inf`` if the perturbed rollout diverged);
        * ``<dim>/param_distance``: ||w_pert - w_ref|| after the horizon relative to ||w_ref||;
        * ``<dim>/diverged``: 1.0 if the perturbed rollout diverged;
        * ``parametric/param_growth``: distance after the horizon / distance at the start (> 1:
          perturbations are amplified, a finite-horizon Lyapunov ratio);
        * ``parametric/loss_gap_growth``: |loss gap| after / |loss gap| at the start;
        * ``optimization/lr_margin``: see :meth:`lr_margin`; ``optimization/lr_diverge`` the
          smallest multiplier seen to diverge (``inf`` when none did).
        """
        cfg = self.config
        out: dict[str, float] = {}
        ref = self.rollout()
        ref_final_loss = ref.losses[-1]
        ref_norm = ref.final.norm().item() or 1.0
        k = len(self.batches)
        ref_start = self.start_losses()[cfg.horizon % k]
        out["reference/loss_ratio"] = ref_final_loss / ref_start if ref_start else math.nan
        out["reference/diverged"] = float(ref.diverged)
        offsets = {"parametric": 1, "data": 2, "learning_signal": 3}
        for dim in cfg.dimensions:
            if dim == "optimization":
                low, high = self.lr_margin()
                out["optimization/lr_margin"] = low
                out["optimization/lr_diverge"] = high
                continue
            kwargs: dict[str, float] = {}
            if dim == "parametric":
                kwargs["epsilon"] = cfg.epsilon
            elif dim == "data":
                kwargs["input_noise"] = cfg.input_noise
                kwargs["label_noise"] = cfg.label_noise
            else:
                kwargs["signal_noise"] = cfg.signal_noise
            pert = self.rollout(seed_offset=offsets[dim], **kwargs)
            if pert.diverged or ref.diverged:
                gap = math.inf if pert.diverged and not ref.diverged else math.nan
            else:
                gap = (pert.losses[-1] - ref_final_loss) / (abs(ref_final_loss) or 1.0)
            out[f"{dim}/loss_gap"] = gap
            out[f"{dim}/param_distance"] = (pert.final - ref.final).norm().item() / ref_norm
            out[f"{dim}/diverged"] = float(pert.diverged)
            if dim == "parametric":
                d0 = (pert.start - ref.start).norm().item()
                dt = (pert.final - ref.final).norm().item()
                out["parametric/param_growth"] = dt / d0 if d0 > 0 else math.nan
                gap0 = abs(pert.losses[0] - ref.losses[0])
                gap_t = abs(pert.losses[-1] - ref_final_loss)
                growth = gap_t / gap0 if gap0 > 0 else math.nan
                out["parametric/loss_gap_growth"] = math.inf if pert.diverged else growth
        return AuditResult(values=out, rollouts=self.num_rollouts)


def lr_margin(
    diverges: Callable[[float], bool], grid: Sequence[float], bisection_steps: int
) -> tuple[float, float]:
    """Bracket and bisect the stability boundary of a monotone predicate.

    Args:
        diverges: ``diverges(m)`` is True when multiplier ``m`` diverges; assumed monotone
            (False below a threshold, True above).
        grid: ascending positive multipliers to bracket the threshold in.
        bisection_steps: geometric bisections of the bracket.

    Returns:
        ``(largest stable multiplier found, smallest diverging multiplier found)``;
        ``(0.0, grid[0])`` if ``grid[0]`` diverges, ``(grid[-1], inf)`` if nothing on the grid does.
    """
    lo_i, hi_i = -1, len(grid)  # invariant: grid[lo_i] stable (or none), grid[hi_i] diverges
    while hi_i - lo_i > 1:
        mid = (lo_i + hi_i) // 2
        if diverges(grid[mid]):
            hi_i = mid
        else:
            lo_i = mid
    if lo_i < 0:
        return 0.0, float(grid[0])
    if hi_i >= len(grid):
        return float(grid[-1]), math.inf
    lo, hi = float(grid[lo_i]), float(grid[hi_i])
    for _ in range(bisection_steps):
        mid = math.sqrt(lo * hi)
        if diverges(mid):
            hi = mid
        else:
            lo = mid
    return lo, hi
