"""An in-memory copy of the training state that a rollback returns to.

Memory cost: one extra copy of the module's state (parameters and buffers) and of the
optimizer state: about 2x the parameter memory for SGD with momentum, 3x for Adam/AdamW
(weights + two moments), plus the scheduler and callback states (a few numbers). With
``offload=True`` the copy lives in host memory instead of on the accelerator.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor

__all__ = ["TrainingSnapshot"]


def _copy(obj: Any, offload: bool) -> Any:
    def clone(t: Tensor) -> Tensor:
        t = t.detach()
        return t.to("cpu", copy=True) if offload else t.clone()

    return copy.deepcopy(apply_to_collection(obj, Tensor, clone))


@dataclass
class TrainingSnapshot:
    """Weights, optimizer, scheduler, precision-plugin and callback states at ``step``.

    ``restore`` loads a fresh copy every time (an optimizer's ``load_state_dict`` keeps
    references to the tensors it is given, and training then updates them in place), so
    one snapshot can be restored any number of times.
    """

    step: int
    module: dict[str, Tensor]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    precision: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def take(
        cls,
        trainer: Any,
        pl_module: torch.nn.Module,
        callbacks: dict[str, Any] | None = None,
        offload: bool = False,
    ) -> TrainingSnapshot:
        """Copy the state of ``trainer``'s module, optimizers and schedulers, and the
        ``state_dict()`` of each callback in ``callbacks`` (keyed by a stable name)."""
        return cls(
            step=int(trainer.global_step),
            module=_copy(pl_module.state_dict(), offload),
            optimizers=[_copy(o.state_dict(), offload) for o in trainer.optimizers],
            schedulers=[
                _copy(c.scheduler.state_dict(), offload) for c in trainer.lr_scheduler_configs
            ],
            precision=_copy(trainer.precision_plugin.state_dict(), offload),
            callbacks={k: _copy(cb.state_dict(), False) for k, cb in (callbacks or {}).items()},
        )

    def restore(
        self, trainer: Any, pl_module: torch.nn.Module, callbacks: dict[str, Any] | None = None
    ) -> None:
        """Load the copied state back (bit-identical) into the same objects."""
        pl_module.load_state_dict(self.module)  # copies into the existing tensors
        for opt, state in zip(trainer.optimizers, self.optimizers):
            opt.load_state_dict(_copy(state, False))
        for config, state in zip(trainer.lr_scheduler_configs, self.schedulers):
            config.scheduler.load_state_dict(_copy(state, False))
        if self.precision:
            trainer.precision_plugin.load_state_dict(_copy(self.precision, False))
        for key, cb in (callbacks or {}).items():
            if key not in self.callbacks:
                # a snapshot from a checkpoint that keyed callbacks by class name
                key = getattr(cb, "_legacy_state_key", key)
            if key in self.callbacks:
                # The log of what the actions did is history, not state to roll back.
                history = list(getattr(cb, "events", []))
                cb.load_state_dict(_copy(self.callbacks[key], False))
                if hasattr(cb, "events"):
                    cb.events = history

    def nbytes(self) -> int:
        """Bytes held by the tensors of this snapshot."""
        total = 0

        def add(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        apply_to_collection([self.module, self.optimizers, self.schedulers], Tensor, add)
        return total
