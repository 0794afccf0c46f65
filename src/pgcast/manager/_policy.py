"""The I/O-free heart of a NotificationManager, driven by the sync and asyncio managers.

A manager watches a set of PubSubs and hands out, one connection at a time,
``(pubsub, [events...])``: the connection and every event picked up on it, or
``None`` as an idle event. Everything that needs no waiting is decided here,
once, for both drivers (:mod:`pgcast.manager._manager` and :mod:`pgcast.manager._manager_async`):

* :class:`~pgcast.manager._connection_set.ConnectionSet` is the user's
  ``connections`` set; it counts its changes so the manager notices
  additions and removals without comparing sets at every wake-up.
* :class:`ManagerCore` keeps the *ready* connections (those to read before
  waiting again), the ``garbage`` set, and the registrations the driver made.
* :meth:`ManagerCore.steps` is the iteration policy, a generator yielding
  requests the driver carries out, :class:`Register`, :class:`Unregister`,
  :class:`Read`, :class:`HealthTick` and :class:`~pgcast._core.Wait`, and the
  values the user sees.
* The health checks of the connections (:mod:`pgcast._health`): a PubSub
  probes its connection from its own wait, which a managed PubSub never
  runs, so the manager decides when each connection's check is due and asks
  the driver to run it.

The driver's side of the contract:

* ``Register(c)``: start watching ``c.fileno()`` for readability and record
  the descriptor with :meth:`ManagerCore.registered`; on any exception call
  :meth:`ManagerCore.lose`.
* ``Unregister(c)``: stop watching the descriptor recorded for ``c`` and call
  :meth:`ManagerCore.unregistered`.
* ``Read(c)``: read without blocking what arrived on ``c`` into its inbox
  (``PubSub.read_ready()``); on any exception call :meth:`ManagerCore.lose`. When
  that returns True (``reconnect`` is on and the connection was lost), stop
  watching ``c``, reconnect it in the background (``c.reconnect()``) and
  report the outcome with :meth:`ManagerCore.reconnected`, waking the
  manager.
* ``HealthTick(c)``: run ``c.health_tick()`` (it sends the probe if one is
  due, raises :class:`~pgcast.ConnectionLostError` if the last one went
  unanswered); on any exception call :meth:`ManagerCore.lose`, then as for
  ``Read``.
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
* Health checks: a connection whose network silently dropped it (no FIN, no
  RST: its socket never becomes readable) is found dead by its probe within
  about two of its ``health_check_interval`` and then treated like any
  other lost connection: garbage, or reconnected with ``reconnect``. The
  manager never waits past the earliest time a connection's check is due.
* A wake-up costs the same whatever the number of idle connections: the
  driver registers each socket once, readiness names the connections to read,
  the connection set is compared with the registrations only after it
  changed, and the health checks' times are kept in a heap looked at only
  at its top (see :meth:`ManagerCore._due_checks`).
"""

from __future__ import annotations

import heapq
import itertools
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeAlias, TypeVar

from .._core import Wait, check_timeout
from .._errors import ConnectionLostError
from .._event import Event
from .._gap import Gap
from .._reconnect import Reconnected
from ._connection_set import ConnectionSet

__all__ = [
    "ConnectionSet",
    "Events",
    "HealthTick",
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

    @property
    def closed(self) -> bool: ...

    @property
    def wake_callback(self) -> Callable[[], object] | None: ...

    def set_wake_callback(self, callback: Callable[[], object] | None) -> None:
        """Called when something happens off the socket; the manager sets it."""

    @property
    def health_check_interval(self) -> float: ...

    def health_check_due(self) -> float | None: ...

    def listening_channels(self) -> frozenset[str]: ...

    def fileno(self) -> int: ...

    def take_pending(self) -> list[Event | Reconnected | Gap]: ...


C = TypeVar("C", bound=Managed)


@dataclass(frozen=True, slots=True)
class _OnConnection(Generic[C]):
    """A request about one connection."""

    conn: C


@dataclass(frozen=True, slots=True)
class Register(_OnConnection[C]):
    """Start watching the connection's socket."""


@dataclass(frozen=True, slots=True)
class Unregister(_OnConnection[C]):
    """Stop watching the connection's socket."""


@dataclass(frozen=True, slots=True)
class Read(_OnConnection[C]):
    """Read, without blocking, what arrived on the connection into its inbox."""


@dataclass(frozen=True, slots=True)
class HealthTick(_OnConnection[C]):
    """Run the connection's health check (``health_tick()``): it is due."""


#: The events of one connection: notifications, and with ``reconnect`` its
#: :class:`~pgcast.Reconnected` markers, in the order they came.
Events: TypeAlias = list[Event | Reconnected | Gap]
#: What :meth:`ManagerCore.steps` yields: a request, or a value for the user.
Step: TypeAlias = (
    "Register[C] | Unregister[C] | Read[C] | HealthTick[C] | Wait | tuple[C, Events] | None"
)


def weak_callback(method: Callable[[C], object], conn: C) -> Callable[[], None]:
    """``method(conn)`` as a callback that does not keep *method*'s object alive.

    A manager leaves one on each PubSub it watches (``set_wake_callback``), so a
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
        # The health checks: a heap of (when due, entry number, connection),
        # one live entry per watched connection with checks on, the number
        # of which _checks holds; other entries are stale, dropped when they
        # reach the top. See _due_checks.
        self._heap: list[tuple[float, int, C]] = []
        self._checks: dict[C, int] = {}
        self._entry = itertools.count()

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
        if conn not in self._checks:
            self._schedule(conn, conn.health_check_due())

    def unregistered(self, conn: C) -> None:
        """The driver no longer watches *conn*."""
        self.fds.pop(conn, None)
        if self._checks.pop(conn, None) is not None and len(self._heap) > 2 * len(
            self._checks
        ) + 64:
            # Connections added and removed faster than their checks come
            # due would grow the heap with stale entries: keep the live ones.
            checks = self._checks
            self._heap = [e for e in self._heap if checks.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

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

    # -- the health checks ---------------------------------------------------

    def _schedule(self, conn: C, when: float | None) -> None:
        """Look at *conn*'s health check at *when* (None: never)."""
        if when is None:
            self._checks.pop(conn, None)
            return
        entry = next(self._entry)
        self._checks[conn] = entry
        heapq.heappush(self._heap, (when, entry, conn))

    def _due_checks(self, now: float) -> list[C]:
        """The connections whose health check is due at *now*, taken off the
        heap; the top of the heap is then no later than the next one due.

        Called only when the top's time has come. A connection heard from
        since its entry was pushed is due later than the entry says (times
        only move later, :meth:`~pgcast._health.HealthCheck.due`): its entry
        is moved then, once, not at each wake-up. So a wake-up costs a look
        at the top's time, plus, when it has come, the checks really due
        (one per connection and interval at most, which an idle connection's
        probe needs anyway) and the entries moved (one per busy connection
        and interval at most; a busy manager wakes then anyway).
        """
        heap = self._heap
        checks = self._checks
        due: list[C] = []
        while heap:
            when, entry, conn = heap[0]
            if checks.get(conn) != entry:
                heapq.heappop(heap)  # stale: unwatched, or moved since
                continue
            actual = conn.health_check_due()
            if actual is None:
                heapq.heappop(heap)
                del checks[conn]
            elif actual > when:
                entry = next(self._entry)
                checks[conn] = entry
                heapq.heapreplace(heap, (actual, entry, conn))
            elif when > now:
                break
            else:
                heapq.heappop(heap)
                del checks[conn]
                due.append(conn)
        return due

    def _checked(self, conn: C, now: float) -> None:
        """*conn*'s health check ran at *now*: when to look again."""
        if conn not in self.fds or conn not in self._connections or conn in self._checks:
            return  # lost (garbage or reconnecting: registered afresh), or removed
        when = conn.health_check_due()
        if when is not None and when <= now:
            # No probe went out: the connection listens to nothing (look
            # again an interval later: it may start to), or a command or a
            # reconnect had the connection (soon over: look again sooner).
            interval = conn.health_check_interval
            when = now + (interval / 10 if conn.listening_channels() else interval)
        self._schedule(conn, when)

    def _health_wait(self, now: float) -> float | None:
        """Seconds until the next health check is due (None: none is)."""
        heap = self._heap
        return max(0.0, heap[0][0] - now) if heap else None

    # -- the iteration -------------------------------------------------------

    def steps(self, clock: Callable[[], float] = time.monotonic) -> Iterator[Step[C]]:
        """One iteration of the manager: requests for the driver and values.

        *clock* must be the clock of the connections' health checks
        (``time.monotonic``, as :class:`~pgcast._core.Core`'s).
        """
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
                events: Events = conn.take_pending()
                if events:
                    yield conn, events
                    last = clock()
                self._take_pokes()
                yield from self._sync()
            heap = self._heap
            if heap and heap[0][0] <= (now := clock()):
                due = self._due_checks(now)
                if due:
                    for conn in due:
                        yield HealthTick(conn)
                        self._checked(conn, now)
                    # A check may have lost its connection, and its probe's
                    # answer is read when its socket says so: back to the top.
                    continue
            if self.timeout == 0 and polled:
                return
            if not self._connections:
                return
            timeout = self.timeout
            if timeout is None:
                yield Wait(self._health_wait(clock()) if self._heap else None)
            elif timeout == 0:
                continue  # set to zero meanwhile: poll once, then end
            else:
                now = clock()
                remaining = last + timeout - now
                if remaining > 0:
                    if self._heap:
                        check = self._health_wait(now)
                        if check is not None and check < remaining:
                            remaining = check
                    yield Wait(remaining)
                else:
                    yield None
                    last = clock()
