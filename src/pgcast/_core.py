"""The I/O-free heart of a PubSub, driven by the sync and the asyncio clients.

A PubSub is a connection plus the state kept here: the channels listened to,
the *inbox* of events read from the socket but not yet handed to the user, and
the handlers of the callback interface (:mod:`pgcast._handlers`). The drivers
(:mod:`pgcast.client`) own the waiting: a selector or the event loop's reader.
Every decision that needs no waiting lives here, once:

* :meth:`Core.plan_listen` / :meth:`Core.plan_unlisten` validate names and
  compute the SQL that changes the subscription;
* :func:`notify_query` checks a payload and builds the statement that
  publishes it (many at once: :mod:`pgcast._notify_many`);
* :meth:`Core.read` takes what has arrived on the socket (never blocking);
* :func:`plan` (:mod:`pgcast._plan`) is the iteration policy of
  ``events()``, ``wait()`` and the idle events: a generator that yields
  :class:`Wait` requests, which the driver answers by waiting on the socket
  and calling :meth:`Core.read`, and the values the user should see
  (:class:`Event`, :class:`Reconnected` or ``None``);
* the health check (:mod:`pgcast._health`): :meth:`Core.send_probe` sends the
  round-trip probe without waiting, :meth:`Core.read` drains its answer, and
  :meth:`Core.settle` is what a query must wait for while a probe is out
  (libpq runs one command at a time);
* after a reconnect (:mod:`pgcast._reconnect`): :meth:`Core.new_connection`,
  :meth:`Core.relisten_sql`, :meth:`Core.lost` and :meth:`Core.restored`;
* on every (new) connection, :meth:`Core.identify` takes the server's own
  ``pg_backend_pid()``: behind a pooler the pid given at login is made up, and
  a different one means a pooler is in between (:attr:`Core.pooled`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime

import psycopg
from psycopg import pq

from ._channels import check_channel, check_channels, listen_sql, unlisten_sql

# check_timeout, connect_args, is_async_callable, wrap_error, Wait and plan
# are re-exported: the drivers import them from here.
from ._checks import check_timeout, connect_args, is_async_callable, wrap_error
from ._encoding import decode_channel, undecodable_event
from ._errors import ConnectionLostError
from ._event import Event
from ._gap import Gap
from ._handlers import ExceptionHandler, Handler, Handlers
from ._health import HealthCheck, probe_channel, probe_sql
from ._payload import Payload, encode_payload
from ._plan import Wait, plan
from ._reconnect import Reconnected, utcnow
from .durable._core import DurableState

__all__ = [
    "NOTIFY_SQL",
    "Core",
    "ExceptionHandler",
    "Handler",
    "Wait",
    "check_timeout",
    "connect_args",
    "is_async_callable",
    "notify_query",
    "plan",
    "wrap_error",
]

logger = logging.getLogger("pgcast")

NOTIFY_SQL = "SELECT pg_notify(%s, %s)"


def notify_query(channel: str, payload: Payload = "") -> tuple[str, tuple[str, str]]:
    """The statement and parameters that send one notification, checked."""
    return NOTIFY_SQL, (check_channel(channel), encode_payload(payload))


class Core(Handlers):
    """The state of one PubSub that needs no I/O to maintain."""

    __slots__ = (
        "backend_pid",
        "channels",
        "clock",
        "durable",
        "farewell",
        "health",
        "identified",
        "inbox",
        "last_marker",
        "outage",
        "own_pids",
        "pinned",
        "pooled",
        "probe",
        "probe_in_flight",
        "probe_listening",
    )

    def __init__(
        self, health_check_interval: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        #: Events read but not yet handed out, and :class:`Reconnected` markers.
        self.inbox: deque[Event | Reconnected | Gap] = deque()
        #: The marker of the last reconnect (None before the first).
        self.last_marker: Reconnected | None = None
        #: The exact names LISTENed to now.
        self.channels: set[str] = set()
        Handlers.__init__(self)
        self.clock = clock
        #: The probe schedule of the current connection.
        self.health = HealthCheck(health_check_interval, clock())
        #: The private channel of the current connection's probes.
        self.probe: str | None = None
        self.probe_listening = False
        #: A probe was sent and its command result is not drained yet: no
        #: other query can be sent until it is (see :meth:`settle`).
        self.probe_in_flight = False
        #: Every backend pid this PubSub had: ``ignore_own`` skips them all.
        self.own_pids: set[int] = set()
        #: When and why the connection was lost, until it is restored.
        self.outage: tuple[datetime, str] | None = None
        #: The FATAL message the server ended this connection with (on_notice).
        self.farewell: str | None = None
        #: Durable channels and log references (:mod:`pgcast.durable._core`).
        self.durable = DurableState(self.inbox)
        #: The server process of the current connection: the one given at
        #: login until :meth:`identify`, then ``pg_backend_pid()``'s.
        self.backend_pid = 0
        #: :meth:`identify` ran on the current connection.
        self.identified = False
        #: A pooler sits between this connection and PostgreSQL.
        self.pooled = False
        #: A second connection showed that the pooler pins this connection's
        #: server session (checked once per connection, at the first LISTEN).
        self.pinned = False

    # -- subscriptions -----------------------------------------------------

    def plan_listen(self, channels: Sequence[object]) -> tuple[list[str], bytes | None]:
        """Validate *channels*; return the new ones and the SQL to LISTEN them.

        The first LISTEN of a connection with health checks on also LISTENs
        the probe channel, which is never reported as a channel listened to.
        """
        names = check_channels(channels)
        new = [c for c in dict.fromkeys(names) if c not in self.channels]
        if not new:
            return new, None
        if self.health.enabled and self.probe is not None and not self.probe_listening:
            return new, listen_sql([*new, self.probe])
        return new, listen_sql(new)

    def plan_unlisten(self, channels: Sequence[object]) -> tuple[list[str] | None, bytes | None]:
        """Validate *channels* (none: all); return those to drop and the SQL."""
        if not channels:
            return None, unlisten_sql(None)
        names = check_channels(channels)
        gone = [c for c in dict.fromkeys(names) if c in self.channels]
        return gone, (unlisten_sql(gone) if gone else None)

    def did_listen(self, channels: Iterable[str]) -> None:
        """The SQL of :meth:`plan_listen` ran."""
        self.channels.update(channels)
        if self.health.enabled and self.probe is not None:
            self.probe_listening = True

    def did_unlisten(self, channels: Iterable[str] | None) -> None:
        """The SQL of :meth:`plan_unlisten` ran."""
        if channels is None:
            self.channels.clear()
            self.handlers.clear()
            self.probe_listening = False  # UNLISTEN * dropped it too
        else:
            self.channels.difference_update(channels)
            for channel in channels:  # a handler of a channel not listened to would never run
                self.handlers.pop(channel, None)
        self.durable.forget(channels)
        # Events already read for channels no longer listened to are dropped:
        # after unlisten() returns, nothing more arrives on them.
        if self.inbox:
            keep = [
                e for e in self.inbox if isinstance(e, Reconnected) or e.channel in self.channels
            ]
            self.inbox.clear()
            self.inbox.extend(keep)

    # -- reading -----------------------------------------------------------

    def on_notify(self, n: pq.PGnotify) -> None:
        """The connection's ``pgconn.notify_handler``: notifications that
        arrive during a query, as bytes (:mod:`pgcast._encoding` says why not
        psycopg's handler, which decodes them strictly)."""
        relname, pid, extra = n
        try:
            channel = relname.decode()
            payload = extra.decode()
        except UnicodeDecodeError:
            self._undecodable(relname, pid, extra)
            return
        if channel in self.channels:
            if payload.startswith("\x1e"):  # a log reference: pgcast.durable
                self.durable.admit(channel, payload, pid)
            else:
                self.inbox.append(Event(channel, payload, pid))
        elif channel == self.probe:
            self.health.heard(self.clock())

    def _undecodable(self, relname: bytes, pid: int, extra: bytes) -> None:
        # Not UTF-8: possible on a database in SQL_ASCII only (pgcast._encoding).
        channel = decode_channel(relname)
        if channel in self.channels:
            event = undecodable_event(channel, extra, pid)
            if event.payload.startswith("\x1e"):  # a log reference: the log has it
                self.durable.admit(channel, event.payload, pid)
            else:
                self.inbox.append(event)

    def read(self, pgconn: pq.abc.PGconn) -> None:
        """Take what has arrived on the socket into the inbox, never blocking.

        The caller holds the connection's lock, so no query runs meanwhile.
        The answer to an outstanding probe is drained here.
        """
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as exc:
            raise self._lost_error(f"connection to PostgreSQL lost: {exc}") from exc
        if self.probe_in_flight:
            self._drain_probe(pgconn)
        self.take(pgconn)

    def take(self, pgconn: pq.abc.PGconn) -> None:
        """Move the notifications libpq has parsed into the inbox.

        This loop runs once per notification received: it is the receive hot
        path (benchmarks/bench_receive.py), so it avoids what costs there:
        attribute lookups on psycopg's PGnotify (it is a tuple: unpack it),
        and Event's Python-level ``__new__`` (``tuple.__new__`` builds the
        same NamedTuple without the extra frame).
        """
        notifies = pgconn.notifies
        n = notifies()
        if n is not None:
            self.health.heard(self.clock())
            append = self.inbox.append
            channels = self.channels
            while n is not None:
                relname, pid, extra = n
                try:  # costs nothing unless raised
                    channel = relname.decode()
                    payload = extra.decode()
                except UnicodeDecodeError:  # see pgcast._encoding
                    self._undecodable(relname, pid, extra)
                    n = notifies()
                    continue
                # A notification can still arrive for a channel just UNLISTENed
                # (it was queued before); the user asked not to see those.
                # Probes (not in channels) end here too.
                if channel in channels:
                    # payload.startswith("\x1e"), a log reference for
                    # pgcast.durable, tested the cheaper way: only strings
                    # starting with \x1e sort between these two.
                    if "\x1e" <= payload < "\x1f":
                        self.durable.admit(channel, payload, pid)
                    else:
                        append(_new_tuple(Event, (channel, payload, pid)))
                n = notifies()
        if pgconn.status == pq.ConnStatus.BAD:
            raise self._lost_error("connection to PostgreSQL lost: " + _error_text(pgconn))

    # -- health check --------------------------------------------------------

    def wait_time(self, timeout: float | None) -> float | None:
        """How long a driver may wait for the socket, given the caller's
        *timeout*: no longer than the next probe or probe expiry is due."""
        if not self.channels or not self.health.enabled:
            return timeout
        due = self.health.next_check(self.clock())
        if due is None:
            return timeout
        return due if timeout is None else min(timeout, due)

    def wants_probe(self) -> bool:
        """A probe is due: the PubSub listens and heard nothing for an interval."""
        return (
            bool(self.channels)
            and not self.probe_in_flight
            and self.probe is not None
            and self.health.should_probe(self.clock())
        )

    def send_probe(self, pgconn: pq.abc.PGconn) -> None:
        """Send the probe without waiting for its answer (the caller holds the
        connection's lock and knows no query is running)."""
        assert self.probe is not None
        try:
            pgconn.send_query(probe_sql(self.probe))
            pgconn.flush()
        except psycopg.OperationalError as exc:
            raise self._lost_error(f"connection to PostgreSQL lost: {exc}") from exc
        self.probe_in_flight = True
        self.health.probe_sent(self.clock())

    def _drain_probe(self, pgconn: pq.abc.PGconn) -> None:
        # get_result() blocks while libpq is busy, so only call it when not;
        # the probe is answered when libpq is ready for the next command.
        while not pgconn.is_busy():
            if pgconn.get_result() is None:
                self.probe_in_flight = False
                self.health.heard(self.clock())
                return

    def on_notice(self, diag: psycopg.errors.Diagnostic) -> None:
        """The connection's notice handler. It keeps the FATAL (or PANIC)
        message a server sends before it ends an idle session (the
        termination by ``pg_terminate_backend()``, ``idle_session_timeout``,
        a shutdown): libpq hands it over as a notice, and the error of the
        read that then fails says only "server closed the connection"."""
        if diag.severity_nonlocalized in ("FATAL", "PANIC"):
            code = f" ({diag.sqlstate})" if diag.sqlstate else ""
            self.farewell = f"{diag.severity}: {diag.message_primary}{code}"

    def _lost_error(self, message: str) -> ConnectionLostError:
        # Recorded here, so the marker says why, whichever thread (or
        # supervisor calling reconnect()) then restores the connection.
        if self.farewell is not None:  # why, where libpq says "closed unexpectedly"
            message = f"connection to PostgreSQL lost: the server ended it: {self.farewell}"
        error = ConnectionLostError(message)
        self.lost(error)
        return error

    def check_health(self) -> None:
        """Raise :class:`ConnectionLostError` if the probe went unanswered."""
        now = self.clock()
        if self.health.is_dead(now):
            raise self._lost_error(self._dead_message(now))

    def _dead_message(self, now: float) -> str:
        return (
            f"no answer from PostgreSQL to the health check for "
            f"{self.health.silence(now):.1f} s (health_check_interval="
            f"{self.health.interval:g} s): the network dropped the connection"
        )

    def settle(self, pgconn: pq.abc.PGconn) -> Iterator[Wait]:
        """Before a query: read until the outstanding probe is answered.

        Yields :class:`Wait` (for the socket, with the connection's lock held);
        raises :class:`ConnectionLostError` if the probe expires first, in
        which case the query was not sent.
        """
        # Twice: a server ending the session (pg_terminate_backend, shutdown)
        # sends its FATAL message, then closes; one read may take the message
        # only, the second finds the end of the stream. Known lost here means
        # nothing was sent yet.
        self.read(pgconn)
        while True:
            self.read(pgconn)
            if not self.probe_in_flight:
                return
            deadline = self.health.deadline()
            now = self.clock()
            if deadline is None:  # health checks turned off meanwhile
                deadline = now + 1.0
            if now >= deadline:
                raise ConnectionLostError(self._dead_message(now))
            yield Wait(deadline - now)

    # -- reconnecting --------------------------------------------------------

    def new_connection(self, backend_pid: int) -> None:
        """A (new) connection is in place, whose login gave *backend_pid*:
        reset its probe state; :meth:`identify` is to follow."""
        self.backend_pid = backend_pid
        self.farewell = None
        self.identified = self.pooled = self.pinned = False
        self.probe = probe_channel(backend_pid)
        self.probe_listening = False
        self.probe_in_flight = False
        self.health.reset(self.clock())
        # Before the channels are LISTENed again: durable channels hold back
        # live notifications until the replay has caught up.
        self.durable.reconnected()

    def identify(self, server_pid: int) -> bool:
        """``pg_backend_pid()`` on the new connection answered *server_pid*:
        from now on it is the backend pid (``ignore_own``, the probe channel).

        Returns whether a pooler is in between: PgBouncer answers the login
        itself, with a made-up pid (even a negative one), so the two differ.
        """
        self.pooled = server_pid != self.backend_pid
        self.backend_pid = server_pid
        self.identified = True
        self.own_pids.add(server_pid)
        if not self.probe_listening:  # it runs before any LISTEN; be sure
            self.probe = probe_channel(server_pid)
        return self.pooled

    def lost(self, error: BaseException | str) -> None:
        """Record the loss; the first one counts until :meth:`restored`."""
        if self.outage is None:
            self.outage = (utcnow(), str(error) or type(error).__name__)

    def relisten_sql(self) -> bytes | None:
        """The LISTEN for every channel (and the probe) on a new connection."""
        if not self.channels:
            return None
        names = sorted(self.channels)
        if self.health.enabled and self.probe is not None:
            names.append(self.probe)
        return listen_sql(names)

    def listen_check(self, new: Iterable[str]) -> tuple[list[str], int]:
        """What :data:`~pgcast.diagnostics.VERIFY_NEW_SQL` checks after a
        LISTEN of *new* (done): those channels and the probe's, and how many
        the session must list in all."""
        probe = [self.probe] if self.probe_listening and self.probe is not None else []
        return [*new, *probe], len(self.channels) + len(probe)

    def expected_listening(self) -> frozenset[str]:
        """What ``pg_listening_channels()`` must show on this connection."""
        if self.probe_listening and self.probe is not None:
            return frozenset((*self.channels, self.probe))
        return frozenset(self.channels)

    def restored(self, attempts: int) -> Reconnected:
        """The marker for the outage that just ended (not yet delivered)."""
        lost_at, error = self.outage or (utcnow(), "reconnect requested")
        self.outage = None
        self.last_marker = Reconnected(lost_at, utcnow(), error, attempts)
        return self.last_marker


# Builds an Event (a NamedTuple) without its Python-level __new__; see take().
_new_tuple = tuple.__new__


def _error_text(pgconn: pq.abc.PGconn) -> str:
    msg = pgconn.error_message
    return msg.decode(errors="replace").strip() if msg else "server closed the connection"
