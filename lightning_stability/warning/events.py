"""Instability events: what the warning layer emits and the action layer consumes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_stability.vocabulary import WARNING_SOURCE, Level

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["EventListener", "InstabilityEvent", "Level", "event_from_state", "event_to_state"]


@dataclass(frozen=True)
class InstabilityEvent:
    """A change of level (or a repeated critical) at an optimizer step.

    Attributes:
        level: the new level.
        step: ``trainer.global_step`` when it was raised.
        signals: the reading keys that drove it, most important first.
        message: one human-readable sentence.
        deviation: the meta-state deviation score at that step (dimensionless).
        source: what raised it (``"early_warning"``, or an action's name for the events
            that actions log about themselves).
    """

    level: Level
    step: int
    signals: tuple[str, ...] = ()
    message: str = ""
    deviation: float = float("nan")
    source: str = WARNING_SOURCE
    details: dict[str, float] = field(default_factory=dict)


EventListener = Callable[[InstabilityEvent, "pl.Trainer", "pl.LightningModule"], None]
"""Called with every event, on every rank, at the step boundary where it was raised."""


def event_to_state(event: InstabilityEvent) -> dict[str, Any]:
    """An event as plain numbers/strings/lists (checkpoint-safe)."""
    return {
        "level": int(event.level),
        "step": int(event.step),
        "signals": list(event.signals),
        "message": event.message,
        "deviation": float(event.deviation),
        "source": event.source,
        "details": {k: float(v) for k, v in event.details.items()},
    }


def event_from_state(state: dict[str, Any]) -> InstabilityEvent:
    return InstabilityEvent(
        level=Level(int(state["level"])),
        step=int(state["step"]),
        signals=tuple(state.get("signals", ())),
        message=str(state.get("message", "")),
        deviation=float(state.get("deviation", float("nan"))),
        source=str(state.get("source", "")),
        details=dict(state.get("details", {})),
    )
