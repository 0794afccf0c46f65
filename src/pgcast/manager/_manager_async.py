"""The NotificationManager: one loop over many PubSubs, py-postgresql's semantics.

::

    nm = pgcast.NotificationManager(ps1, ps2, timeout=2)
    for x in nm:                         # async for, with pgcast.aio's
        if x is None:
            ...                          # idle: 2 s without events
            continue
        ps, events = x                   # one connection, every event picked up on it
        for channel, payload, pid in events:
            ...

Written for asyncio (``_manager_async.py``: ``pgcast.aio.NotificationManager``);
the sync one (``pgcast.NotificationManager``) is generated from it by
``tools/async_to_sync.py``. The policy (what to read, when to idle, the health
checks' heap, lost connections) is :mod:`pgcast.manager._policy`, without
I/O; here it is driven, and the PubSubs through their supervisor interface
(:mod:`pgcast.client._supervised_async`). The contract:

* The manager is an iterator. It yields ``(pubsub, [events...])`` with every
  event picked up on that connection, or ``None`` as an idle event: never
  with timeout ``None``, after each ``timeout`` seconds without events
  otherwise. With timeout ``0`` it reads every connection once, yields what is
  pending and stops; iterating again starts over.
* Nothing is held in the manager while the user holds a value: breaking out
  of the loop, at an idle event or while handling events, loses nothing; the
  connections not yet visited are visited by the next iteration.
* :attr:`~AsyncNotificationManager.connections` is a set; add and remove
  connections at any time, from inside the loop or (the manager is woken)
  from another thread. A connection that dies or raises moves to
  :attr:`~AsyncNotificationManager.garbage` and the others keep delivering;
  what it had received is still yielded. The iteration ends when no
  connection is left. With ``reconnect=True`` a lost connection is
  reconnected instead (in a thread or task of its own, so the backoff holds
  up no other connection) and its :class:`~pgcast.Reconnected` marker is
  yielded. Those reconnects are the manager's: ``close()`` ends them, in
  both flavours (see :meth:`~AsyncNotificationManager.close`).
* The manager runs its connections' health checks (``health_check_interval``
  of ``connect()``), which a managed PubSub cannot run itself: it wakes when
  a connection's probe is due (``health_tick()``), so a connection the
  network silently dropped is found dead within about two intervals and goes
  to garbage, or is reconnected with ``reconnect=True``.
* One waiter watches every socket (:class:`~pgcast._flavour_async.SocketsWaiter`:
  a selector, or the event loop's readers), each registered once, and the
  health checks' times are kept in a heap, so a wake-up costs the same with 1
  or 500 idle connections.

A PubSub belongs to at most one manager at a time, and is not iterated by
other means (``events()``, ``wait()``, ``run()``) while it is managed; others
may still ``notify`` through it. An asyncio manager belongs to the event loop
it is first iterated in.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self

from .._closing import AsyncClosing
from .._core import Wait
from .._errors import ClosedError
from .._flavour_async import SocketsWaiter, cancel, gather_cancelled, start_task
from ..client._pubsub_async import AsyncPubSub
from ._policy import (
    ConnectionSet,
    Events,
    HealthTick,
    ManagerCore,
    Read,
    Register,
    Step,
    Unregister,
    weak_callback,
)

__all__ = ["AsyncNotificationManager"]

logger = logging.getLogger("pgcast")


class AsyncNotificationManager(AsyncClosing):
    """Wait for notifications on many PubSubs at once.

    :param connections: the PubSubs to watch; more can be added later.
    :param timeout: seconds without events before an idle event (``None``);
        ``None`` never idles, ``0`` polls once and ends the iteration.
    :param reconnect: reconnect a lost connection (with the PubSub's own
        backoff, its ``reconnect()``) instead of moving it to
        :attr:`garbage`; it stays in :attr:`connections` meanwhile and its
        :class:`~pgcast.Reconnected` marker comes in its events list. Only a
        reconnect that gives up, or a connection closed by its user, goes to
        garbage. A connection found dead by its health check counts as lost.

    Use it as a context manager, or call ``close()``, to release what it
    waits with and end the reconnects it started; the PubSubs themselves
    stay open.
    """

    def __init__(
        self, *connections: AsyncPubSub, timeout: float | None = None, reconnect: bool = False
    ) -> None:
        self._closed = False
        self._waiter: SocketsWaiter[AsyncPubSub] = SocketsWaiter()
        self._reconnects: set[Any] = set()
        self._hooks: dict[AsyncPubSub, Callable[[], None]] = {}
        self._steps: Iterator[Step[AsyncPubSub]] | None = None
        # Last: the policy may call _wake.
        self._core: ManagerCore[AsyncPubSub] = ManagerCore(
            connections, timeout, self._wake, reconnect=reconnect
        )

    # -- py-postgresql's interface -------------------------------------------

    @property
    def connections(self) -> ConnectionSet[AsyncPubSub]:
        """The connections watched: a set, to change at any time."""
        return self._core.connections

    @connections.setter
    def connections(self, value: Iterable[AsyncPubSub]) -> None:
        self._core.connections = value

    @property
    def garbage(self) -> set[AsyncPubSub]:
        """Connections that died or raised, moved out of :attr:`connections`.

        Empty them yourself (``nm.garbage.clear()``) once handled.
        """
        return self._core.garbage

    @garbage.setter
    def garbage(self, value: set[AsyncPubSub]) -> None:
        self._core.garbage = value

    def settimeout(self, timeout: float | None) -> None:
        """Set the seconds without events before an idle event.

        ``None``: never idle. ``0``: the iteration reads every connection
        once, yields what is pending, and ends.

        :raises ValueError: a negative timeout.
        :raises TypeError: not a number.
        """
        self._core.timeout = timeout

    def gettimeout(self) -> float | None:
        """The timeout as last set: a number of seconds, or None."""
        return self._core.timeout

    def __repr__(self) -> str:
        return (
            f"<pgcast.{type(self).__name__} connections={len(self.connections)} "
            f"garbage={len(self.garbage)} timeout={self.gettimeout()!r}>"
        )

    # -- the iteration -------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[AsyncPubSub, Events] | None:
        if self._closed:
            raise ClosedError("this NotificationManager is closed")
        steps = self._steps
        if steps is None:
            steps = self._steps = self._core.steps()
        for step in steps:  # the policy's requests, carried out; or a value
            kind = type(step)
            if kind is Read:
                await self._read(step.conn)  # type: ignore[union-attr]
            elif kind is Wait:
                await self._wait(step.timeout)  # type: ignore[union-attr]
            elif kind is HealthTick:
                await self._health_tick(step.conn)  # type: ignore[union-attr]
            elif kind is Register:
                self._register(step.conn)  # type: ignore[union-attr]
            elif kind is Unregister:
                self._unregister(step.conn)  # type: ignore[union-attr]
            else:
                return step  # type: ignore[return-value]
        self._steps = None  # the next iteration starts over
        raise StopAsyncIteration

    async def close(self) -> None:
        """Stop watching every connection. The PubSubs stay open and keep
        their unread events. Idempotent.

        The reconnects the manager started (``reconnect=True``) end with it,
        in both flavours: a task (asyncio) is cancelled; a thread (sync) is
        stopped at its backoff's next sleep, and close() waits for the
        threads, 5 s at most in all. A connection attempt in progress cannot
        be interrupted in a thread: one still running then is left to end
        at the sleep after its attempt (a warning names it). So once
        close() returned (or, for such a thread, once its attempt ended) no
        reconnect of the manager's goes on, and a PubSub whose reconnect
        was ended stays as the reconnect left it: lost (its
        connection closed), unless an attempt had just succeeded (then
        reconnected, its :class:`~pgcast.Reconnected` marker queued). A lost
        one is restored as any lost PubSub: with ``reconnect=True`` (the
        default of ``connect()``) by its next command or its own iteration,
        or by calling its ``reconnect()``; otherwise its commands raise
        :class:`~pgcast.ConnectionLostError`.
        """
        if self._closed:
            return
        self._closed = True
        for conn in list(self._core.fds):
            self._unregister(conn)
        self._waiter.close()
        # The reconnects are the manager's work: they end with it.
        await gather_cancelled(self._reconnects)

    # -- carrying out the policy's requests ----------------------------------

    async def _read(self, conn: AsyncPubSub) -> None:
        try:
            await conn.read_ready()
        except Exception as exc:
            self._lose(conn, exc)

    async def _health_tick(self, conn: AsyncPubSub) -> None:
        try:
            await conn.health_tick()
        except Exception as exc:
            self._lose(conn, exc)

    async def _wait(self, timeout: float | None) -> None:
        ready, failed = await self._waiter.wait(timeout)
        for conn, exc in failed:
            self._lose(conn, exc)
        for conn in ready:
            self._core.ready(conn)

    def _register(self, conn: AsyncPubSub) -> None:
        try:
            fd = conn.fileno()
            for stale in self._waiter.add(fd, conn):
                self._forget(stale)
                self._lose(stale, OSError(f"its socket (fd {fd}) was closed"))
        except Exception as exc:
            self._lose(conn, exc)
            return
        # The PubSub wakes the manager when events reach it another way.
        hook = self._hooks[conn] = weak_callback(self._poked, conn)
        conn.set_wake_callback(hook)
        self._core.registered(conn, fd)

    def _unregister(self, conn: AsyncPubSub) -> None:
        self._waiter.remove(conn)
        self._forget(conn)

    def _forget(self, conn: AsyncPubSub) -> None:
        hook = self._hooks.pop(conn, None)
        if hook is not None and conn.wake_callback is hook:
            conn.set_wake_callback(None)
        self._core.unregistered(conn)

    # -- what happens to a connection ----------------------------------------

    def _wake(self) -> None:
        self._waiter.wake()

    def _poked(self, conn: AsyncPubSub) -> None:
        if conn.closed:
            self._waiter.closing(conn)  # its descriptor goes right after this call
        self._core.poke(conn)
        self._wake()

    def _lose(self, conn: AsyncPubSub, exc: BaseException) -> None:
        if not self._core.lose(conn, exc):
            logger.warning("pgcast: %r moved to the manager's garbage: %s", conn, exc)
            return
        self._unregister(conn)
        if self._closed:
            return  # the manager's reconnects end with it (see close())
        # In a thread or task of its own, so that the backoff between
        # attempts does not hold up the other connections.
        reconnect = functools.partial(self._reconnect, conn)
        task = start_task(reconnect, "pgcast-manager-reconnect", self._reconnects)
        if self._closed:  # sync: close() ran meanwhile in another thread, without it
            cancel(task)

    async def _reconnect(self, conn: AsyncPubSub) -> None:
        try:
            await conn.reconnect()
        except Exception as exc:
            logger.warning("pgcast: %r moved to the manager's garbage: %s", conn, exc)
            self._core.reconnected(conn, exc)
        else:
            self._core.reconnected(conn, None)
        self._wake()
