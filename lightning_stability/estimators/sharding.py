"""Helpers for sharded parameters (``torch.distributed.tensor.DTensor``, as FSDP2's
``fully_shard`` and tensor parallelism make them), so that the probes and actions work
the same whether a parameter is a plain tensor or a shard of one.

Nothing here is specific to a Lightning strategy: a tensor is *sharded* when it is a
``DTensor`` with at least one ``Shard`` placement. Global reductions (norms, maxima,
counts) reduce each rank's local part with one ``all_reduce`` per group of tensors that
share a mesh and sharded mesh dimensions, over those dimensions only, so that a
replicated tensor is not counted once per rank.

Snapshots of sharded state need nothing from here: the state dicts of an FSDP2 module
and of its optimizer hold ``DTensor``s, whose clones keep each rank's own shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch has no DTensor
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "all_finite",
    "any_sharded",
    "flat_sharded",
    "full_tensor",
    "full_to_local",
    "global_count_nonfinite",
    "global_max",
    "global_sq_norms",
    "is_sharded",
    "local_shard",
    "local_view",
    "sum_over_shards",
]


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` split over at least one mesh dimension."""
    if DTensor is None or not isinstance(t, DTensor):
        return False
    return any(isinstance(p, Shard) for p in t.placements)


def any_sharded(tensors: Iterable[Any]) -> bool:
    """Whether any of ``tensors`` is sharded (see :func:`is_sharded`)."""
    return any(is_sharded(t) for t in tensors)


def flat_sharded(tensors: Iterable[Any]) -> bool:
    """Whether any of ``tensors`` is a parameter that FSDP1 (``FullyShardedDataParallel``,
    Lightning's ``FSDPStrategy``) has flattened into a ``FlatParameter``: a plain tensor
    holding this rank's flattened piece, whose layout across ranks the tensor does not
    record. Under more than one process such parameters are not supported by the
    helpers here (only ``DTensor`` shards are)."""
    return any(
        getattr(t, "_fsdp_flattened", False)
        and not (DTensor is not None and isinstance(t, DTensor))
        for t in tensors
    )


def local_shard(t: Tensor) -> Tensor:
    """This rank's part of ``t`` as a plain tensor sharing its storage (``t`` itself when
    it is not a ``DTensor``): in-place changes to it change ``t``."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def full_tensor(t: Tensor) -> Tensor:
    """The whole of ``t`` on every rank (an all-gather for a sharded ``DTensor``, ``t``
    itself otherwise)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.full_tensor()
    return t


def full_to_local(t: Tensor, like: Tensor) -> Tensor:
    """This rank's part of a full tensor ``t`` shaped like the parameter ``like``: the
    slice ``like``'s shard covers (no communication; ``t`` must be identical on every
    rank). For a plain ``like``, ``t`` itself."""
    if DTensor is None or not isinstance(like, DTensor):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        t.reshape(like.shape), like.device_mesh, like.placements, src_data_rank=None
    ).to_local()


def local_view(params: Sequence[Tensor], flat: Tensor) -> tuple[list[Tensor], Tensor]:
    """``params`` and a full flat vector over them (in parameter order) as this rank's
    local parts: the local shards and the matching slices of ``flat``, concatenated.
    Unchanged when no parameter is sharded."""
    if not any_sharded(params):
        return list(params), flat
    shards, pieces, offset = [], [], 0
    for p in params:
        n = p.numel()
        shards.append(local_shard(p))
        pieces.append(full_to_local(flat[offset : offset + n], p).reshape(-1))
        offset += n
    return shards, torch.cat(pieces)


def _reduction_key(t: Tensor) -> tuple[Any, tuple[int, ...]] | None:
    """The mesh and the mesh dimensions over which ``t`` is split (``None`` when it is
    whole on this rank)."""
    if not is_sharded(t):
        return None
    dims = tuple(i for i, p in enumerate(t.placements) if isinstance(p, Shard))
    return t.device_mesh, dims


def _all_reduce(values: Tensor, key: tuple[Any, tuple[int, ...]], op: Any) -> Tensor:
    mesh, dims = key
    for d in dims:
        group = mesh.get_group(d) if mesh.ndim > 1 else mesh.get_group()
        dist.all_reduce(values, op=op, group=group)
    return values


def _grouped(tensors: Sequence[Tensor]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        key = _reduction_key(t)
        groups.setdefault(None if key is None else (id(key[0]), key), []).append(i)
    return groups


def _reduce_over_shards(tensors: Sequence[Tensor], values: Tensor, op: Any) -> Tensor:
    """``values[i]``, computed from this rank's part of ``tensors[i]``, reduced with ``op``
    over the ranks that hold the other parts of a sharded ``tensors[i]`` (one
    ``all_reduce`` per mesh); entries of plain tensors are returned as they are."""
    for key, idx in _grouped(tensors).items():
        if key is None:
            continue
        index = torch.tensor(idx, device=values.device)
        part = _all_reduce(values.index_select(0, index), key[1], op)
        values = values.index_copy(0, index, part)
    return values


def sum_over_shards(tensors: Sequence[Tensor], values: Tensor) -> Tensor:
    """``values[i]``, computed from this rank's part of ``tensors[i]``, summed over the
    ranks that hold the other parts of a sharded ``tensors[i]`` (one ``all_reduce`` per
    mesh); entries of plain tensors are returned as they are."""
    return _reduce_over_shards(tensors, values, dist.ReduceOp.SUM)


def global_sq_norms(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """Squared L2 norm of every tensor in ``tensors`` over all its shards, as one float32
    vector on ``device``: the squares of the local parts' norms, summed over the ranks
    that hold the parts (one ``all_reduce`` per mesh). Plain tensors are taken as they
    are on this rank."""
    local = [local_shard(t) for t in tensors]
    norms = torch._foreach_norm(local, 2.0)
    sq = torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]).square()
    return sum_over_shards(tensors, sq)


def global_max(tensors: Sequence[Tensor], device: torch.device, p: float = float("inf")) -> Tensor:
    """The largest ``|x|`` over all entries of all shards of ``tensors`` (float32,
    0-dim, on ``device``)."""
    local = [local_shard(t) for t in tensors]
    per = torch.stack(
        [n.to(device=device, dtype=torch.float32) for n in torch._foreach_norm(local, p)]
    )
    return _reduce_over_shards(tensors, per, dist.ReduceOp.MAX).max()


def global_count_nonfinite(tensors: Sequence[Tensor]) -> int:
    """Number of non-finite entries over all shards of ``tensors``."""
    total = 0
    for key, idx in _grouped(tensors).items():
        count = torch.zeros((), dtype=torch.float64)
        for i in idx:
            count += (~torch.isfinite(local_shard(tensors[i]))).sum().cpu().double()
        if key is not None:
            device = local_shard(tensors[idx[0]]).device
            count = _all_reduce(count.to(device), key[1], dist.ReduceOp.SUM).cpu()
        total += int(count)
    return total


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, over all shards: the same answer
    on every rank (a collective when some tensor is sharded, so every rank must call
    it; also for FSDP1's flattened pieces, see :func:`flat_sharded`). For plain tensors,
    ``all(bool(torch.isfinite(t).all()) for t in tensors)``."""
    tensors = list(tensors)
    if any_sharded(tensors):
        return global_count_nonfinite(tensors) == 0
    if flat_sharded(tensors) and dist.is_available() and dist.is_initialized():
        # FSDP1 pieces: any rank's non-finite entry counts, whichever rank holds it
        count = sum(int((~torch.isfinite(t)).sum()) for t in tensors)
        device = tensors[0].device if tensors else torch.device("cpu")
        total = torch.tensor(float(count), device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total) == 0
    return all(bool(torch.isfinite(t).all()) for t in tensors)
