"""Repair an Adam-family optimizer whose own settings make its update unbounded.

Adam's step is ``lr * m_hat / (sqrt(v_hat) + eps)``. With ``beta1**2 < beta2`` the ratio
``|m_hat| / sqrt(v_hat)`` is bounded by a constant that depends on the betas alone, so the
step is at most a fixed multiple of ``lr`` whatever the gradients do; with
``beta2 <= beta1**2`` that bound is lost and a few large gradients after a quiet stretch
give a step many times ``lr`` (Kingma and Ba, 2015, section 2.1; Zhang et al., 2022,
"Adam can converge without any modification on update rules"). No learning-rate cut
restores the bound, since it scales every step alike: the repair moves ``beta2`` (and,
when asked, ``eps``) to safe values instead, keeping the learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DEFAULT_REPAIR", "AdamRepair", "RepairRung", "repaired_at", "unbounded_groups"]


def _betas(group: dict[str, Any]) -> tuple[float, float] | None:
    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        return None
    return float(betas[0]), float(betas[1])


def unbounded_groups(optimizer: torch.optim.Optimizer) -> list[int]:
    """Indices of the param groups whose ``(beta1, beta2)`` leave Adam's update
    unbounded (``beta2 <= beta1**2``); groups without betas are skipped."""
    out = []
    for i, group in enumerate(optimizer.param_groups):
        betas = _betas(group)
        if betas is not None and betas[1] <= betas[0] ** 2:
            out.append(i)
    return out


@dataclass(frozen=True)
class AdamRepair:
    """Where the repair moves an Adam-family optimizer (Adam, AdamW, NAdam, RAdam,
    Adamax: any param group with ``betas``).

    Args:
        beta2: the ``beta2`` a repaired group gets (never lowered: a group already above
            it is left alone). Must exceed ``beta1**2`` of the groups it repairs. Default
            0.95, a common choice for large models that keeps ``v`` responsive.
        min_eps: when set, a repaired group's ``eps`` is raised to at least this value,
            which caps the step at ``lr * |m_hat| / min_eps`` where ``v`` has collapsed.
            Default ``None`` (``eps`` unchanged).
    """

    beta2: float = 0.95
    min_eps: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.beta2, bool) or not isinstance(self.beta2, (int, float)):
            raise ValueError(f"beta2 must be a number in (0, 1), got {self.beta2!r}")
        if not 0.0 < self.beta2 < 1.0:
            raise ValueError(f"beta2 must be a number in (0, 1), got {self.beta2!r}")
        if self.min_eps is not None and (
            isinstance(self.min_eps, bool)
            or not isinstance(self.min_eps, (int, float))
            or not self.min_eps > 0
        ):
            raise ValueError(f"min_eps must be a number > 0 or None, got {self.min_eps!r}")

    def plan(self, optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
        """The changes a repair would make now: ``{group index: {"betas": ..., "eps":
        ...}}`` for each group whose update is unbounded and that this repair makes
        bounded; empty when there is nothing it can fix."""
        changes: dict[int, dict[str, Any]] = {}
        for i in unbounded_groups(optimizer):
            group = optimizer.param_groups[i]
            beta1, beta2 = _betas(group)  # type: ignore[misc]
            target = max(beta2, self.beta2)
            if target <= beta1**2:
                continue  # this repair cannot bound the update: leave it to the ladder
            change: dict[str, Any] = {"betas": (beta1, target)}
            if self.min_eps is not None and float(group.get("eps", 0.0)) < self.min_eps:
                change["eps"] = float(self.min_eps)
            changes[i] = change
        return changes

    @staticmethod
    def apply(optimizer: torch.optim.Optimizer, changes: dict[int, dict[str, Any]]) -> None:
        """Write ``changes`` (from :meth:`plan`, or saved) into the optimizer's groups."""
        for i, change in changes.items():
            group = optimizer.param_groups[int(i)]
            for key, value in change.items():
                if key == "betas":
                    group["betas"] = _like(group["betas"], value)
                else:
                    group[key] = value


DEFAULT_REPAIR = AdamRepair()
"""The repair the actions use unless told otherwise (``beta2`` to 0.95, ``eps`` unchanged)."""


def _like(old: Any, new: tuple[float, float]) -> Any:
    # Keep the container type (and tensor betas of capturable optimizers) as the user had it.
    if isinstance(old, (tuple, list)) and any(isinstance(b, torch.Tensor) for b in old):
        return type(old)(
            torch.as_tensor(v, dtype=b.dtype, device=b.device) if isinstance(b, torch.Tensor) else v
            for b, v in zip(old, new)
        )
    return type(old)(new) if isinstance(old, (tuple, list)) else new


class RepairRung:
    """The optimizer-repair rung an action climbs before any other when the evidence points
    at the optimizer's own settings: it remembers what it changed (per optimizer, per
    group, with the user's values) so that a rollback, which reloads the optimizer's
    state, or a resume re-applies it, and :meth:`undo` can give the user's values back."""

    def __init__(self, repair: AdamRepair | None) -> None:
        if repair is not None and not isinstance(repair, AdamRepair):
            raise ValueError(f"optimizer_repair must be an AdamRepair or None, got {repair!r}")
        self.repair = repair
        self.step = -1
        """The optimizer step of the latest repair (-1: none in this fit)."""
        self.changes: dict[int, dict[int, dict[str, Any]]] = {}  # optimizer -> group -> change
        self.originals: dict[int, dict[int, dict[str, Any]]] = {}

    @property
    def applied(self) -> bool:
        return bool(self.changes)

    def climb(self, optimizers: list[torch.optim.Optimizer]) -> str | None:
        """Repair every optimizer that needs it; a message saying what and why, or
        ``None`` when there was nothing to repair."""
        if self.repair is None:
            return None
        parts = []
        for k, opt in enumerate(optimizers):
            plan = self.repair.plan(opt)
            if not plan:
                continue
            originals = self.originals.setdefault(k, {})
            for i, change in plan.items():
                group = opt.param_groups[i]
                originals.setdefault(i, {key: _plain(group[key]) for key in change})
                old = _betas(group)
                parts.append(
                    f"optimizer {k} group {i}: beta2 {old[1]:.4g} -> {change['betas'][1]:.4g}"  # type: ignore[index]
                    + (f", eps -> {change['eps']:.3g}" if "eps" in change else "")
                    + f" (beta2 <= beta1^2 = {old[0] ** 2:.4g}: Adam's update m/sqrt(v) is "  # type: ignore[index]
                    "unbounded)"
                )
            AdamRepair.apply(opt, plan)
            self.changes.setdefault(k, {}).update(plan)
        return "; ".join(parts) or None

    def answer(self, action: Any, trainer: Any, level: Any, reason: str) -> bool:
        """Repair what needs it as ``action``'s answer to an event at ``level``, recorded
        in its events with why; ``False`` when there was nothing to repair."""
        message = self.climb(trainer.optimizers)
        if message is None:
            return False
        self.step = int(trainer.global_step)
        action.record(trainer, level, f"optimizer repaired ({reason}): {message}")
        return True

    def restored(self, optimizers: list[torch.optim.Optimizer], before: dict[str, Any]) -> None:
        """After a rollback: keep the repairs of ``before`` (the rung's state from just
        before it) and write them back into the reloaded optimizers."""
        self.merge(before)
        self.reapply(optimizers)

    def reapply(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Write the repairs made so far back into the optimizers (after a rollback or a
        resume reloaded their param groups)."""
        for k, changes in self.changes.items():
            if k < len(optimizers):
                AdamRepair.apply(optimizers[k], changes)

    def undo(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Give every repaired group the user's values back."""
        for k, originals in self.originals.items():
            if k < len(optimizers):
                AdamRepair.apply(optimizers[k], originals)
        self.changes, self.originals = {}, {}

    def merge(self, before: dict[str, Any]) -> None:
        """Keep the repairs of ``before`` (a :meth:`state_dict` from before a rollback) that
        the restored state lacks: a rollback never loosens the optimizer."""
        other = RepairRung(self.repair)
        other.load_state_dict(before)
        for k, changes in other.changes.items():
            for i, change in changes.items():
                self.changes.setdefault(k, {}).setdefault(i, change)
        for k, originals in other.originals.items():
            for i, original in originals.items():
                self.originals.setdefault(k, {}).setdefault(i, original)

    def state_dict(self) -> dict[str, Any]:
        def plain(d: dict[int, dict[int, dict[str, Any]]]) -> list[list[Any]]:
            return [
                [k, i, {key: _plain(v) for key, v in c.items()}]
                for k, g in d.items()
                for i, c in g.items()
            ]

        return {"changes": plain(self.changes), "originals": plain(self.originals)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.changes, self.originals = {}, {}
        for name, target in (("changes", self.changes), ("originals", self.originals)):
            for k, i, change in (state or {}).get(name, []):
                target.setdefault(int(k), {})[int(i)] = {
                    key: tuple(v) if key == "betas" else v for key, v in change.items()
                }


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def repaired_at(action: Any, step: int) -> bool:
    """Whether ``action``'s repair rung answered the event of ``step`` (any action with a
    :class:`RepairRung` as ``repair``)."""
    repair = getattr(action, "repair", None)
    return isinstance(repair, RepairRung) and repair.step == step
