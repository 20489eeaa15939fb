"""Which layers :class:`~lightning_stability.probes.drift.RepresentationDriftMonitor`
watches: the layers a user names (exact names or globs) or of the types they name, or by
default the network's top-level blocks; and which of them are ReLU-like (whose dead units
are counted)."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

__all__ = ["default_layers", "is_relu_like", "resolve_layers"]

_RELU_LIKE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)
# Identity in eval mode: their output repeats the previous layer's.
_SKIPPED_BY_DEFAULT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)


def _expand(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of ``module``; containers that are never called themselves (ModuleList,
    ModuleDict) are replaced by their items."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out.extend(_expand(full + ".", child))
        else:
            out.append((full, child))
    return out


def _watchable(module: nn.Module) -> bool:
    """Whether a block's output is a representation: not dropout/identity (their eval
    output repeats the previous layer's), a loss module or a metric (the step calls them
    on its outputs; they return numbers, not features)."""
    if isinstance(module, (*_SKIPPED_BY_DEFAULT, nn.modules.loss._Loss)):
        return False
    return not type(module).__module__.startswith("torchmetrics")


def _is_stack(module: nn.Module) -> bool:
    """A block whose output is that of its own sub-blocks: a Sequential, or a module
    holding a ModuleList (a stack of layers, as in ``nn.TransformerEncoder``)."""
    if isinstance(module, nn.Sequential):
        return True
    return any(isinstance(c, nn.ModuleList) for c in module.children())


def default_layers(module: nn.Module, max_layers: int) -> list[str]:
    """The outputs of the top-level blocks, whose last is the network's output or its last
    hidden layer: descend through single-child wrappers, skip dropout/identity, loss
    modules and metrics, open stacks of blocks (Sequentials, modules holding a
    ModuleList) while the total stays within ``max_layers``, and keep at most
    ``max_layers`` evenly spaced (the last always)."""
    prefix, root = "", module
    children = [(n, m) for n, m in _expand(prefix, root) if _watchable(m)]
    while len(children) == 1 and next(children[0][1].children(), None) is not None:
        prefix, root = children[0][0] + ".", children[0][1]
        children = [(n, m) for n, m in _expand(prefix, root) if _watchable(m)]
    opened = True
    while opened:
        opened = False
        for i, (name, child) in enumerate(children):
            if not _is_stack(child):
                continue
            inner = [(f"{name}.{n}", m) for n, m in _expand("", child) if _watchable(m)]
            if inner and len(children) - 1 + len(inner) <= max_layers:
                children = children[:i] + inner + children[i + 1 :]
                opened = True
                break
    names = [n for n, _ in children]
    if len(names) > max_layers:
        picks = torch.linspace(0, len(names) - 1, max_layers).round().long().tolist()
        names = [names[i] for i in sorted(set(picks))]
    return names


def is_relu_like(module: nn.Module) -> bool:
    """Whether ``module`` is a ReLU-like activation or a block whose last leaf is one."""
    if isinstance(module, _RELU_LIKE):
        return True
    leaves = [m for m in module.modules() if not list(m.children())]
    return bool(leaves) and leaves[-1] is not module and isinstance(leaves[-1], _RELU_LIKE)


def resolve_layers(
    module: nn.Module, layers: list[str] | None, layer_types: list[str] | None, max_layers: int
) -> tuple[list[str], set[str]]:
    """The names of the watched layers of ``module`` (``layers``: names or globs,
    ``layer_types``: class names; with neither, :func:`default_layers`), without repeats,
    and those of them that are ReLU-like. ``ValueError`` naming the argument for a name or
    a type that matches nothing."""
    named = dict(module.named_modules())
    available = [n for n in named if n]
    chosen: list[str] = []
    for pattern in layers or []:
        matches = [n for n in available if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            listing = ", ".join(available[:60]) + (" ..." if len(available) > 60 else "")
            raise ValueError(f"layers: no module named {pattern!r}; available: {listing}")
        chosen.extend(matches)
    if layer_types:
        types = {type(m).__name__ for m in named.values()}
        unknown = sorted(set(layer_types) - types)
        if unknown:
            raise ValueError(
                f"layer_types: no module of type {unknown}; available: {sorted(types)}"
            )
        chosen.extend(n for n in available if type(named[n]).__name__ in set(layer_types))
    if not chosen:
        chosen = default_layers(module, max_layers)
    if not chosen:
        raise ValueError("layers: the module has no submodules; name the layers to watch")
    unique = list(dict.fromkeys(chosen))
    return unique, {n for n in unique if is_relu_like(named[n])}
