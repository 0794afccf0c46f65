"""The I/O-free heart of a PubSub, driven by the sync and the asyncio clients.

A PubSub is a connection plus the state kept here: the channels listened to,
the *inbox* of events read from the socket but not yet handed to the user, and
the handlers of the callback interface. The drivers (:mod:`pgcast.client` and
:mod:`pgcast.aio`) own the waiting: a selector or the event loop's reader. Every
decision that needs no waiting lives here, once:

* :meth:`Core.plan_listen` / :meth:`Core.plan_unlisten` validate names and
  compute the SQL that changes the subscription;
* :func:`notify_query` / :func:`notify_many_query` check payloads and build the
  statements that publish;
* :meth:`Core.read` takes what has arrived on the socket (never blocking);
* :func:`plan` is the iteration policy of ``events()``, ``wait()`` and the idle
  events: a generator that yields :class:`Wait` requests, which the driver
  answers by waiting on the socket and calling :meth:`Core.read`, and the
  values the user should see (:class:`Event` or ``None``).
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import psycopg
from psycopg import pq

from ._channels import check_channel, check_channels, listen_sql, unlisten_sql
from ._errors import ConnectionLostError, DatabaseError, PgcastError
from ._event import Event
from ._payload import Payload, encode_payload

__all__ = [
    "NOTIFY_MANY_SQL",
    "NOTIFY_SQL",
    "Core",
    "ExceptionHandler",
    "Handler",
    "Wait",
    "connect_args",
    "notify_many_query",
    "notify_query",
    "plan",
    "wrap_error",
]

logger = logging.getLogger("pgcast")

#: A callback for :meth:`PubSub.subscribe`: a function or a coroutine function.
Handler: TypeAlias = Callable[[Event], object]
#: Called with the exception a handler raised and the event it was handling.
ExceptionHandler: TypeAlias = Callable[[BaseException, Event], None]

NOTIFY_SQL = "SELECT pg_notify(%s, %s)"
# One statement, so one round trip and one transaction in autocommit mode; the
# function scan over unnest() calls pg_notify in array order.
NOTIFY_MANY_SQL = "SELECT count(pg_notify(c, p)) FROM unnest(%s::text[], %s::text[]) AS t(c, p)"


def notify_query(channel: str, payload: Payload = "") -> tuple[str, tuple[str, str]]:
    """The statement and parameters that send one notification, checked."""
    return NOTIFY_SQL, (check_channel(channel), encode_payload(payload))


def notify_many_query(
    messages: Iterable[tuple[str, Payload]],
) -> tuple[str, tuple[list[str], list[str]]] | None:
    """The statement sending every message in one round trip, or None if empty.

    Every channel and payload is checked first: a bad one means nothing is sent.
    """
    channels: list[str] = []
    payloads: list[str] = []
    for channel, payload in messages:
        channels.append(check_channel(channel))
        payloads.append(encode_payload(payload))
    if not channels:
        return None
    return NOTIFY_MANY_SQL, (channels, payloads)


@dataclass(frozen=True, slots=True)
class Wait:
    """A request from :func:`plan` to its driver: wait until the socket is
    readable (or until woken), at most *timeout* seconds (``None``: no limit,
    ``0``: do not wait), then :meth:`Core.read` what arrived."""

    timeout: float | None


_NOW = Wait(0)


def plan(
    inbox: deque[Event],
    *,
    timeout: float | None,
    idle: bool,
    once: bool = False,
    skip_pid: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Wait | Event | None]:
    """The iteration policy shared by ``events()`` and ``wait()``.

    Yields the events of *inbox* in order, and :class:`Wait` whenever it is
    empty. With *idle*, ``None`` is yielded after each *timeout* seconds that
    passed without an event. With *once* (py-postgresql's zero timeout), the
    socket is read once without waiting, what is pending is yielded, and the
    iteration ends. Events from *skip_pid* are dropped (``ignore_own``).

    Nothing is held back: events stay in *inbox* until yielded, so a consumer
    that stops iterating loses none of them.
    """
    if once:
        yield _NOW
        while inbox:
            event = inbox.popleft()
            if event.pid != skip_pid:
                yield event
        return
    if timeout is None:
        forever = Wait(None)
        while True:
            while inbox:
                event = inbox.popleft()
                if event.pid != skip_pid:
                    yield event
            yield forever
    deadline = clock() + timeout
    while True:
        if inbox:
            while inbox:
                event = inbox.popleft()
                if event.pid != skip_pid:
                    yield event
            deadline = clock() + timeout
        remaining = deadline - clock()
        if remaining > 0:
            yield Wait(remaining)
        else:
            if idle:
                yield None
            deadline = clock() + timeout


def check_timeout(name: str, value: float | None) -> float | None:
    """Validate a timeout argument: ``None`` or a number >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, not {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value}")
    return float(value)


def _event_from_notify(n: psycopg.Notify) -> Event:
    return Event(n.channel, n.payload, n.pid)


class Core:
    """The state of one PubSub that needs no I/O to maintain."""

    __slots__ = ("_async_handlers", "channels", "exception_handler", "handlers", "inbox")

    def __init__(self) -> None:
        self.inbox: deque[Event] = deque()
        #: The exact names LISTENed to now.
        self.channels: set[str] = set()
        self.handlers: dict[str, list[Handler]] = {}
        self._async_handlers: set[Handler] = set()
        self.exception_handler: ExceptionHandler | None = None

    # -- subscriptions -----------------------------------------------------

    def plan_listen(self, channels: Sequence[object]) -> tuple[list[str], bytes | None]:
        """Validate *channels*; return the new ones and the SQL to LISTEN them."""
        names = check_channels(channels)
        new = [c for c in dict.fromkeys(names) if c not in self.channels]
        return new, (listen_sql(new) if new else None)

    def plan_unlisten(self, channels: Sequence[object]) -> tuple[list[str] | None, bytes | None]:
        """Validate *channels* (none: all); return those to drop and the SQL."""
        if not channels:
            return None, unlisten_sql(None)
        names = check_channels(channels)
        gone = [c for c in dict.fromkeys(names) if c in self.channels]
        return gone, (unlisten_sql(gone) if gone else None)

    def did_listen(self, channels: Iterable[str]) -> None:
        self.channels.update(channels)

    def did_unlisten(self, channels: Iterable[str] | None) -> None:
        if channels is None:
            self.channels.clear()
            self.handlers.clear()
        else:
            self.channels.difference_update(channels)
        # Events already read for channels no longer listened to are dropped:
        # after unlisten() returns, nothing more arrives on them.
        if self.inbox:
            keep = [e for e in self.inbox if e.channel in self.channels]
            self.inbox.clear()
            self.inbox.extend(keep)

    # -- callbacks ---------------------------------------------------------

    def add_handler(self, channel: str, handler: Handler) -> None:
        check_channel(channel)
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        if inspect.iscoroutinefunction(handler):
            self._async_handlers.add(handler)
        self.handlers.setdefault(channel, []).append(handler)

    def remove_handlers(self, channel: str) -> None:
        check_channel(channel)
        self.handlers.pop(channel, None)

    def is_async(self, handler: Handler) -> bool:
        return handler in self._async_handlers

    def handler_failed(self, exc: BaseException, event: Event) -> None:
        """Report a handler's exception; never raises, so delivery goes on."""
        handler = self.exception_handler
        if handler is not None:
            try:
                handler(exc, event)
            except Exception:
                logger.exception("pgcast exception handler failed on %r", event)
            return
        logger.error("pgcast handler failed on %r", event, exc_info=exc)

    # -- reading -----------------------------------------------------------

    def on_notify(self, n: psycopg.Notify) -> None:
        """psycopg's notify handler: notifications that arrive during a query."""
        if n.channel in self.channels:
            self.inbox.append(_event_from_notify(n))

    def read(self, pgconn: pq.abc.PGconn) -> None:
        """Take what has arrived on the socket into the inbox, never blocking.

        The caller holds the connection's lock, so no query runs meanwhile.
        """
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as exc:
            raise ConnectionLostError(f"connection to PostgreSQL lost: {exc}") from exc
        self.take(pgconn)

    def take(self, pgconn: pq.abc.PGconn) -> None:
        """Move the notifications libpq has parsed into the inbox."""
        append = self.inbox.append
        channels = self.channels
        n = pgconn.notifies()
        while n is not None:
            channel = n.relname.decode()
            # A notification can still arrive for a channel just UNLISTENed
            # (it was queued before); the user asked not to see those.
            if channel in channels:
                append(Event(channel, n.extra.decode(), n.be_pid))
            n = pgconn.notifies()
        if pgconn.status == pq.ConnStatus.BAD:
            raise ConnectionLostError("connection to PostgreSQL lost: " + _error_text(pgconn))


def _error_text(pgconn: pq.abc.PGconn) -> str:
    msg = pgconn.error_message
    return msg.decode(errors="replace").strip() if msg else "server closed the connection"


def wrap_error(exc: psycopg.Error) -> PgcastError:
    """Map a psycopg error to the pgcast tree, keeping the server's message."""
    if isinstance(exc, psycopg.OperationalError):
        return ConnectionLostError(f"connection to PostgreSQL lost: {exc}")
    return DatabaseError(str(exc))


def connect_args(conninfo: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The arguments for ``psycopg.connect`` that every pgcast connection uses.

    No arguments at all means ``DATABASE_URL``, then libpq's ``PG*`` variables.
    The connection is in autocommit (a NOTIFY outside :meth:`transaction` is
    sent at once), speaks UTF-8 (the unit of the payload limit), and gives up
    connecting after ``connect_timeout`` seconds (10 unless given) instead of
    hanging.
    """
    if not conninfo and not kwargs:
        conninfo = os.environ.get("DATABASE_URL", "")
    options = dict(kwargs)
    # psycopg lets keyword arguments override the DSN, so a default is only
    # added where neither the DSN nor libpq's environment sets the value.
    try:
        given = psycopg.conninfo.conninfo_to_dict(conninfo) if conninfo else {}
    except psycopg.Error:
        given = {}  # a bad DSN: psycopg.connect reports it
    if "connect_timeout" not in given and "PGCONNECT_TIMEOUT" not in os.environ:
        options.setdefault("connect_timeout", 10)
    if "application_name" not in given and "PGAPPNAME" not in os.environ:
        options.setdefault("application_name", "pgcast")
    options["client_encoding"] = "UTF8"
    options["autocommit"] = True
    return conninfo, options
