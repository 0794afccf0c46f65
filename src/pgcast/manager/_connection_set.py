"""The ``connections`` set of a NotificationManager: a ``set`` that counts
its changes, so the manager notices additions and removals (from inside its
loop or from another thread) without comparing sets at every wake-up."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import Any, Self, TypeVar

__all__ = ["ConnectionSet"]

C = TypeVar("C")


class ConnectionSet(set[C]):
    """A ``set`` that counts its changes and reports them.

    It is the manager's ``connections`` attribute: users add and remove
    connections with the ordinary set methods, at any time, and the manager
    compares it with its registrations only when :attr:`version` moved.
    *on_change* is called after every change (to wake a waiting manager).
    """

    __slots__ = ("on_change", "version")

    def __init__(self, items: Iterable[C] = (), on_change: Callable[[], object] | None = None):
        super().__init__(items)
        self.version = 0
        self.on_change = on_change

    def _changed(self) -> None:
        self.version += 1
        if self.on_change is not None:
            self.on_change()

    def add(self, item: C) -> None:
        """Add a connection to watch."""
        super().add(item)
        self._changed()

    def discard(self, item: object) -> None:
        """Stop watching a connection, if it is watched."""
        super().discard(item)
        self._changed()

    def remove(self, item: C) -> None:
        """Stop watching a connection; KeyError if it is not watched."""
        super().remove(item)
        self._changed()

    def pop(self) -> C:
        """Stop watching and return an arbitrary connection."""
        item = super().pop()
        self._changed()
        return item

    def clear(self) -> None:
        """Stop watching every connection: the iteration then ends."""
        super().clear()
        self._changed()

    def update(self, *others: Iterable[C]) -> None:
        """Add the connections of every iterable."""
        super().update(*others)
        self._changed()

    def difference_update(self, *others: Iterable[Any]) -> None:
        """Remove the connections found in any of *others*."""
        super().difference_update(*others)
        self._changed()

    def intersection_update(self, *others: Iterable[Any]) -> None:
        """Keep only the connections found in all of *others*."""
        super().intersection_update(*others)
        self._changed()

    def symmetric_difference_update(self, other: Iterable[C]) -> None:
        """Add what is only in *other*, remove what is in both."""
        super().symmetric_difference_update(other)
        self._changed()

    # typeshed types set.__ior__ as narrower than set.__or__; mypy then
    # rejects any override of __ior__ and __ixor__ in a subclass.
    def __ior__(self, other: AbstractSet[C], /) -> Self:  # type: ignore[override, misc]
        super().__ior__(other)
        self._changed()
        return self

    def __iand__(self, other: AbstractSet[object], /) -> Self:
        super().__iand__(other)
        self._changed()
        return self

    def __isub__(self, other: AbstractSet[object], /) -> Self:
        super().__isub__(other)
        self._changed()
        return self

    def __ixor__(self, other: AbstractSet[C], /) -> Self:  # type: ignore[override, misc]
        super().__ixor__(other)
        self._changed()
        return self
