"""The probe batches a curvature probe measures on: which loaders may supply them, and the
form in which they go into a checkpoint."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

__all__ = ["check_probe_loader", "is_plain", "to_cpu"]


def check_probe_loader(loader: DataLoader) -> None:
    """``ValueError`` for a shuffled ``probe_dataloader`` without its own generator: it
    would draw from the global RNG and change the training run."""
    sampler = getattr(loader, "sampler", None)
    if (
        isinstance(sampler, RandomSampler)
        and sampler.generator is None
        and loader.generator is None
    ):
        raise ValueError(
            "probe_dataloader: a shuffled loader without its own generator draws from the "
            "global RNG and would change the training run; pass shuffle=False or "
            "generator=torch.Generator().manual_seed(...)"
        )


def is_plain(obj: Any) -> bool:
    """Whether ``obj`` is made only of tensors, numbers, strings, lists, tuples and dicts
    (what ``torch.load(weights_only=True)`` accepts)."""
    if obj is None or isinstance(obj, (Tensor, bool, int, float, str)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(is_plain(x) for x in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in obj.items())
    return False


def to_cpu(obj: Any) -> Any:
    """An :func:`is_plain` ``obj`` with its tensors detached on the CPU, in plain lists,
    tuples and dicts (a named tuple becomes a tuple), which ``torch.load(weights_only=True)``
    reads back; ``apply_to_collection`` would keep the named tuple's class."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, list):
        return [to_cpu(x) for x in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return obj
