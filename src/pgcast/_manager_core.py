"""The I/O-free heart of a NotificationManager, driven by the sync and asyncio managers.

A manager watches a set of PubSubs and hands out, one connection at a time,
``(pubsub, [events...])``: the connection and every event picked up on it, or
``None`` as an idle event. Everything that needs no waiting is decided here,
once, for both drivers (:mod:`pgcast.manager` and :mod:`pgcast.aio_manager`):

* :class:`ConnectionSet` is the user's ``connections`` set; it counts its
  changes so the manager notices additions and removals without comparing
  sets at every wake-up.
* :class:`ManagerCore` keeps the *ready* connections (those to read before
  waiting again), the ``garbage`` set, and the registrations the driver made.
* :meth:`ManagerCore.steps` is the iteration policy, a generator yielding
  requests the driver carries out, :class:`Register`, :class:`Unregister`,
  :class:`Read` and :class:`~pgcast._core.Wait`, and the values the user sees.

The driver's side of the contract:

* ``Register(c)``: start watching ``c.fileno()`` for readability and record
  the descriptor with :meth:`ManagerCore.registered`; on any exception call
  :meth:`ManagerCore.lose`.
* ``Unregister(c)``: stop watching the descriptor recorded for ``c`` and call
  :meth:`ManagerCore.unregistered`.
* ``Read(c)``: read without blocking what arrived on ``c`` into its inbox
  (``PubSub._read()``); on any exception call :meth:`ManagerCore.lose`. When
  that returns True (``reconnect`` is on and the connection was lost), stop
  watching ``c``, reconnect it in the background (``c.reconnect()``) and
  report the outcome with :meth:`ManagerCore.reconnected`, waking the
  manager.
* ``Wait(t)``: wait at most ``t`` seconds (``None``: no limit) until a watched
  socket is readable or the manager is woken, and call
  :meth:`ManagerCore.ready` for each readable connection.

The semantics are py-postgresql's ``NotificationManager``:

* timeout ``None`` never idles; ``t > 0`` yields ``None`` after each ``t``
  seconds without events; ``0`` reads every connection once, yields what is
  pending and ends the iteration (the manager can be iterated again).
* Nothing is held here while the user holds a value: events stay in each
  PubSub's inbox until the moment they are yielded, and the connections still
  to visit are kept in the manager, not in the generator, so breaking out of
  the loop (at an idle event or while handling events) loses nothing.
* A connection whose read or registration raises moves from ``connections``
  to ``garbage``; the events it had already received are still yielded. The
  iteration ends when ``connections`` is empty.
* With ``reconnect``, a lost connection stays in ``connections`` while it is
  reconnected, unwatched; then it is watched again on its new socket, and
  its :class:`~pgcast.Reconnected` marker is yielded with its events. Only a
  reconnect that gives up moves it to ``garbage``.
* A wake-up costs the same whatever the number of idle connections: the
  driver registers each socket once, readiness names the connections to read,
  and the connection set is compared with the registrations only after it
  changed.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Generic, Protocol, Self, TypeAlias, TypeVar

from ._core import Core, Wait, check_timeout
from ._errors import ConnectionLostError
from ._event import Event
from ._reconnect import Reconnected

__all__ = [
    "ConnectionSet",
    "Events",
    "Managed",
    "ManagerCore",
    "Read",
    "Register",
    "Step",
    "Unregister",
    "weak_callback",
]


class Managed(Protocol):
    """What the manager needs of a connection: a PubSub or an AsyncPubSub."""

    _core: Core

    @property
    def closed(self) -> bool: ...

    def fileno(self) -> int: ...


C = TypeVar("C", bound=Managed)


@dataclass(frozen=True, slots=True)
class Register(Generic[C]):
    """Start watching the connection's socket."""

    conn: C


@dataclass(frozen=True, slots=True)
class Unregister(Generic[C]):
    """Stop watching the connection's socket."""

    conn: C


@dataclass(frozen=True, slots=True)
class Read(Generic[C]):
    """Read, without blocking, what arrived on the connection into its inbox."""

    conn: C


#: The events of one connection: notifications, and with ``reconnect`` its
#: :class:`~pgcast.Reconnected` markers, in the order they came.
Events: TypeAlias = list[Event | Reconnected]
#: What :meth:`ManagerCore.steps` yields: a request, or a value for the user.
Step: TypeAlias = "Register[C] | Unregister[C] | Read[C] | Wait | tuple[C, Events] | None"


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


def weak_callback(method: Callable[[C], object], conn: C) -> Callable[[], None]:
    """``method(conn)`` as a callback that does not keep *method*'s object alive.

    A manager leaves one on each PubSub it watches (``_on_wake``), so a
    manager thrown away without ``close()`` can still be garbage collected.
    """
    ref = weakref.WeakMethod(method)

    def callback() -> None:
        bound = ref()
        if bound is not None:
            bound(conn)

    return callback


class ManagerCore(Generic[C]):
    """The state of one manager that needs no I/O to maintain."""

    def __init__(
        self,
        connections: Iterable[C],
        timeout: float | None,
        on_change: Callable[[], object] | None = None,
        *,
        reconnect: bool = False,
    ) -> None:
        #: Reconnect lost connections rather than moving them to garbage.
        self.reconnect = reconnect
        #: Connections being reconnected: in ``connections``, not watched.
        self.reconnecting: set[C] = set()
        self._restored: deque[tuple[C, BaseException | None]] = deque()
        self._connections: ConnectionSet[C] = ConnectionSet(connections, on_change)
        self._on_change = on_change
        #: Connections that died or raised, moved out of ``connections``.
        self.garbage: set[C] = set()
        self.timeout = timeout
        #: The descriptor the driver registered for each connection.
        self.fds: dict[C, int] = {}
        self._synced = -1  # the connections' version the registrations match
        # An ordered set: the connections to read before waiting again, first
        # come first served (OrderedDict: popping the first is O(1)). It
        # lives here rather than in the generator so that a loop broken off
        # (or a generator thrown away) leaves them for the next iteration.
        self._ready: OrderedDict[C, None] = OrderedDict()
        # Appended to from any thread (deque.append is atomic), drained by
        # the iterating thread.
        self._pokes: deque[C] = deque()

    @property
    def timeout(self) -> float | None:
        """Seconds without events before an idle event; None: never; 0: poll once."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        check_timeout("timeout", value)
        self._timeout = value  # as given: settimeout(2) then gettimeout() is 2

    @property
    def connections(self) -> ConnectionSet[C]:
        """The connections watched (a set; change it at any time)."""
        return self._connections

    @connections.setter
    def connections(self, value: Iterable[C]) -> None:
        if value is self._connections:
            return  # ``nm.connections |= {...}`` assigns the set to itself
        self._connections = ConnectionSet(value, self._on_change)
        self._synced = -1
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    # -- reports from the driver -------------------------------------------

    def registered(self, conn: C, fd: int) -> None:
        """The driver now watches *fd* for *conn*; read it once at once, for
        what arrived before (events taken in during a query, or parsed by
        libpq, leave the socket unreadable)."""
        self.fds[conn] = fd
        self._ready[conn] = None

    def unregistered(self, conn: C) -> None:
        """The driver no longer watches *conn*."""
        self.fds.pop(conn, None)

    def ready(self, conn: C) -> None:
        """*conn*'s socket is readable."""
        self._ready[conn] = None

    def poke(self, conn: C) -> None:
        """Something happened to *conn* off its socket (events taken in during
        a query, or a close). Thread safe."""
        self._pokes.append(conn)

    def lose(self, conn: C, exc: BaseException) -> bool:
        """*conn* died or raised *exc*: move it from connections to garbage.

        With :attr:`reconnect`, a lost connection (:class:`ConnectionLostError`)
        that is still wanted is instead marked as reconnecting and True is
        returned: the driver stops watching it and reconnects it, then
        reports with :meth:`reconnected`.
        """
        self._ready.pop(conn, None)
        if self.reconnect and isinstance(exc, ConnectionLostError) and conn in self._connections:
            self.reconnecting.add(conn)
            return True
        self.garbage.add(conn)
        if conn in self._connections:
            self._connections.discard(conn)
        return False

    def reconnected(self, conn: C, exc: BaseException | None = None) -> None:
        """The driver's reconnect of *conn* is over: done, or failed with *exc*
        (then it goes to garbage). Thread safe."""
        self._restored.append((conn, exc))

    # -- the policy --------------------------------------------------------

    def _sync(self) -> Iterator[Register[C] | Unregister[C]]:
        """Bring the registrations in line with ``connections``, if it changed."""
        while self._synced != self._connections.version:
            conns = self._connections
            version = conns.version
            fds = self.fds
            gone = [c for c in fds if c not in conns]
            new = [c for c in conns if c not in fds and c not in self.reconnecting]
            for c in gone:
                yield Unregister(c)
            for c in new:
                yield Register(c)
            self._synced = version

    def _take_pokes(self) -> None:
        restored = self._restored
        while restored:
            conn, exc = restored.popleft()
            self.reconnecting.discard(conn)
            if exc is not None and conn in self._connections:
                self.garbage.add(conn)
                self._connections.discard(conn)
            # Register it again, on its new socket (if it is still wanted).
            self._synced = -1
        pokes = self._pokes
        while pokes:
            conn = pokes.popleft()
            if conn in self.fds:
                self._ready[conn] = None

    def steps(self, clock: Callable[[], float] = time.monotonic) -> Iterator[Step[C]]:
        """One iteration of the manager: requests for the driver and values."""
        polled = False
        last = clock()
        while True:
            self._take_pokes()
            yield from self._sync()
            if self.timeout == 0 and not polled:
                # py-postgresql's zero timeout: every connection once.
                polled = True
                self._ready.update(dict.fromkeys(self.fds))
            ready = self._ready
            while ready:
                conn, _ = ready.popitem(last=False)
                if conn not in self._connections:
                    # Removed since it became ready: stop watching it now, so
                    # that if it is added back it is registered (and read)
                    # afresh rather than forgotten.
                    if conn in self.fds:
                        yield Unregister(conn)
                    continue
                yield Read(conn)
                # Even if the read failed (conn is now garbage), what it had
                # received before is delivered: nothing is lost.
                inbox = conn._core.inbox
                if inbox:
                    # popleft, not clear(): another thread may be appending.
                    events: Events = [inbox.popleft() for _ in range(len(inbox))]
                    yield conn, events
                    last = clock()
                self._take_pokes()
                yield from self._sync()
            if self.timeout == 0 and polled:
                return
            if not self._connections:
                return
            timeout = self.timeout
            if timeout is None:
                yield Wait(None)
            elif timeout == 0:
                continue  # set to zero meanwhile: poll once, then end
            else:
                remaining = last + timeout - clock()
                if remaining > 0:
                    yield Wait(remaining)
                else:
                    yield None
                    last = clock()
