"""Reconnecting a PubSub: the gap marker and the retry loop, without I/O.

:class:`Reconnected` is the marker a listener finds in its event stream after
its connection was lost and restored: notifications sent in between were not
received, so a cache should resync.

:func:`reconnect_plan` is the retry loop as a generator, driven by the sync
and the asyncio PubSub alike (as psycopg's generators are): it yields
:class:`Sleep` (wait that long, unless the PubSub is closed meanwhile) and
:class:`Attempt` (open a new connection, LISTEN every channel again, check
it, run the reconnect hooks). The driver answers an attempt that failed by
throwing its exception into the generator, which decides: a retryable error
(the server is down, restarting, a standby during a failover) is logged and
retried after the next backoff delay; any other (a pooler that drops LISTEN)
propagates. When the backoff is exhausted, or the caller's *deadline* passes,
the generator raises :class:`~pgcast.ConnectionLostError` naming the last
error. When an attempt succeeds, the generator returns the number of attempts.

The order a driver follows, which durable channels rely on:

1. the lost connection is closed; the inbox keeps what was read before;
2. attempts until one succeeds: connect, then LISTEN every channel again and
   confirm it with ``pg_listening_channels()``;
3. the *reconnect hooks* run (:meth:`pgcast.PubSub.add_reconnect_hook`): this
   is where durable replay fetches what was missed; events a hook appends to
   the inbox come before the marker;
4. the user's ``on_reconnect(marker)`` callback is called;
5. the marker is appended to the inbox and the iterating thread or task woken.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg.conninfo

from ._backoff import Backoff
from ._errors import ConnectError, ConnectionLostError, HotStandbyError
from ._health import check_interval, keepalive_options

__all__ = [
    "RETRYABLE",
    "RETRY_LOG_EVERY",
    "Attempt",
    "OnReconnect",
    "Reconnected",
    "Resilience",
    "RetryLog",
    "Sleep",
    "add_keepalives",
    "describe_attempts",
    "reconnect_plan",
    "resilience",
    "utcnow",
]

logger = logging.getLogger("pgcast")


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The connection was lost and is back: notifications may have been missed.

    Delivered in the event stream (``events()``, ``wait()``, ``get_event()``)
    and to ``on_reconnect``, only after every channel was LISTENed again, so
    anything sent after the marker is received.
    """

    lost_at: datetime
    """When the loss was noticed (UTC)."""

    restored_at: datetime
    """When the new connection was ready, every channel LISTENed again (UTC)."""

    error: str
    """Why the connection was considered lost."""

    attempts: int = 1
    """How many connection attempts it took."""

    @property
    def downtime(self) -> timedelta:
        """How long the PubSub was not listening: ``restored_at - lost_at``."""
        return self.restored_at - self.lost_at


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait *seconds* before the next attempt (end early if closed)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Attempt:
    """Try to connect and restore the subscriptions; throw any failure back."""

    number: int
    """1 for the first attempt of a series."""


#: Failures worth another attempt: the server is down, restarting, refusing
#: connections for now, or (during a failover) still a standby.
RETRYABLE: tuple[type[BaseException], ...] = (
    ConnectError,
    ConnectionLostError,
    HotStandbyError,
    psycopg.OperationalError,
    OSError,
)


#: The longest a series of failed attempts goes unmentioned in the log after
#: its first failure: one summary per this many seconds, not one per attempt.
RETRY_LOG_EVERY = 5.0


class RetryLog:
    """When to log the failures of a series of attempts, without flooding:
    the first at once, then at most one summary each *every* seconds (a
    ``Backoff(initial=0)`` against a refusing server tries hundreds of
    times a second). Pure: the caller passes the time."""

    __slots__ = ("_every", "_first_held", "_held", "_last")

    def __init__(self, every: float = RETRY_LOG_EVERY) -> None:
        self._every = every
        self._last: float | None = None
        self._held = 0  # failures not logged since the last record
        self._first_held = 0  # the number of the first of them

    def failed(self, number: int, now: float) -> tuple[int, int] | None:
        """Attempt *number* failed at *now*: the range of attempt numbers
        ``(first, last)`` a record written now covers, or None: hold it."""
        if self._held == 0:
            self._first_held = number
        self._held += 1
        if self._last is not None and now - self._last < self._every:
            return None
        self._last = now
        first, self._held = self._first_held, 0
        return first, number


def reconnect_plan(
    backoff: Backoff,
    reason: BaseException,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> Generator[Sleep | Attempt, None, int]:
    """The retry loop after losing a connection because of *reason*.

    *deadline* (on *clock*) bounds the whole loop on top of *backoff*'s own
    limits: a notify waiting for the connection passes its timeout here.
    """
    started = clock()
    attempts = backoff.attempts(started, rand)
    last: BaseException = reason
    quiet = RetryLog()
    while True:
        now = clock()
        delay = attempts.next_delay(now)
        if delay is not None and deadline is not None:
            delay = None if now >= deadline else min(delay, deadline - now)
        if delay is None:
            raise ConnectionLostError(
                f"could not reconnect to PostgreSQL: {attempts.count} attempt(s) in "
                f"{clock() - started:.1f} s failed; last error: {last}"
            ) from last
        if delay > 0:
            yield Sleep(delay)
        try:
            yield Attempt(attempts.count)
        except RETRYABLE as exc:
            last = exc
            covered = quiet.failed(attempts.count, clock())
            if covered is not None:
                first, number = covered
                logger.warning(
                    "pgcast: reconnect %s failed: %s", describe_attempts(first, number),
                    exc, extra={"attempt": attempts.count},
                )
            continue
        return attempts.count


def describe_attempts(first: int, last: int) -> str:
    """``attempt 3`` or ``attempts 3-812 (810 of them; the last error)``:
    what a :class:`RetryLog` record covers."""
    if first == last:
        return f"attempt {last}"
    return f"attempts {first}-{last} ({last - first + 1} of them; the last error)"


def utcnow() -> datetime:
    """The time markers carry: aware, UTC."""
    return datetime.now(UTC)


#: ``on_reconnect``: called with each marker (a coroutine function is awaited
#: by the asyncio PubSub, run to completion by the sync one).
OnReconnect = Callable[[Reconnected], object]


@dataclass(frozen=True, slots=True)
class Resilience:
    """How a PubSub survives a lost connection; built from ``connect()``'s
    keyword arguments by :func:`resilience`, shared by both clients."""

    reconnect: bool = True
    backoff: Backoff = Backoff()  # noqa: RUF009 (frozen, so sharing it is safe)
    health_check_interval: float = 30.0
    notify_timeout: float = 30.0
    on_reconnect: OnReconnect | None = None
    #: ``on_gap`` (see :mod:`pgcast._gap`), called with each Gap marker.
    on_gap: Callable[[Any], object] | None = None


def resilience(
    reconnect: bool = True,
    reconnect_backoff: Backoff | None = None,
    health_check_interval: float | None = 30.0,
    notify_timeout: float = 30.0,
    on_reconnect: OnReconnect | None = None,
    *,
    on_gap: Callable[[Any], object] | None = None,
) -> Resilience:
    """Validate ``connect()``'s reconnect and health-check arguments."""
    if not isinstance(reconnect, bool):
        raise TypeError(f"reconnect must be True or False, not {reconnect!r}")
    if reconnect_backoff is not None and not isinstance(reconnect_backoff, Backoff):
        raise TypeError(
            f"reconnect_backoff must be a pgcast.Backoff, not {type(reconnect_backoff).__name__}"
        )
    if isinstance(notify_timeout, bool) or not isinstance(notify_timeout, int | float):
        raise TypeError(f"notify_timeout must be a number of seconds, not {notify_timeout!r}")
    if not notify_timeout >= 0:
        raise ValueError(f"notify_timeout must be >= 0 seconds, got {notify_timeout}")
    if on_reconnect is not None and not callable(on_reconnect):
        raise TypeError(f"on_reconnect must be callable, not {type(on_reconnect).__name__}")
    if on_gap is not None and not callable(on_gap):
        raise TypeError(f"on_gap must be callable, not {type(on_gap).__name__}")
    return Resilience(
        reconnect,
        reconnect_backoff or Backoff(),
        check_interval(health_check_interval),
        float(notify_timeout),
        on_reconnect,
        on_gap,
    )


def add_keepalives(conninfo: str, options: dict[str, Any], interval: float) -> dict[str, Any]:
    """*options* plus libpq's TCP keepalive settings for a health check
    *interval*, where neither the DSN nor the caller set them."""
    try:
        given = psycopg.conninfo.conninfo_to_dict(conninfo) if conninfo else {}
    except psycopg.Error:
        given = {}  # a bad DSN: psycopg.connect reports it
    merged = dict(options)
    for key, value in keepalive_options(interval).items():
        if key not in given:
            merged.setdefault(key, value)
    return merged
