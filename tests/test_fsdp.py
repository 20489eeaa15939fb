"""Every callback of the default set under FSDP2 (``ModelParallelStrategy`` with
``fully_shard``) on two CPU gloo processes, against a single-process reference that sees
the same batches: gradient norms over shards, lambda_max from finite-difference products,
a rollback of sharded weights and optimizer state, and the same events on every rank.

Both runs go through ``tests/fsdp_run.py`` in subprocesses with a clean environment
(a Trainer with two processes inside the pytest process would re-run pytest's command
line for rank 1), which writes one JSON file per rank.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

_fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(_fsdp, "fully_shard"):
    pytest.skip("FSDP2 (fully_shard) needs torch >= 2.4", allow_module_level=True)

pytestmark = [pytest.mark.fsdp, pytest.mark.ddp]

SCRIPT = Path(__file__).with_name("fsdp_run.py")
STEPS = 32
NAN_AT = 25  # a damaged step: the loss is NaN, the early warning goes critical, rollback
CHECKS = (10, 20, 30)
_LAUNCH_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "PL_GLOBAL_SEED",
    "PL_TRAINER_GPUS",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, mode: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")]),
    )
    cmd = [sys.executable, str(SCRIPT), str(out), "--mode", mode, "--steps", str(STEPS)]
    cmd += ["--nan-at", str(NAN_AT), "--check-every", "10", "--rollback-every", "10"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    world = 2 if mode == "fsdp" else 1
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    return {"single": _run(base / "single", "single")[0], "fsdp": _run(base / "fsdp", "fsdp")}


def test_the_default_set_with_staged_actions_runs_to_the_end_sharded(runs):
    ref = runs["single"]
    for rank, r in enumerate(runs["fsdp"]):
        assert (r["rank"], r["world"], r["global_step"]) == (rank, 2, STEPS)
        assert r["sharded"] and not ref["sharded"]
        # every reading of the reference exists sharded too: no probe stepped aside
        assert set(r["readings"]) == set(ref["readings"])
        for step in CHECKS[:2]:
            assert r["published"][str(step)] == ref["published"][str(step)]
        wanted = {"lambda_max", "eos_ratio", "preconditioned", "directional", "critical"}
        assert wanted <= {k.rsplit("/", 1)[1] for k in r["published"][str(CHECKS[0])]}
        cka = [k for k in ref["readings"] if "/cka" in k]
        assert cka
        for key in cka:  # gathered activations: every rank agrees, and with one process
            assert r["readings"][key] == runs["fsdp"][0]["readings"][key]
            assert abs(r["readings"][key] - ref["readings"][key]) < 1e-6, key


def test_grad_norm_over_shards_equals_the_single_process_norm(runs):
    ref = runs["single"]["grad_norms"]
    assert len(ref) == STEPS
    for r in runs["fsdp"]:
        assert set(r["grad_norms"]) == set(ref)
        for step, want in ref.items():
            got = r["grad_norms"][step]
            if int(step) == NAN_AT:
                assert math.isnan(want) and math.isnan(got)
                continue
            assert abs(got - want) <= 1e-6 * want, (step, got, want)


def test_lambda_max_from_finite_differences_is_within_one_percent(runs):
    ref = runs["single"]["lambdas"]
    for r in runs["fsdp"]:
        for step in CHECKS:
            want, got = ref[str(step)], r["lambdas"][str(step)]
            assert math.isfinite(want) and want > 0
            assert abs(got - want) <= 0.01 * want, (step, got, want)


def test_a_curvature_subset_beside_the_full_monitor(runs):
    ref = runs["single"]["subset_lambdas"]
    for r in runs["fsdp"]:
        for step in CHECKS:
            want, got = ref[str(step)], r["subset_lambdas"][str(step)]
            assert 0 < want <= runs["single"]["lambdas"][str(step)] * (1 + 1e-6)
            assert abs(got - want) <= 0.01 * want, (step, got, want)


def test_curvature_checks_leave_the_sharded_gradients_as_they_were(runs):
    for r in [runs["single"], *runs["fsdp"]]:
        assert set(r["grads_kept"]) >= {str(s) for s in CHECKS}
        assert all(r["grads_kept"].values())


def test_a_forced_rollback_restores_sharded_weights_and_optimizer_state_exactly(runs):
    ref = runs["single"]["rollbacks"]
    assert [(x["step"], x["to_step"]) for x in ref] == [(NAN_AT + 1, 10)]
    for r in runs["fsdp"]:
        assert [(x["step"], x["to_step"]) for x in r["rollbacks"]] == [(NAN_AT + 1, 10)]
        assert r["rollbacks"][0]["weights_equal"]
        assert r["rollbacks"][0]["optimizer_equal"]


def test_finiteness_of_sharded_weights_is_decided_over_all_shards(runs):
    # a NaN in rank 0's shard only: both ranks must see it (rollback's snapshot rule)
    assert runs["single"]["all_finite"] == [True, False]
    for r in runs["fsdp"]:
        assert r["all_finite"] == [True, False]


def test_every_rank_logs_the_same_events(runs):
    r0, r1 = runs["fsdp"]
    assert r0["events"] and r0["events"] == r1["events"]
    sources = {e[0] for e in r0["events"]}
    assert {"EarlyWarning", "Rollback", "StagedTraining"} <= sources
    # the same decisions as the single-process run (step, level, source)
    assert [e[:4] for e in r0["events"]] == [e[:4] for e in runs["single"]["events"]]


def test_sharded_run_ends_where_the_single_process_run_ends(runs):
    ref = [w for p in runs["single"]["weights"] for w in p]
    for r in runs["fsdp"]:
        got = [w for p in r["weights"] for w in p]
        assert len(got) == len(ref)
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
