"""Estimator accuracy and cost against exact Hessians of small reference models.

    python -m benchmarks.estimators --quick
    python -m benchmarks.estimators

Reports, per model: Hessian-vector products and wall time until the top-eigenvalue
estimate is within 1% of the exact value for (a) PyHessian's power iteration, (b) Lanczos
from a random start, (c) Lanczos warm-started from the previous top eigenvector after one
SGD step; trace RMS relative error at 30 products for Hutchinson vs Hutch++ (near a
minimum); and the time per Hessian-vector product of double backward with graph reuse vs
forward-over-reverse (``torch.func``). Writes ``benchmarks/estimators.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hessian_models import REFERENCE, exact_hessian

from lightning_stability.estimators import (
    HessianOperator,
    PyHessianBackend,
    forward_over_reverse_hvp,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_iterations,
    lanczos_top_k,
)

OUT = Path(__file__).with_name("estimators.json")
TARGET = 0.01


def _first_within(trace: list[tuple[int, float, float]], exact: float) -> dict:
    for products, value, seconds in trace:
        if abs(value / exact - 1) < TARGET:
            return {"products": products, "seconds": seconds}
    return {"products": None, "seconds": None}


def power_iteration(problem, exact: float, max_iter: int) -> dict:
    """PyHessian's power iteration, with every product's Rayleigh quotient recorded."""
    ph = importlib.import_module("pyhessian.hessian")
    original = ph.hessian_vector_product
    trajectory: list[tuple[int, float, float]] = []
    start = time.perf_counter()

    def recording(grads, params, v):
        hv = original(grads, params, v)
        rq = sum(float((a * b).sum()) for a, b in zip(hv, v))
        trajectory.append((len(trajectory) + 1, rq, time.perf_counter() - start))
        return hv

    ph.hessian_vector_product = recording
    try:
        PyHessianBackend(problem.loss, problem.params, problem.module).top_k(
            max_iter=max_iter, tol=0.0
        )
    finally:
        ph.hessian_vector_product = original
    return _first_within(trajectory, exact)


def lanczos(problem, exact: float, max_iter: int, warm_start=None) -> dict:
    with HessianOperator(problem.loss, problem.params) as op:
        start = time.perf_counter()
        trajectory = [
            (s.num_products, float(s.ritz_values[0]), time.perf_counter() - start)
            for s in lanczos_iterations(
                op.matvec,
                op.dim,
                max_iter=max_iter,
                warm_start=warm_start,
                generator=torch.Generator().manual_seed(0),
            )
        ]
    return _first_within(trajectory, exact)


def top_eigenvalue_rows(max_iter: int) -> list[dict]:
    rows = []
    for make in REFERENCE[:3]:
        problem = make()
        exact = float(torch.linalg.eigvalsh(exact_hessian(problem))[-1])
        row = {"model": problem.name, "dim": problem.dim, "lambda_max": exact}
        row["power_pyhessian"] = power_iteration(problem, exact, max_iter)
        row["lanczos_cold"] = lanczos(problem, exact, max_iter)
        with HessianOperator(problem.loss, problem.params) as op:
            previous = lanczos_top_k(op.matvec, op.dim).eigenvectors
        opt = torch.optim.SGD(problem.params, lr=0.1)
        problem.loss().backward()
        opt.step()
        problem.module.zero_grad(set_to_none=True)
        exact_after = float(torch.linalg.eigvalsh(exact_hessian(problem))[-1])
        row["lanczos_warm_after_sgd_step"] = lanczos(problem, exact_after, max_iter, previous)
        rows.append(row)
    return rows


def trace_rows(seeds: int, budget: int = 30) -> list[dict]:
    rows = []
    for make in REFERENCE[:3]:
        problem = make()
        opt = torch.optim.Adam(problem.params, lr=0.02)
        for _ in range(300):
            opt.zero_grad()
            problem.loss().backward()
            opt.step()
        problem.module.zero_grad(set_to_none=True)
        exact = float(exact_hessian(problem).trace())
        row = {"model": problem.name, "budget": budget, "trace": exact}
        with HessianOperator(problem.loss, problem.params) as op:
            for name, fn in (("hutchinson", hutchinson_trace), ("hutchpp", hutchpp_trace)):
                errs = [
                    fn(
                        op.matvec, op.dim, budget, generator=torch.Generator().manual_seed(s)
                    ).estimate
                    / exact
                    - 1
                    for s in range(seeds)
                ]
                row[f"{name}_rms_rel_error"] = math.sqrt(sum(e * e for e in errs) / seeds)
        rows.append(row)
    return rows


def hvp_timing(repeats: int) -> dict:
    """Seconds per product on an MLP (64 -> 256 -> 256 -> 10, batch 256)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
        torch.nn.Linear(256, 10),
    )  # fmt: skip
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach() for p in module.parameters()]

    def loss_of(*ps):
        out = functional_call(module, dict(zip(names, ps)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    vecs = [torch.randn_like(p) for p in params]
    flat = torch.cat([v.reshape(-1) for v in vecs])
    out = {}
    with HessianOperator(lambda: torch.nn.functional.cross_entropy(module(x), y),
                         list(module.parameters())) as op:  # fmt: skip
        op.matvec(flat)
        start = time.perf_counter()
        for _ in range(repeats):
            op.matvec(flat)
        out["double_backward_s"] = (time.perf_counter() - start) / repeats
    forward_over_reverse_hvp(loss_of, params, vecs)
    start = time.perf_counter()
    for _ in range(repeats):
        forward_over_reverse_hvp(loss_of, params, vecs)
    out["forward_over_reverse_s"] = (time.perf_counter() - start) / repeats
    out["dim"] = sum(p.numel() for p in params)
    return out


def fmt(cell: dict) -> str:
    if cell["products"] is None:
        return "not reached"
    return f"{cell['products']:>4} HVPs {1e3 * cell['seconds']:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds and repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, repeats = (5, 10) if args.quick else (50, 50)
    result = {
        "target_rel_error": TARGET,
        "top_eigenvalue": top_eigenvalue_rows(max_iter=300),
        "trace": trace_rows(seeds),
        "hvp": hvp_timing(repeats),
        "quick": args.quick,
    }
    print(
        f"{'model':<12} {'(a) power (PyHessian)':>24} {'(b) Lanczos cold':>24} {'(c) Lanczos warm':>24}"
    )
    for r in result["top_eigenvalue"]:
        print(
            f"{r['model']:<12} {fmt(r['power_pyhessian']):>24} {fmt(r['lanczos_cold']):>24}"
            f" {fmt(r['lanczos_warm_after_sgd_step']):>24}"
        )
    print(f"\n{'model':<12} {'trace RMS rel. error @30 HVPs':>30}")
    for r in result["trace"]:
        print(
            f"{r['model']:<12} Hutchinson {r['hutchinson_rms_rel_error']:.4f}"
            f"  Hutch++ {r['hutchpp_rms_rel_error']:.4f}"
        )
    h = result["hvp"]
    print(
        f"\nHVP (dim {h['dim']}): double backward {1e3 * h['double_backward_s']:.2f} ms,"
        f" forward-over-reverse {1e3 * h['forward_over_reverse_s']:.2f} ms"
    )
    OUT.write_text(json.dumps(result, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
