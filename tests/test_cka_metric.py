"""MinibatchCKA: what it equals, what it only estimates, and its DDP sync."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_stability.estimators.cka import hsic, linear_cka
from lightning_stability.estimators.cka_metric import MinibatchCKA


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _population(n, dx=12, dy=20, seed=0):
    # i.i.d. samples of a fixed, partly nonlinear relation between two representations.
    x = _randn(n, dx, seed=seed)
    w = _randn(dx, dy, seed=100)  # the same relation for every seed
    y = torch.tanh(0.5 * x @ w) + 0.7 * _randn(n, dy, seed=seed + 1)
    return x, y


def _batches(k, n, seed=0, **kw):
    return [_population(n, seed=seed + 10 * i, **kw) for i in range(k)]


def test_one_batch_is_the_debiased_cka():
    x, y = _population(50)
    metric = MinibatchCKA()
    metric.update(x, y)
    assert metric.compute().item() == pytest.approx(
        linear_cka(x, y, debiased=True).item(), abs=1e-12
    )


def test_sums_are_the_per_batch_unbiased_hsic():
    batches = _batches(4, 32)
    metric = MinibatchCKA()
    for x, y in batches:
        metric.update(x.float(), y.float())
    assert int(metric.num_batches) == 4
    assert metric.hsic_xy.dtype == torch.float64
    want_xy = sum(hsic(x, y, debiased=True) for x, y in batches)
    want_xx = sum(hsic(x, x, debiased=True) for x, _ in batches)
    want_yy = sum(hsic(y, y, debiased=True) for _, y in batches)
    want = want_xy / (want_xx * want_yy).sqrt()
    assert metric.compute().item() == pytest.approx(want.item(), rel=1e-5)


def test_four_batches_differ_from_concatenation_but_estimate_the_same_cka():
    batches = _batches(4, 256)
    metric = MinibatchCKA()
    for x, y in batches:
        metric.update(x, y)
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    full = linear_cka(x_all, y_all, debiased=True).item()
    got = metric.compute().item()
    assert got != pytest.approx(full, abs=1e-9)  # not an identity: cross-batch pairs differ
    assert got == pytest.approx(full, abs=0.03)  # same population value up to noise
    assert 0.2 < full < 0.9


def test_exact_where_the_per_batch_identity_holds():
    q, _ = torch.linalg.qr(_randn(30, 30, seed=7))
    metric = MinibatchCKA()
    for i in range(4):
        x = _randn(16, 30, seed=i) + i  # batches with different means
        metric.update(x, 2.5 * x @ q)
    assert metric.compute().item() == pytest.approx(1.0, abs=1e-10)


def test_wide_independent_features_average_to_zero():
    metric = MinibatchCKA()
    biased = MinibatchCKA(debiased=False)
    for i in range(4):
        x, y = _randn(64, 4096, seed=2 * i), _randn(64, 4096, seed=2 * i + 1)
        metric.update(x, y)
        biased.update(x, y)
    assert abs(metric.compute().item()) < 0.05
    assert biased.compute().item() > 0.9  # the per-batch bias does not average out


def test_reset_and_bad_arguments():
    metric = MinibatchCKA()
    x, y = _population(10)
    metric.update(x, y)
    metric.reset()
    assert int(metric.num_batches) == 0 and metric.hsic_xy.item() == 0.0
    with pytest.raises(ValueError, match="debiased"):
        MinibatchCKA(debiased="yes")
    with pytest.raises(ValueError, match="at least 4 samples"):
        metric.update(x[:3], y[:3])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = MinibatchCKA()
        for x, y in _batches(4, 24)[rank::world]:
            metric.update(x, y)
        torch.save(metric.compute(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_syncs_across_two_ranks_to_the_single_process_value(tmp_path):
    mp.spawn(_sync_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = MinibatchCKA()
    for x, y in _batches(4, 24):
        single.update(x, y)
    want = single.compute().item()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True).item()
        assert got == pytest.approx(want, abs=1e-12)
    shard = MinibatchCKA()
    for x, y in _batches(4, 24)[0::2]:
        shard.update(x, y)
    assert shard.compute().item() != pytest.approx(want, abs=1e-6)  # the sync mattered
