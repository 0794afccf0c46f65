"""The NotificationManager's parts without I/O, and a check of both flavours'
sources: no flavour to test them in (the manager against PostgreSQL is in
tests/test_manager.py and tests/test_aio_manager.py)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest

import pgcast.manager._manager
import pgcast.manager._manager_async
import pgcast.manager._policy
from pgcast.manager._connection_set import ConnectionSet


def test_no_sleep_in_the_manager() -> None:
    """Both flavours wait on sockets, never in a sleep-and-poll loop."""
    for module in (pgcast.manager._manager, pgcast.manager._manager_async, pgcast.manager._policy):
        source = inspect.getsource(module)
        assert "sleep(" not in source, module.__name__


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.add(9), {1, 2, 3, 9}),
        (lambda s: s.discard(2), {1, 3}),
        (lambda s: s.remove(2), {1, 3}),
        (lambda s: s.pop(), None),
        (lambda s: s.clear(), set()),
        (lambda s: s.update([4], {5}), {1, 2, 3, 4, 5}),
        (lambda s: s.difference_update({1}, [2]), {3}),
        (lambda s: s.intersection_update({1, 2, 7}), {1, 2}),
        (lambda s: s.symmetric_difference_update({3, 4}), {1, 2, 4}),
        (lambda s: s.__ior__({4}), {1, 2, 3, 4}),
        (lambda s: s.__iand__({1}), {1}),
        (lambda s: s.__isub__({1}), {2, 3}),
        (lambda s: s.__ixor__({1, 4}), {2, 3, 4}),
    ],
)
def test_every_change_of_the_connection_set_is_seen(
    change: Callable[[ConnectionSet[int]], object], expected: set[int] | None
) -> None:
    calls: list[int] = []
    s: ConnectionSet[int] = ConnectionSet([1, 2, 3], on_change=lambda: calls.append(1))
    assert isinstance(s, set) and s.version == 0
    change(s)
    assert s.version == 1 and calls == [1]
    if expected is not None:
        assert s == expected
    else:
        assert len(s) == 2
