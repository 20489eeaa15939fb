"""Context managers that keep a measurement from leaving traces on a model.

A curvature or representation probe runs extra forward/backward passes through the
model that is being trained. Everything those passes could touch is saved on entry and
put back on exit: the train/eval flag of every submodule, every buffer (BatchNorm
running statistics and counters), the ``.grad`` of every parameter and the RNG state
that dropout draws from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["compute_precision", "frozen_rng", "preserved_state", "resolve_compute_dtype"]


@contextlib.contextmanager
def frozen_rng(devices: list[torch.device] | None = None) -> Iterator[None]:
    """Restore the CPU and CUDA RNG states on exit, so that random draws inside
    (dropout, noise) do not shift the draws the training run makes afterwards."""
    cuda_devices = [d for d in (devices or []) if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda_devices, enabled=True):
        yield


@contextlib.contextmanager
def preserved_state(module: nn.Module, train: bool | None = None) -> Iterator[None]:
    """Run a block on ``module`` and leave no trace of it.

    Args:
        module: the model being measured.
        train: ``True`` to run the block in train mode (dropout active, BatchNorm using
            batch statistics), ``False`` for eval mode, ``None`` to keep the current
            mode of every submodule.

    On exit the modes of all submodules, the values of all buffers, the ``.grad``
    attribute of every parameter and the RNG state are exactly as on entry.
    """
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    params = list(module.parameters())
    grads = [p.grad for p in params]
    devices = list({p.device for p in params} | {b.device for b, _ in buffers})
    try:
        with frozen_rng(devices):
            if train is not None:
                module.train(train)
            yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in zip(params, grads):
            p.grad = g


def resolve_compute_dtype(params: list[torch.Tensor], dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a measurement runs in: ``dtype`` if given, else float64 for float64
    parameters and float32 for everything else (float16/bfloat16 are never used)."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        return dtype
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


@contextlib.contextmanager
def compute_precision(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run a block with autocast disabled and every floating parameter and buffer of
    ``module`` viewed in ``dtype``; the original tensors are put back on exit.

    Upcasting float16/bfloat16 is exact, so restoring the original storage leaves the
    weights bit-identical. Parameters already in ``dtype`` are not touched (no copy).
    """
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    tensors = list(module.parameters()) + list(module.buffers())
    try:
        for t in tensors:
            if t.is_floating_point() and t.dtype != dtype:
                original = t.data
                t.data = original.to(dtype)
                swapped.append((t, original))
        device_types = {t.device.type for t in tensors} or {"cpu"}
        with contextlib.ExitStack() as stack:
            for device_type in device_types:
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        for t, original in swapped:
            t.data = original
