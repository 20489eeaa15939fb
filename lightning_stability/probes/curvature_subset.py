"""Which parameters a curvature measurement covers, and which Hessian-vector product it
uses for them.

A *curvature subset* restricts the Hessian to named parameters (the last blocks, the
embeddings, the norms): the operator is then the diagonal block ``H_SS`` of the full
Hessian for the chosen set ``S``, with the other parameters held fixed. By Cauchy's
interlacing theorem its top eigenvalue is at most the full ``lambda_max`` (a lower
bound, equal when the top eigenvector lives in ``S``), and the cost of a product scales
with the forward/backward pass and the size of ``S``, not the whole model, for the
vectors Lanczos keeps.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Literal

from torch import Tensor, nn

from lightning_stability.estimators.finite_difference_hvp import FiniteDifferenceHessian
from lightning_stability.estimators.hvp import HessianOperator, LossClosure, Reducer
from lightning_stability.estimators.sharding import any_sharded

__all__ = [
    "HVP_MODES",
    "HvpMode",
    "check_patterns",
    "make_operator",
    "matches",
    "select_parameters",
    "unmatched_patterns",
]

HvpMode = Literal["auto", "exact", "finite_difference"]
HVP_MODES = ("auto", "exact", "finite_difference")


def check_patterns(patterns: Sequence[str] | None) -> list[str] | None:
    """Validate the ``params`` argument: ``None`` or a non-empty list of non-empty
    strings."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise ValueError(
            f"params must be None or a list of parameter-name patterns, got {patterns!r}"
        )
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            "params must be None or a non-empty list of non-empty parameter-name patterns "
            f"(globs such as 'blocks.11.*' or prefixes such as 'head'), got {patterns!r}"
        )
    return list(patterns)


def matches(name: str, pattern: str) -> bool:
    """Whether the parameter ``name`` is selected by ``pattern``: an ``fnmatch`` glob
    (``"blocks.1*.attn.*"``, ``"*norm*"``), the exact name, or a module prefix
    (``"head"`` selects ``head.weight`` and ``head.bias``)."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def unmatched_patterns(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The patterns that select none of ``names``."""
    names = list(names)
    return [pat for pat in patterns if not any(matches(n, pat) for n in names)]


def select_parameters(module: nn.Module, patterns: Sequence[str] | None) -> list[Tensor]:
    """The trainable parameters of ``module`` selected by ``patterns`` (all of them for
    ``None``), in the module's parameter order."""
    return [
        p
        for name, p in module.named_parameters()
        if p.requires_grad and (patterns is None or any(matches(name, pat) for pat in patterns))
    ]


def make_operator(
    mode: HvpMode,
    closure: LossClosure,
    params: list[Tensor],
    reduce: Reducer | None,
    module_params: Sequence[Tensor] = (),
) -> HessianOperator | FiniteDifferenceHessian:
    """The Hessian operator for ``params``: finite differences of gradients when ``mode``
    is ``"finite_difference"``, or ``"auto"`` and some parameter is sharded (a
    ``DTensor``, where double backward does not reach the shards); else the exact double
    backward operator. ``module_params``: all parameters of the module, whose ``.grad``
    the finite-difference operator keeps as it was."""
    if mode == "finite_difference" or (mode == "auto" and any_sharded(params)):
        return FiniteDifferenceHessian(closure, params, reduce=reduce, guard=module_params)
    return HessianOperator(closure, params, reduce=reduce)
