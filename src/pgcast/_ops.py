"""The sequences of a PubSub's methods, written once for both drivers.

Each public method of :class:`pgcast.PubSub` and :class:`pgcast.aio.AsyncPubSub`
that runs commands is a sequence: what to send, in which order, what to do
with the rows, what to undo when something fails. Those sequences are the
generators here (psycopg's ``generators.py`` is the model): they do no I/O,
they *yield requests* and receive the answers. The two drivers each have one
``_run`` (sync in :mod:`pgcast.client`, ``async`` in :mod:`pgcast.aio`) that
executes the requests and sends the answers back, so a method is a thin call::

    def listen(self, *channels, ...):          # client.py
        return self._run(ops.listen(self, channels, ...))

    async def listen(self, *channels, ...):    # aio.py
        return await self._run(ops.listen(self, channels, ...))

The requests, and what the driver answers:

* a plain ``(sql, params)`` tuple (the :data:`pgcast._durable_schema.Steps`
  protocol, so durable steps are run with ``yield from``): run the query as a
  command, answer its rows;
* :class:`Execute`: run a command, answer ``None`` (no rows are fetched);
* :data:`WAKE`: wake the iterating thread or task (events reached the inbox);
* :data:`READ`: take in what has arrived on the socket, without waiting;
* :class:`Transaction`: run the requests of its steps inside a transaction,
  answer their result;
* :class:`Recover`: reconnect after a lost connection (see the drivers'
  ``_recover``, which take the reconnect lock and run :func:`restore`),
  answer the marker or ``None``; :data:`RECONNECTING` and
  :class:`CallOnReconnect` are :func:`restore`'s steps;
* :class:`Elsewhere`: run a query on a second, short-lived connection,
  answer its rows (:func:`check_pinned`);
* :data:`NO_PREPARE`: stop psycopg preparing statements on this connection
  (:func:`identify`);
* :data:`SETTLE`: read what is pending and wait for an outstanding probe's
  answer (:func:`begin_command`);
* :class:`~pgcast._reconnect.Sleep` and :class:`~pgcast._reconnect.Attempt`
  (from :func:`reconnect`), :data:`DISCARD`, :data:`CONNECT`, :class:`Direct`,
  :data:`AFTER_QUERY`, :data:`HOOKS` and :data:`CHECK_CLOSED`: the steps of a
  reconnect, see :func:`reconnect` and :func:`attempt`.

An exception raised while a request is executed is thrown into the generator
at its ``yield``, so the sequences handle failures (undo, retry, translate) in
plain ``try`` blocks; one it does not handle comes out of ``_run``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol, TypeAlias, TypeVar

import psycopg

from . import diagnostics
from ._channels import unlisten_sql
from ._core import Core
from ._durable_core import BATCHES_BEFORE_MARKER, Unfetched, publish_many_query, publish_query
from ._durable_schema import Query, Rows, Steps, install_steps
from ._errors import (
    ClosedError,
    ConnectionLostError,
    ListenNotEffectiveError,
    NotSentError,
    PgcastError,
)
from ._event import DurableEvent, Event
from ._payload import Payload
from ._reconnect import Attempt, Reconnected, Resilience, Sleep, reconnect_plan
from .durable import schema_error

__all__ = [
    "AFTER_QUERY",
    "CHECK_CLOSED",
    "CONNECT",
    "DISCARD",
    "HOOKS",
    "NO_PREPARE",
    "READ",
    "RECONNECTING",
    "SETTLE",
    "WAKE",
    "CallOnReconnect",
    "Direct",
    "Elsewhere",
    "Execute",
    "Op",
    "Recover",
    "Request",
    "Session",
    "Transaction",
]

T = TypeVar("T")

logger = logging.getLogger("pgcast")


class Execute(NamedTuple):
    """Run *sql* with *params* as a command; the answer is ``None``."""

    sql: str | bytes
    params: Any = None


@dataclass(frozen=True, slots=True)
class Transaction:
    """Run the requests of *steps* inside one transaction; answer their result."""

    steps: Steps[Any]


@dataclass(frozen=True, slots=True)
class Recover:
    """Reconnect after *error*, seen on connection *generation*, unless another
    thread or task did meanwhile, giving up at *deadline* (``time.monotonic()``;
    ``None``: the backoff's own end); answer the marker (or ``None``)."""

    error: ConnectionLostError
    generation: int
    deadline: float | None = None
    #: Reconnect even with ``reconnect=False`` (:meth:`pgcast.PubSub.reconnect`).
    force: bool = False


@dataclass(frozen=True, slots=True)
class CallOnReconnect:
    """Call the user's ``on_reconnect`` with *marker* (a coroutine function is
    run to completion); what it raises is logged, never raised."""

    marker: Reconnected


class Direct(NamedTuple):
    """Run *sql* on the new connection of a reconnect attempt itself (not as
    a command: no reconnect, no probe to wait for); answer the rows if *fetch*."""

    sql: str | bytes
    fetch: bool = False


class Elsewhere(NamedTuple):
    """Run *sql* on a second connection, opened as the PubSub's own are and
    closed at once; answer its rows."""

    sql: str


class _Signal:
    """A request without arguments; its name says what the driver does."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<request {self.name}>"


#: Wake the iterating thread or task: events reached the inbox.
WAKE: Final = _Signal("WAKE")
#: Take in what has arrived on the socket, without waiting (``_read``).
READ: Final = _Signal("READ")
#: Drop the current (lost) connection.
DISCARD: Final = _Signal("DISCARD")
#: Open a new connection and make it the PubSub's.
CONNECT: Final = _Signal("CONNECT")
#: Take in what arrived with a query's results (the drivers' ``_after_query``).
AFTER_QUERY: Final = _Signal("AFTER_QUERY")
#: Run the reconnect hooks.
HOOKS: Final = _Signal("HOOKS")
#: Raise ClosedError (dropping the connection) if the PubSub was closed.
CHECK_CLOSED: Final = _Signal("CHECK_CLOSED")
#: Set the connection's ``prepare_threshold`` to ``None``.
NO_PREPARE: Final = _Signal("NO_PREPARE")
#: Read what is pending and wait for an outstanding probe's answer (the
#: drivers' ``_settle``): raises ConnectionLostError if the connection is lost.
SETTLE: Final = _Signal("SETTLE")
#: The calling thread or task is the one reconnecting now (until its
#: ``_recover`` returns): its commands see a loss, and no probe is sent.
RECONNECTING: Final = _Signal("RECONNECTING")

Request: TypeAlias = (
    Query
    | Execute
    | Transaction
    | Recover
    | CallOnReconnect
    | Direct
    | Elsewhere
    | Sleep
    | Attempt
    | _Signal
)
#: A sequence: yields requests, receives their answers, returns the result.
Op: TypeAlias = Generator[Request, Any, T]


class Session(Protocol):
    """What the sequences read of a PubSub (never write: that is the core's)."""

    _core: Core
    _res: Resilience
    _closed: bool
    _generation: int
    _kind: str  # the class's name, for messages

    @property
    def _conn(self) -> psycopg.Connection[Any] | psycopg.AsyncConnection[Any]:
        """The connection now (replaced by a reconnect)."""
        ...

    def _in_reconnect(self) -> bool:
        """Whether the calling thread or task is the one reconnecting."""
        ...

    def _not_sent(self, gave_up: ConnectionLostError) -> NotSentError:
        """The error of a command whose connection did not come back in time."""
        ...


# -- the connection ------------------------------------------------------------


def identify(core: Core) -> Op[None]:
    """Once per connection, before anything else runs on it: take the server's
    own ``pg_backend_pid()`` (the pid given at login is made up behind a
    pooler), and behind a pooler stop preparing statements."""
    if core.identified:
        return
    rows: Rows = yield Direct(diagnostics.BACKEND_PID_SQL, fetch=True)
    if core.identify(int(rows[0][0])):
        # Under transaction pooling the next statement may run on another
        # server session, which does not know psycopg's prepared statements
        # (PgBouncer before 1.21 does not track them): "prepared statement
        # "_pg3_0" does not exist" on the sixth run of a query.
        yield NO_PREPARE


def check_pinned(core: Core) -> Op[None]:
    """Behind a pooler, once per connection, after LISTEN: a second connection
    must not see this one's channels (:func:`pgcast.diagnostics.check_pinned`).

    ``pg_listening_channels()`` on this connection is blind when the pool
    hands the same server session back (PgBouncer's default: one client on an
    idle pool always gets the session it released last), yet notifications
    to a session no client holds are dropped. A pool that pins the session
    gives the second connection another one.
    """
    if not core.pooled or core.pinned:
        return
    expected = core.expected_listening()
    try:
        rows: Rows = yield Elsewhere(diagnostics.SHARED_SQL)
    except PgcastError as exc:
        raise diagnostics.unverified_pool(expected, exc) from exc
    diagnostics.check_pinned(expected, rows[0][0] if rows and rows[0][0] else ())
    core.pinned = True


def begin_command(s: Session) -> Op[None]:
    """Make the connection ready for a command: no probe outstanding, not
    known to be lost. A connection known lost before anything is sent is
    restored first, within ``notify_timeout`` (else NotSentError): the command
    is then sent, never dropped. Not by the thread or task reconnecting (its
    hooks' commands), nor with ``reconnect=False``: those see the loss."""
    deadline: float | None = None
    while True:
        generation = s._generation
        try:
            yield SETTLE
            return
        except ConnectionLostError as exc:
            if not s._res.reconnect or s._in_reconnect():
                raise
            if deadline is None:
                deadline = time.monotonic() + s._res.notify_timeout
            try:
                yield Recover(exc, generation, deadline)
            except ConnectionLostError as gave_up:
                raise s._not_sent(gave_up) from gave_up


# -- subscriptions -----------------------------------------------------------


def listen(
    s: Session,
    channels: Sequence[str],
    durable: bool,
    since: int | None,
    consumer: str | None,
) -> Op[None]:
    """LISTEN to the new ones of *channels*, confirm it with
    ``pg_listening_channels()``, then start the durable ones' replay; all of
    it undone for the durable channels if any step fails."""
    if s._closed:  # even when there is nothing to send
        raise ClosedError(f"this {s._kind} is closed")
    core = s._core
    yield from identify(core)  # names the probe channel: before plan_listen
    new, sql = core.plan_listen(channels)
    fresh = core.durable.plan_subscribe(channels, durable, since, consumer)
    try:
        if sql is not None:
            probe_was_listening = core.probe_listening
            yield Execute(sql)
            core.did_listen(new)
            try:
                # A separate statement: behind a transaction-mode pooler it may
                # run on another server session, which is what it is to catch.
                rows = yield (diagnostics.VERIFY_SQL, None)
                diagnostics.check_session(core.expected_listening(), rows[0] if rows else None)
                yield from check_pinned(core)
            except ListenNotEffectiveError:
                core.channels.difference_update(new)
                if core.pooled:
                    yield from _unlisten_shared(core, new, probe_was_listening)
                raise
        if fresh:
            yield from durable_run(core, core.durable.subscribe_steps(fresh, since, consumer))
    except BaseException:
        core.durable.abandon(fresh)
        raise


def _unlisten_shared(core: Core, new: list[str], probe_was_listening: bool) -> Op[None]:
    """Best effort, after a LISTEN through a pooler did not hold: UNLISTEN
    where it may have landed (the session the pool hands back), so that the
    next client given that session does not receive this one's channels."""
    names = list(new)
    if not probe_was_listening and core.probe_listening and core.probe is not None:
        names.append(core.probe)
        core.probe_listening = False
    try:
        yield Execute(unlisten_sql(names))
    except PgcastError as exc:
        logger.warning("pgcast: UNLISTEN after a LISTEN that did not hold failed: %s", exc)


def unlisten(s: Session, channels: Sequence[str]) -> Op[None]:
    """UNLISTEN *channels* (all when empty) and forget their pending events."""
    if s._closed:  # even when there is nothing to send
        raise ClosedError(f"this {s._kind} is closed")
    core = s._core
    gone, sql = core.plan_unlisten(channels)
    if sql is not None:
        yield Execute(sql)
        core.did_unlisten(gone)


def queue_usage() -> Op[float]:
    """``pg_notification_queue_usage()``."""
    rows = yield (diagnostics.QUEUE_USAGE_SQL, None)
    return float(rows[0][0]) if rows else 0.0


# -- publishing ----------------------------------------------------------------


def notify(core: Core, channel: str, payload: Payload, durable: bool) -> Op[int | None]:
    """A plain NOTIFY, or the message stored in the log (its id returned)."""
    query, logged = publish_query(channel, payload, durable)
    if not logged:
        yield Execute(*query)
        return None
    rows = yield from durable_run(core, None, query)
    return int(rows[0][0])


def notify_many(core: Core, messages: Any, durable: bool) -> Op[int | None]:
    """Many messages in one statement; the last one's log id if logged."""
    planned = publish_many_query(messages, durable)
    if planned is None:
        return None
    query, logged = planned
    if not logged:
        yield Execute(*query)
        return None
    rows = yield from durable_run(core, None, query)
    return None if rows[0][0] is None else int(rows[0][0])


def ack(core: Core, event: Event) -> Op[None]:
    """Move the consumer of *event*'s channel past it."""
    yield Execute(*core.durable.ack_query(event))


# -- durable channels (the logic is in pgcast._durable_core) -------------------


def durable_run(core: Core, steps: Steps[T] | None, query: Query | None = None) -> Op[Any]:
    """Run *steps*, or the single *query* (returning its rows), with the
    ``pgcast`` schema checked (and installed if missing) first."""
    durable = core.durable
    if not durable.schema_ready:
        try:
            yield Transaction(install_steps())
        except PgcastError as exc:
            raise schema_error(exc) from exc
        durable.schema_ready = True
    before = len(core.inbox)
    result: Any
    if steps is None:
        assert query is not None
        result = yield query
    else:
        result = yield from steps
    if len(core.inbox) > before:
        yield WAKE  # another thread or task may be iterating
    return result


def replay(core: Core) -> Op[bool]:
    """Read one replay batch if a durable channel is catching up."""
    durable = core.durable
    if not durable.pending:
        return False
    yield from durable_run(core, durable.replay_steps())
    return True


def replay_after_reconnect(core: Core, batches: int = BATCHES_BEFORE_MARKER) -> Op[None]:
    """A reconnect hook: every channel is LISTENed again; what was missed
    meanwhile is read now (at most *batches* batches), so that it comes
    before the marker. (Core.new_connection already set the durable
    channels replaying.)"""
    durable = core.durable
    for _ in range(batches):
        if not durable.pending:
            break
        yield from durable_run(core, durable.replay_steps())


def ready_inbox(s: Session) -> Op[None]:
    """Make the inbox fit to be handed out as it is (a NotificationManager
    does): run a replay batch if one is due, fetch referenced payloads."""
    core = s._core
    if (yield from replay(core)) and core.durable.pending:
        yield WAKE  # more to replay: come back
    inbox = core.inbox
    i = 0
    while i < len(inbox):  # only the consumer removes, so indexes hold
        event = inbox[i]
        if type(event) is Unfetched:
            fetched = yield from fetch_payload(s, event)
            if fetched is None:
                del inbox[i]
                continue
            inbox[i] = fetched
        i += 1


def fetch_payload(s: Session, event: Unfetched) -> Op[DurableEvent | None]:
    """The event with its payload read from the log (None: pruned); a lost
    connection is restored and the read tried again."""
    core = s._core
    while True:
        generation = s._generation
        try:
            result: DurableEvent | None = yield from durable_run(
                core, core.durable.fetch_steps(event)
            )
            return result
        except ConnectionLostError as exc:
            if s._closed:
                raise ClosedError(f"this {s._kind} is closed") from exc
            yield Recover(exc, generation)


def get_event(s: Session) -> Op[Event | Reconnected | None]:
    """The next event or marker, reading (never waiting) when the inbox is
    empty; a lost connection is restored first."""
    core = s._core
    inbox = core.inbox
    while True:
        if not inbox:
            generation = s._generation
            try:
                yield from replay(core)
                yield READ
            except ConnectionLostError as exc:
                yield Recover(exc, generation)
        event = inbox.popleft() if inbox else None
        if type(event) is Unfetched:
            fetched = yield from fetch_payload(s, event)
            if fetched is None:
                continue
            return fetched
        return event


# -- reconnecting (the retry loop is pgcast._reconnect.reconnect_plan) ---------


def force_reconnect(s: Session) -> Op[Reconnected]:
    """:meth:`pgcast.PubSub.reconnect`: drop the connection and open a new
    one now, even with ``reconnect=False``."""
    if s._closed:
        raise ClosedError(f"this {s._kind} is closed")
    for _ in range(3):  # another reconnect may end just as this one starts
        error = ConnectionLostError("reconnect() was called")
        marker: Reconnected | None = yield Recover(error, s._generation, force=True)
        if marker is not None:
            return marker
    raise ConnectionLostError("reconnect() could not restore the connection")


def restore(
    s: Session, error: ConnectionLostError, generation: int, deadline: float | None
) -> Op[Reconnected | None]:
    """With the driver's reconnect lock held: reconnect after *error*, seen on
    connection *generation*, unless another thread or task did meanwhile (then
    answer its marker); give up at *deadline*. Steps 4 and 5 of
    :mod:`pgcast._reconnect`'s order: ``on_reconnect``, then the marker is
    queued and the iterating thread or task woken."""
    core = s._core
    if s._generation != generation and not s._conn.closed:
        # Restored by another thread or task meanwhile (a failed
        # attempt leaves its connection closed: then go on here).
        return core.last_marker
    if s._closed:
        raise ClosedError(f"this {s._kind} is closed")
    yield RECONNECTING
    plan = reconnect_plan(s._res.backoff, error, deadline=deadline)
    marker = yield from reconnect(core, plan, error)
    yield CallOnReconnect(marker)
    core.inbox.append(marker)
    yield WAKE
    return marker


def reconnect(
    core: Core, plan: Generator[Sleep | Attempt, None, int], error: ConnectionLostError
) -> Op[Reconnected]:
    """Drop the lost connection, then attempt, sleep and attempt again as
    *plan* says until an attempt succeeds; return the marker (the driver
    calls ``on_reconnect`` and queues it)."""
    core.lost(error)
    logger.warning("pgcast: connection lost (%s); reconnecting", error)
    yield DISCARD
    failure: BaseException | None = None
    while True:
        try:
            step = plan.send(None) if failure is None else plan.throw(failure)
        except StopIteration as done:
            attempts: int = done.value
            break
        failure = None
        if type(step) is Sleep:
            yield step  # the driver raises ClosedError if closed meanwhile
        elif type(step) is Attempt:
            try:
                yield step
            except asyncio.CancelledError:
                yield DISCARD
                raise
            except BaseException as exc:
                yield DISCARD
                failure = exc
            yield CHECK_CLOSED
    marker = core.restored(attempts)
    logger.warning("pgcast: reconnected after %.3f s", marker.downtime.total_seconds())
    return marker


def attempt(core: Core) -> Op[None]:
    """One reconnect attempt: open a connection, LISTEN again, check it, run
    the hooks (a failure is thrown back into :func:`reconnect`'s plan)."""
    yield CONNECT
    try:
        yield from identify(core)
        sql = core.relisten_sql()
        if sql is not None:
            yield Direct(sql)
            core.did_listen(())
            rows: Rows = yield Direct(diagnostics.VERIFY_SQL, fetch=True)
            diagnostics.check_session(core.expected_listening(), rows[0] if rows else None)
            yield from check_pinned(core)
    finally:
        yield AFTER_QUERY
    yield HOOKS
