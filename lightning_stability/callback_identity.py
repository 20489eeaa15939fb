"""Which checkpoint entry belongs to which callback: a state key from the arguments that
configure a callback, and an ordinal that tells apart copies configured alike."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["IdentifiedCallback", "settle_state_keys"]

# Live instances that hold an ordinal: those a new instance's provisional one must avoid.
_numbered: weakref.WeakSet[IdentifiedCallback] = weakref.WeakSet()


class IdentifiedCallback(Callback):
    """Base of this package's callbacks: one checkpoint entry per instance.

    A subclass defines ``state_key`` as ``self._generate_state_key(...)`` with the
    arguments that identify it (``GradientMonitor{'window': 100, ...}``); the default uses
    none (``StabilityDashboard{}``). Two instances with different arguments have different
    keys. Copies with equal keys are numbered in the order they have in
    ``trainer.callbacks``: the first keeps the key, the n-th after it gets ``instance=n``
    appended (``LossMonitor{'window': 100, 'quantile': 0.95, 'instance': 1}``). The numbers
    are settled at ``setup``, for every such callback of the Trainer at once, and Lightning
    restores callback state after ``setup``: a run resumed with the same callback list gives
    each instance the state it saved.

    Before ``setup`` (the Trainer checks at construction that the keys of stateful
    callbacks are unique) an instance takes the lowest number that no other live instance
    with the same key holds.

    Checkpoints written when these callbacks were keyed by their class name alone still
    load: the first instance of a class in ``trainer.callbacks`` reads the entry under the
    class name when its own key is absent (Lightning warns that the old entry has no
    callback, as for any key it does not find, but the state is restored).

    Subclasses that override ``setup`` call ``super().setup(...)``.
    """

    _instance: int | None = None  # the ordinal among copies with the same key
    _settled = False  # numbered from a Trainer's callback list, not provisionally
    _first_of_class = True  # the first of its class in that list: reads the class-name entry
    _bare = False  # while set, the key is generated without the ordinal
    # Lightning reads state_key around every hook call: once settled, the key is reused
    # for as long as the arguments it was made from are unchanged.
    _cached: tuple[dict[str, Any], str] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key()

    @override
    def _generate_state_key(self, **kwargs: Any) -> str:
        if self._settled and not self._bare and self._cached and self._cached[0] == kwargs:
            return self._cached[1]
        key = super()._generate_state_key(**kwargs)
        if self._bare:
            return key
        ordinal = self._ordinal(key)
        if ordinal:
            key = super()._generate_state_key(**kwargs, instance=ordinal)
        if self._settled:
            self._cached = (kwargs, key)
        return key

    def identity_key(self) -> str:
        """The state key without the ordinal: equal for copies configured alike."""
        self._bare = True
        try:
            return self.state_key
        finally:
            self._bare = False

    @property
    @override
    def _legacy_state_key(self) -> Any:
        # Lightning looks a callback's state up under this key when its state_key is absent.
        if self._first_of_class:
            return type(self).__qualname__
        return super()._legacy_state_key

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        settle_state_keys(trainer.callbacks)
        super().setup(trainer, pl_module, stage)

    def _ordinal(self, key: str) -> int:
        if self._settled:
            return self._instance or 0
        taken = {
            other._instance
            for other in list(_numbered)
            if other is not self and other._instance is not None and other.identity_key() == key
        }
        if self._instance is None or self._instance in taken:
            self._instance = next(n for n in range(len(taken) + 1) if n not in taken)
            _numbered.add(self)
        return self._instance


def settle_state_keys(callbacks: Iterable[Callback]) -> None:
    """Number the :class:`IdentifiedCallback` copies with equal keys in ``callbacks`` by
    their order there (0 for the first), and mark the first of each class as the one that
    reads a checkpoint entry under the class name."""
    counts: dict[str, int] = {}
    classes: set[str] = set()
    for cb in callbacks:
        if not isinstance(cb, IdentifiedCallback):
            continue
        key = cb.identity_key()
        cb._instance = counts.get(key, 0)
        counts[key] = cb._instance + 1
        cb._settled = True
        cb._cached = None
        _numbered.add(cb)
        name = type(cb).__qualname__
        cb._first_of_class = name not in classes
        classes.add(name)
