"""Grouped configuration: the flat keyword arguments of the previous release, mapped onto
the grouped, frozen config dataclasses that replace them.

A callback whose settings are grouped (``SharpnessMonitor(cadence=SharpnessCadence(...))``)
still accepts the flat keywords it used to take (``SharpnessMonitor(every_n_steps=500)``)
for one release: :func:`regroup` folds them into the group they now belong to, with a
``DeprecationWarning`` that names the grouped form, so the callback behaves identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_deprecation

__all__ = ["FlatAliases", "field_aliases", "regroup"]

FlatAliases = Mapping[str, tuple[str, str]]
"""Flat keyword -> (group argument, field of that group's config class)."""


def field_aliases(**groups: type) -> dict[str, tuple[str, str]]:
    """Aliases where every field of each group's config class kept its flat name
    (``field_aliases(cadence=SharpnessCadence)`` maps ``every_n_steps`` to
    ``("cadence", "every_n_steps")``)."""
    return {
        f.name: (group, f.name) for group, cls in groups.items() for f in dataclasses.fields(cls)
    }


def regroup(
    owner: str,
    flat: Mapping[str, Any],
    aliases: FlatAliases,
    groups: Mapping[str, tuple[type, Any]],
    *,
    warn: bool = True,
) -> dict[str, Any]:
    """The config of every group, with the flat keywords folded in.

    Args:
        owner: the class whose constructor is called, for messages.
        flat: the flat keywords given (the constructor's ``**kwargs``).
        aliases: where each flat keyword now lives.
        groups: group argument -> (config class, the config given or ``None``).
        warn: issue the ``DeprecationWarning`` (``stability_callbacks`` folds its dict
            options silently).

    Returns:
        group argument -> config instance (the class's defaults where none was given).

    Raises:
        TypeError: a keyword that is neither a group nor a flat alias.
        ValueError: a field value the config refuses (raised by the config itself).
    """
    unknown = [name for name in flat if name not in aliases]
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    updates: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        group, field = aliases[name]
        updates.setdefault(group, {})[field] = value
    out: dict[str, Any] = {}
    for group, (cls, given) in groups.items():
        if given is not None and not isinstance(given, cls):
            raise ValueError(
                f"{group} must be a {cls.__name__} or None, got {type(given).__name__}"
            )
        base = cls() if given is None else given
        out[group] = dataclasses.replace(base, **updates[group]) if group in updates else base
    if warn and flat:
        old = ", ".join(f"{name}=..." for name in flat)
        new = ", ".join(
            f"{group}={groups[group][0].__name__}("
            + ", ".join(f"{f}={v!r}" for f, v in fields.items())
            + ")"
            for group, fields in updates.items()
        )
        rank_zero_deprecation(
            f"{owner}({old}) is deprecated and will be removed in the next release: pass {new}",
            stacklevel=7,  # the line that called the callback's constructor
        )
    return out
