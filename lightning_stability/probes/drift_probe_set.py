"""The fixed probe set of
:class:`~lightning_stability.probes.drift.RepresentationDriftMonitor`: the loader it is
drawn from, the sample indices (drawn once with a private generator), this rank's share,
collated as the training loader collates, and the model input of a batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate

from lightning_stability.estimators.isolation import frozen_rng

__all__ = ["InputFn", "default_input_fn", "draw_indices", "local_batch", "source_loader"]


InputFn = Callable[[Any], Any]

_INPUT_KEYS = ("x", "input", "inputs")


def default_input_fn(batch: Any) -> Any:
    """The model input of a batch: the batch itself if a tensor, the first element of a
    tuple/list, or the ``"x"``/``"input"``/``"inputs"`` entry of a mapping."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
    raise ValueError(
        f"input_fn: cannot find the model input in a batch of type {type(batch).__name__}; "
        "pass input_fn=lambda batch: <what pl_module(...) takes>"
    )


def loader_of(loaders: Any) -> DataLoader | None:
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for item in loaders:
            found = loader_of(item)
            if found is not None:
                return found
    return None


def source_loader(trainer: pl.Trainer, source: str, through_step: bool) -> DataLoader:
    """The loader the probe set is drawn from: ``source`` ``"train"`` or ``"val"``
    (``"auto"``: the training set when the probe runs ``training_step``, else the
    validation set), the training loader where there is no validation loader."""
    if source == "auto":
        source = "train" if through_step else "val"
    loader = loader_of(trainer.val_dataloaders) if source == "val" else None
    loader = loader or loader_of(trainer.train_dataloader)
    if loader is None:
        raise ValueError("no DataLoader to draw the probe set from; pass probe_inputs")
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            "the dataset is iterable, so a fixed probe set cannot be drawn by index; pass "
            "probe_inputs (with input_fn's forward path)"
        )
    return loader


def draw_indices(size: int, probe_size: int, seed: int, world: int) -> list[int]:
    """``probe_size`` sample indices (at most ``size``, rounded down to a multiple of
    ``world``) drawn without replacement from a dataset of ``size`` with a generator
    seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    count = min(probe_size, size) // world * world
    perm = torch.randperm(size, generator=generator)
    return perm[:count].tolist()


def local_batch(loader: DataLoader, indices: list[int], rank: int, world: int) -> tuple[Any, int]:
    """This rank's share of the samples ``indices`` of ``loader``'s dataset, collated as
    the loader collates, and its number of samples."""
    dataset = loader.dataset
    collate = loader.collate_fn or default_collate
    local = indices[rank::world]
    # Datasets with random transforms draw from the global RNG.
    with frozen_rng():
        batch = collate([dataset[i] for i in local])
    return batch, len(local)
