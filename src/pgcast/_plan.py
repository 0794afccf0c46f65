"""The iteration policy of a PubSub's ``events()``, ``wait()`` and idle
events, without I/O: :func:`plan` yields :class:`Wait` requests, which the
driver answers by waiting on the socket and reading, and the values the user
should see. Both flavours' drivers run the same plan (see :mod:`pgcast._core`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from ._event import Event
from ._gap import Gap
from ._reconnect import Reconnected

__all__ = ["Wait", "plan"]


@dataclass(frozen=True, slots=True)
class Wait:
    """A request from :func:`plan` to its driver: wait until the socket is
    readable (or until woken), at most *timeout* seconds (``None``: no limit,
    ``0``: do not wait), then :meth:`Core.read` what arrived."""

    timeout: float | None


_NOW = Wait(0)


def plan(
    inbox: deque[Event | Reconnected | Gap],
    *,
    timeout: float | None,
    idle: bool,
    once: bool = False,
    skip_pid: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    skip_pids: AbstractSet[int] | None = None,
) -> Iterator[Wait | Event | Reconnected | Gap | None]:
    """The iteration policy shared by ``events()`` and ``wait()``.

    Yields the events of *inbox* in order, and :class:`Wait` whenever it is
    empty. With *idle*, ``None`` is yielded after each *timeout* seconds that
    passed without an event. With *once* (py-postgresql's zero timeout), the
    socket is read once without waiting, what is pending is yielded, and the
    iteration ends. Events from *skip_pid*, or from any pid in the live set
    *skip_pids* (every backend a reconnecting PubSub had), are dropped
    (``ignore_own``). :class:`Reconnected` markers are yielded like events.

    Nothing is held back: events stay in *inbox* until yielded, so a consumer
    that stops iterating loses none of them.
    """
    own: AbstractSet[int] = frozenset() if skip_pid is None else frozenset((skip_pid,))
    if skip_pids is not None:
        own = skip_pids if skip_pid is None else own | skip_pids
    if once:
        yield _NOW
        while inbox:
            event = inbox.popleft()
            if not own or isinstance(event, Reconnected | Gap) or event.pid not in own:
                yield event
        return
    if timeout is None:
        forever = Wait(None)
        while True:
            while inbox:
                event = inbox.popleft()
                if not own or isinstance(event, Reconnected | Gap) or event.pid not in own:
                    yield event
            yield forever
    deadline = clock() + timeout
    while True:
        if inbox:
            while inbox:
                event = inbox.popleft()
                if not own or isinstance(event, Reconnected | Gap) or event.pid not in own:
                    yield event
            deadline = clock() + timeout
        remaining = deadline - clock()
        if remaining > 0:
            yield Wait(remaining)
        else:
            if idle:
                yield None
            deadline = clock() + timeout
