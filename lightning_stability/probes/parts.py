"""Attributes that a callback shows under its own name while one of its parts holds them."""

from __future__ import annotations

from typing import Any

__all__ = ["Kept"]


class Kept:
    """A read-only view: ``owner.<name>`` reads ``owner.<part>.<attribute>``.

    A callback split into parts (a schedule, a measurement) keeps the attributes its users
    know under their former names, with one copy of each value, held by the part. Setting
    one through the owner raises ``AttributeError`` naming the part's attribute to set.

    Args:
        part: the owner's attribute that holds the part.
        attribute: the part's attribute.
    """

    def __init__(self, part: str, attribute: str) -> None:
        self.part, self.attribute = part, attribute

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.part), self.attribute)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(
            f"{type(obj).__name__}.{self.name} is read-only here; set "
            f"{self.part}.{self.attribute} instead"
        )
