"""What :class:`pgcast.PubSub` and :class:`pgcast.aio.AsyncPubSub` share to
the letter: the members that wait for nothing (properties, the subscription
set, the exception handler, the state a PubSub starts with and what a
reconnect's new connection sets, the plans of the iterators, the checks and
messages of the command and reconnect paths).

The sequences that run commands are in :mod:`pgcast._ops`; waiting, locking
and reconnecting are each driver's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import pq

from ._core import Core, ExceptionHandler, Wait, check_timeout, plan, wrap_error
from ._errors import ClosedError, ConnectionLostError, NotSentError, PgcastError
from ._event import Event
from ._reconnect import Reconnected, Resilience

__all__ = ["PubSubBase"]

C = TypeVar("C", psycopg.Connection[Any], psycopg.AsyncConnection[Any])


class PubSubBase(Generic[C]):
    """The members of a PubSub that its two drivers share."""

    #: The class's name, for messages ("this PubSub is closed").
    _kind = "PubSub"
    #: Who reconnects, for messages: "thread" or "task".
    _actor = "thread"
    _conn: C
    _pgconn: pq.abc.PGconn
    _core: Core
    _res: Resilience
    _closed: bool
    _generation: int
    _queries: int
    _in_flight: int
    _on_wake: Callable[[], object] | None

    @property
    def connection(self) -> C:
        """The psycopg connection underneath. Run no queries on it yourself."""
        return self._conn

    @property
    def backend_pid(self) -> int:
        """The server process id of this connection, the one ``notify()`` uses
        (``pg_backend_pid()``: through a pooler, the pid the login gave is not
        PostgreSQL's)."""
        return self._core.backend_pid

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called, or the connection broke and
        ``reconnect=False`` (a reconnecting PubSub is not closed by a loss)."""
        return self._closed or (self._conn.closed and not self._res.reconnect)

    @property
    def generation(self) -> int:
        """How many times this PubSub reconnected (0 on its first connection)."""
        return self._generation

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pid={self.backend_pid}"
        return f"<pgcast.{self._kind} {state} channels={sorted(self._core.channels)!r}>"

    def listening_channels(self) -> frozenset[str]:
        """The exact names of the channels listened to now."""
        return frozenset(self._core.channels)

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        """Set what is called with ``(exception, event)`` when a handler fails.

        ``None`` restores the default, which logs to the ``pgcast`` logger.
        """
        self._core.exception_handler = handler

    # -- for the drivers -----------------------------------------------------

    def _setup(self, conn: C, resilience: Resilience | None) -> None:
        """The state both drivers start with, on *conn* (autocommit, used by
        nothing else); then the driver adds its own waiting machinery."""
        if not conn.autocommit:
            article = "an" if self._kind[0] in "AEIOU" else "a"
            raise ValueError(f"{article} {self._kind} needs a connection in autocommit mode")
        self._res = res = resilience or Resilience()
        self._conn = conn
        self._pgconn = conn.pgconn
        self._core = Core(res.health_check_interval)
        self._core.new_connection(conn.info.backend_pid)
        self._closed = False
        # Bumped by every reconnect: a thread or task that saw the connection
        # fail under generation g reconnects only if nobody did since.
        self._generation = 0
        # Commands running or about to run: the iterating thread or task sends
        # no probe meanwhile (libpq runs one command at a time).
        self._queries = 0
        self._in_flight = 0  # commands on the wire (not transactions held open)
        # Set by a NotificationManager: called whenever this PubSub wakes its
        # own waiter, i.e. on events taken in off the socket and on close
        # (from any thread, for the sync one).
        self._on_wake = None
        conn.add_notify_handler(self._core.on_notify)

    def _adopt(self, conn: C) -> None:
        """Make *conn*, just opened by a reconnect, this PubSub's connection."""
        conn.add_notify_handler(self._core.on_notify)
        self._conn = conn
        self._pgconn = conn.pgconn
        self._core.new_connection(conn.info.backend_pid)
        self._generation += 1

    def _events_plan(
        self, select_timeout: float | None, yield_timeouts: bool, ignore_own: bool
    ) -> Iterator[Wait | Event | Reconnected | None]:
        """The steps of ``events()``, its arguments checked."""
        timeout = check_timeout("select_timeout", select_timeout)
        if timeout == 0:
            raise ValueError("select_timeout must be > 0 (use get_event() to poll)")
        own = self._core.own_pids if ignore_own else None
        return plan(self._core.inbox, timeout=timeout, idle=yield_timeouts, skip_pids=own)

    def _run_plan(self) -> Iterator[Wait | Event | Reconnected | None]:
        """The steps of ``run()`` / ``run_forever()``: every event, no idling."""
        return plan(self._core.inbox, timeout=None, idle=False)

    def _wait_plan(self, timeout: float | None) -> Iterator[Wait | Event | Reconnected | None]:
        """The steps of ``wait()``, its argument checked."""
        t = check_timeout("timeout", timeout)
        return plan(self._core.inbox, timeout=t, idle=t is not None, once=t == 0)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"this {self._kind} is closed")
        if self._conn.closed:
            raise ConnectionLostError("the connection to PostgreSQL is closed")

    def _command_failed(self, exc: psycopg.Error, generation: int) -> PgcastError:
        """What to raise for *exc*, raised by a command sent on connection
        *generation*: a connection lost while a command is on the wire cannot
        tell whether the server ran it, so that is said, and not retried."""
        error = wrap_error(exc)
        if isinstance(error, ConnectionLostError):
            if generation == self._generation:
                self._core.lost(error)
            return ConnectionLostError(
                f"{error} (while the command was on its way: the server may or "
                "may not have run it)"
            )
        return error

    def _check_reconnect(self, exc: ConnectionLostError, force: bool) -> None:
        """Raise *exc* itself (the connection counted lost) when reconnecting
        is off and this is not a forced :meth:`reconnect`."""
        if not (self._res.reconnect or force):
            self._core.lost(exc)
            raise exc

    def _reconnect_busy(self, exc: ConnectionLostError) -> ConnectionLostError:
        """The error when another thread or task held the reconnect past the
        caller's deadline."""
        return ConnectionLostError(
            f"another {self._actor} is restoring the connection and was not done in "
            f"time; the connection was lost: {exc}"
        )

    def _not_sent(self, gave_up: ConnectionLostError) -> NotSentError:
        """The error of a command whose connection did not come back in time."""
        return NotSentError(
            f"not sent: the connection to PostgreSQL was lost and not "
            f"restored within notify_timeout={self._res.notify_timeout:g} s "
            f"({gave_up})"
        )
