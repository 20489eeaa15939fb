"""How :class:`~lightning_stability.probes.drift.RepresentationDriftMonitor` reads a
network's representations: the probe set run through the module (its ``training_step``, or
``pl_module(...)``) in pieces, with forward hooks on the watched layers that keep each
layer's per-sample features (reduced to at most ``max_features`` by a fixed signed feature
hashing) and the statistics of its raw activations."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_stability.estimators.isolation import (
    compute_precision,
    preserved_state,
    resolve_compute_dtype,
)
from lightning_stability.probes.base import NoProbeLoss, module_loss

__all__ = ["ActivationCapture", "LayerCapture", "seed_generators"]

# batch_idx values tried for a probe step that skips its batch by index
_BATCH_IDX_TRIES = 3


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


class LayerCapture:
    """What one check keeps of one layer on this rank: narrowed features per chunk, the
    sum of squares and count of the raw activations, and which raw units ever fired."""

    def __init__(self) -> None:
        self.features: list[Tensor] = []
        self.sums: Tensor = torch.zeros(2, dtype=torch.float64)
        self.positive: Tensor | None = None

    def add(self, raw: Tensor, narrowed: Tensor, relu_like: bool) -> None:
        self.features.append(narrowed)
        self.sums = self.sums.to(raw.device) + torch.stack(
            [raw.square().sum(), raw.new_tensor(float(raw.numel()))]
        )
        if relu_like:
            fired = (raw > 0).any(dim=0).double()
            self.positive = fired if self.positive is None else self.positive.maximum(fired)


class ActivationCapture:
    """Runs the probe set through the module and captures the watched layers.

    It keeps, from one check to the next, the feature hashing of each wide layer (the
    same projection at every check and on every rank), the ``batch_idx`` the probe step
    accepted, and which layers are ReLU-like.

    Args:
        max_features: features kept per layer; wider layers are hashed down to it.
        chunk_size: samples per probe step.
        seed: seeds the feature hashing and the RNG the probe step sees.
    """

    def __init__(self, max_features: int, chunk_size: int, seed: int) -> None:
        self.max_features = max_features
        self.chunk_size = chunk_size
        self.seed = seed
        self.hashing: dict[tuple[str, int, str], tuple[Tensor, Tensor]] = {}
        self.batch_idx = 0
        self.relu_like: set[str] = set()

    def narrow(self, name: str, x: Tensor) -> Tensor:
        """``x`` (``(n, d)`` float64) with at most ``max_features`` columns: wider layers
        are summed into ``max_features`` buckets with fixed random signs."""
        d = int(x.shape[1])
        if d <= self.max_features:
            return x
        key = (name, d, str(x.device))
        if key not in self.hashing:
            # Seeded by the layer name as well, so that two layers of one width do not
            # share collisions; the same on every rank and every check.
            generator = torch.Generator().manual_seed(
                self.seed * 1_000_003 + zlib.crc32(name.encode())
            )
            buckets = torch.randint(0, self.max_features, (d,), generator=generator)
            signs = torch.randint(0, 2, (d,), generator=generator).double() * 2 - 1
            self.hashing[key] = (buckets.to(x.device), signs.to(x.device))
        buckets, signs = self.hashing[key]
        return x.new_zeros(x.shape[0], self.max_features).index_add_(1, buckets, x * signs)

    def run_probe(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dtype: torch.dtype,
        chunk: Any,
        batch_idx: int,
        through_step: bool,
    ) -> bool:
        """Run one piece of the probe set; whether the step returned a loss (always
        ``True`` on the ``forward`` path)."""

        def cast(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        if not through_step:
            pl_module(
                apply_to_collection(move_data_to_device(chunk, pl_module.device), Tensor, cast)
            )
            return True
        # The batch-transfer hooks the step's batches went through (device moves,
        # normalisation in on_after_batch_transfer).
        batch = (
            trainer.strategy.batch_to_device(chunk)
            if trainer.lightning_module is pl_module
            else chunk
        )
        try:
            module_loss(pl_module, apply_to_collection(batch, Tensor, cast), batch_idx)
        except NoProbeLoss:
            return False
        return True

    def capture(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        layer_names: list[str],
        probe: Any,
        probe_n: int,
        through_step: bool,
    ) -> tuple[dict[str, LayerCapture], dict[str, str]]:
        """Run the probe set ``probe`` (``probe_n`` samples) through ``pl_module`` and keep
        this rank's share of every layer of ``layer_names``: its features (at most
        ``max_features`` wide) and the raw statistics the health readings need; with the
        layers that gave no usable output (name -> why)."""
        named = dict(pl_module.named_modules())
        layers: dict[str, LayerCapture] = {}
        unusable: dict[str, str] = {}
        piece: dict[str, Tensor] = {}
        samples = [0]

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                # A layer called more than once per step (weight sharing, two views)
                # contributes its first call, the same one at every check.
                if name in piece or name in unusable:
                    return
                tensor = _first_tensor(output)
                n = samples[0]
                if tensor is None or tensor.dim() == 0 or tensor.shape[0] % n:
                    shape = None if tensor is None else tuple(tensor.shape)
                    unusable[name] = f"its output {shape} has no leading dimension of {n} samples"
                    return
                piece[name] = tensor.detach().reshape(n, -1).double()

            return hook

        dtype = resolve_compute_dtype(list(pl_module.parameters()), None)
        handles = [named[n].register_forward_hook(hook_for(n)) for n in layer_names]
        try:
            with (
                preserved_state(pl_module, train=False),
                compute_precision(pl_module, dtype),
                torch.no_grad(),
            ):
                for chunk, n in _chunks(probe, probe_n, self.chunk_size):
                    samples[0] = n
                    self.run_chunk(trainer, pl_module, dtype, chunk, piece, through_step)
                    for name in layer_names:
                        if name in piece:
                            layers.setdefault(name, LayerCapture()).add(
                                piece[name],
                                self.narrow(name, piece[name]),
                                name in self.relu_like,
                            )
                        elif name in layers:
                            unusable[name] = "it ran for some probe chunks but not others"
        finally:
            for handle in handles:
                handle.remove()
        for name in layer_names:
            if name not in layers and name not in unusable:
                unusable[name] = (
                    "the probe's training_step never called it"
                    if through_step
                    else "the probe forward never called it"
                )
        return layers, unusable

    def run_chunk(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dtype: torch.dtype,
        chunk: Any,
        piece: dict[str, Tensor],
        through_step: bool,
    ) -> None:
        """Run ``chunk`` until the hooks filled ``piece``: a step that skips a batch by its
        ``batch_idx`` (returning no loss and calling no watched layer) is tried with the
        next index, and the index that worked is kept for every later check."""
        first = self.batch_idx
        for batch_idx in range(first, first + _BATCH_IDX_TRIES):
            piece.clear()
            # A step that draws noise or masks (augmentation, masked modelling) sees the
            # same draws at every check, so CKA compares like with like.
            seed_generators(pl_module, self.seed)
            returned = self.run_probe(trainer, pl_module, dtype, chunk, batch_idx, through_step)
            if returned or piece:
                self.batch_idx = batch_idx
                return


def seed_generators(module: nn.Module, seed: int) -> None:
    """Seed the CPU generator and those of the CUDA devices ``module`` lives on (the ones
    :func:`preserved_state` restores), and no other."""
    torch.random.default_generator.manual_seed(seed)
    for device in {p.device for p in module.parameters()}:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)


def _chunks(batch: Any, n: int, size: int) -> Iterator[tuple[Any, int]]:
    """Pieces of at most ``size`` samples of a batch of ``n``; the whole batch when it
    holds anything but tensors of ``n`` samples (which could not be split alike)."""
    splittable = all(
        isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n for t in _leaves(batch)
    )
    if n <= size or not splittable:
        yield batch, n
        return
    for start in range(0, n, size):
        stop = min(start + size, n)
        piece = slice(start, stop)
        yield apply_to_collection(batch, Tensor, lambda t, s=piece: t[s]), stop - start


def _leaves(collection: Any) -> Iterator[Any]:
    if isinstance(collection, Mapping):
        for value in collection.values():
            yield from _leaves(value)
    elif isinstance(collection, (list, tuple)):
        for item in collection:
            yield from _leaves(item)
    else:
        yield collection
