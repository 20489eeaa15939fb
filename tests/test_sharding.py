"""The sharding helpers on plain tensors (one process): they must leave them as they are,
so that unsharded runs take exactly the arithmetic they took before. Sharded tensors are
covered by ``test_fsdp.py`` on two processes."""

from __future__ import annotations

import torch

from lightning_stability.estimators.sharding import (
    all_finite,
    any_sharded,
    flat_sharded,
    full_tensor,
    global_sq_norms,
    local_shard,
    local_view,
    sum_over_shards,
)


def test_plain_tensors_are_their_own_shards():
    ts = [torch.randn(3, 4), torch.randn(5)]
    assert not any_sharded(ts)
    assert all(local_shard(t) is t and full_tensor(t) is t for t in ts)
    flat = torch.randn(17)
    params, view = local_view(ts, flat)
    assert params == ts and view is flat
    values = torch.tensor([1.0, 2.0])
    assert sum_over_shards(ts, values) is values
    want = torch.stack([t.norm() for t in ts]).square()
    assert torch.allclose(global_sq_norms(ts, torch.device("cpu")), want)


def test_all_finite_on_plain_tensors():
    a, b = torch.ones(3), torch.ones(2)
    assert all_finite([a, b])
    b[1] = float("inf")
    assert not all_finite([a, b])


def test_fsdp1_flattened_parameters_are_recognised():
    p = torch.nn.Parameter(torch.zeros(4))
    assert not flat_sharded([p])
    p._fsdp_flattened = True  # what FSDP1 sets on the parameters it flattens
    assert flat_sharded([torch.zeros(1), p])
