"""Finite-difference Hessian-vector products against double backward on the reference
model: the relative error of a product and of the top eigenvalue, and the time per
product, in float32 and float64.

The finite-difference operator is what curvature uses on sharded parameters (FSDP),
where double backward does not reach the shards; this measures what that costs in
accuracy and time on one process, where both operators are available.

    python -m benchmarks.finite_difference --quick
    python -m benchmarks.finite_difference

Writes ``benchmarks/finite_difference.json`` next to this file and its section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import results_md
from benchmarks.reference import reference_dataloader, reference_module
from lightning_stability.estimators.finite_difference_hvp import FiniteDifferenceHessian
from lightning_stability.estimators.hvp import HessianOperator
from lightning_stability.estimators.lanczos import lanczos_top_k

OUT = Path(__file__).with_name("finite_difference.json")
OUT_MD = Path(__file__).with_name("RESULTS.md")
TOL = 1e-3  # SharpnessMonitor's default Lanczos tolerance


def _setup(
    dtype: torch.dtype, batch_size: int, activation: str = "relu"
) -> tuple[Any, Any, list[torch.Tensor]]:
    torch.manual_seed(0)
    module = reference_module().to(dtype)
    if activation == "gelu":  # the same model with a smooth activation
        for layer in module.modules():
            if isinstance(layer, torch.nn.TransformerEncoderLayer):
                layer.activation = torch.nn.functional.gelu
                layer.activation_relu_or_gelu = 2
    x, y = next(iter(reference_dataloader(batch_size=batch_size)))
    params = [p for p in module.parameters() if p.requires_grad]

    def closure() -> torch.Tensor:
        # the math kernel of attention: the fused ones have no double backward
        with sdpa_kernel(SDPBackend.MATH):
            return module.training_step((x, y), 0)

    return module, closure, params


def _gen() -> torch.Generator:
    """The same Lanczos start vector for both operators."""
    return torch.Generator().manual_seed(2)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def measure(
    dtype: torch.dtype, products: int, batch_size: int, lanczos_iter: int, activation: str
) -> dict:
    _, closure, params = _setup(dtype, batch_size, activation)
    gen = torch.Generator().manual_seed(1)
    dim = sum(p.numel() for p in params)
    vectors = [torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(products)]
    with HessianOperator(closure, params) as exact:
        exact.matvec(vectors[0])  # builds the gradient graph once, outside the timing
        timed = [_timed(exact.matvec, v) for v in vectors]
        wanted = [h.double() for h, _ in timed]
        exact_seconds = sum(t for _, t in timed) / products
        top_exact = lanczos_top_k(
            exact.matvec, dim, k=1, tol=TOL, max_iter=lanczos_iter, generator=_gen()
        )
    with FiniteDifferenceHessian(closure, params) as fd:
        timed = [_timed(fd.matvec, v) for v in vectors]
        fd_seconds = sum(t for _, t in timed) / products
        errors = [float((h.double() - w).norm() / w.norm()) for (h, _), w in zip(timed, wanted)]
        top_fd = lanczos_top_k(
            fd.matvec, dim, k=1, tol=TOL, max_iter=lanczos_iter, generator=_gen()
        )
        step = fd.step
    lam_exact = float(top_exact.eigenvalues[0])
    lam_fd = float(top_fd.eigenvalues[0])
    return {
        "activation": activation,
        "dtype": str(dtype).replace("torch.", ""),
        "parameters": dim,
        "step": step,
        "product_rel_error_median": sorted(errors)[len(errors) // 2],
        "product_rel_error_max": max(errors),
        "lambda_max_exact": lam_exact,
        "lambda_max_fd": lam_fd,
        "lambda_max_rel_error": abs(lam_fd - lam_exact) / abs(lam_exact),
        "lanczos_converged": [bool(top_exact.converged), bool(top_fd.converged)],
        "seconds_per_product_exact": exact_seconds,
        "seconds_per_product_fd": fd_seconds,
        "time_ratio": fd_seconds / exact_seconds,
    }


def _markdown(rows: list[dict]) -> str:
    lines = [
        "## Finite-difference Hessian-vector products (reference char-LM, one process)",
        "",
        "`python -m benchmarks.finite_difference`: central differences of gradients "
        "(`FiniteDifferenceHessian`, the operator used on sharded parameters) against "
        "double backward (`HessianOperator`) on one probe batch; errors of products along "
        "random directions and of the top eigenvalue (Lanczos on each operator from the same "
        "start, at SharpnessMonitor's default tolerance 1e-3 and 30 products; converged: "
        "exact / FD). The "
        "reference model's feed-forward layers use ReLU; the gelu rows swap in GELU.",
        "",
        "| activation | dtype | parameters | step h | product rel. error (median / max) | "
        "lambda_max rel. error | converged | s/product exact | s/product FD | FD / exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['activation']} | {r['dtype']} | {r['parameters']} | {r['step']:g} | "
            f"{r['product_rel_error_median']:.1e} / {r['product_rel_error_max']:.1e} | "
            f"{r['lambda_max_rel_error']:.1e} | "
            f"{' / '.join('yes' if c else 'no' for c in r['lanczos_converged'])} | "
            f"{r['seconds_per_product_exact']:.3f} | "
            f"{r['seconds_per_product_fd']:.3f} | {r['time_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer products, a smaller batch")
    args = parser.parse_args()
    products, batch, iters = (4, 8, 20) if args.quick else (10, 32, 30)
    torch.set_num_threads(1)
    rows = [
        measure(dtype, products, batch, iters, activation)
        for activation in ("relu", "gelu")
        for dtype in (torch.float32, torch.float64)
    ]
    OUT.write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2) + "\n")
    section = _markdown(rows)
    results_md.write_section(OUT_MD, "finite-difference", section)
    print(section)


if __name__ == "__main__":
    main()
