"""A PubSub's connection: running commands, waiting for the socket, the health
check and reconnecting. :class:`AsyncSession` is what
:class:`pgcast.AsyncPubSub` is built on; the sync twin
(:mod:`pgcast.client._session`) is generated from this file by
``tools/async_to_sync.py``.

The decisions are the core's (:mod:`pgcast._core`: the inbox, the SQL, the
health check; :mod:`pgcast._reconnect`: the retry loop); here they are driven.
What the flavours do differently (waiting, locks, threads or tasks) is in
:mod:`pgcast._flavour_async` and :mod:`pgcast._flavour`.

Listening while others notify: the iterating thread or task waits on the
socket through a :class:`~pgcast._flavour_async.SocketWaiter` and holds no
lock while it waits; it takes the connection's lock only to read what
arrived, which never blocks. Others may run commands meanwhile; notifications
that arrive during their queries go to the same inbox, and the waiter is woken
to hand them out. libpq runs one command at a time, so the health check's
probe is sent by the iterating one only, without waiting for its answer, and
a command first waits (briefly) for that answer.

Reconnecting, in the order :mod:`pgcast._reconnect` gives: the thread or task
that finds the connection lost reconnects, under a lock, so one does it and
the others wait for it. The iterating one does it when a read fails or the
health check expires, with no time limit but the backoff's own; one running a
command does it when nobody else is, bounded by ``notify_timeout``, then
sends. A connection lost while a command is on the wire cannot tell whether
the server ran it: that is raised, never retried.
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg

from .. import diagnostics
from .._closing import AsyncClosing
from .._connect import connect_failed, reconnect_conninfo
from .._core import Core, wrap_error
from .._discard import DISCARD_TIMEOUT, shutdown
from .._errors import ClosedError, ConnectionLostError, PgcastError
from .._flavour_async import (
    ACTOR,
    Event,
    Lock,
    SocketWaiter,
    StateLock,
    acquire,
    check_connection,
    current,
    readable,
    resolve,
    sleep_unless,
)
from .._logfields import connection_fields
from .._reconnect import Reconnected, Resilience, Sleep, reconnect_plan
from ..durable._schema import Rows
from ._failures import Failures
from ._identify_async import AsyncIdentified

__all__ = ["AsyncSession", "opener"]

logger = logging.getLogger("pgcast")


def opener(
    conninfo: str, options: dict[str, Any]
) -> Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]:
    """What opens a PubSub's connections: the first one and every reconnect."""

    async def open_connection() -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(conninfo, **options)
        except psycopg.Error as exc:
            raise connect_failed(exc) from exc

    return open_connection


def _has_input(fd: int) -> bool:
    """Whether *fd* is readable now (never waits: fit for both flavours)."""
    return bool(select.select([fd], [], [], 0)[0])


class AsyncSession(AsyncIdentified, AsyncClosing, Failures):
    """One connection, used for LISTEN and commands, kept alive and restored."""

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        resilience: Resilience | None = None,
        connector: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]] | None = None,
        install_schema: bool = False,
    ) -> None:
        """Wrap *conn*, which must be in autocommit mode and used by nothing else.

        *resilience* holds the reconnect and health-check settings (see
        :func:`pgcast.connect`); *connector* opens a new connection to
        reconnect with (default: *conn*'s own parameters); *install_schema*:
        see :func:`pgcast.connect`.
        """
        check_connection(conn, "pgcast.PubSub", "pgcast.aio.AsyncPubSub")
        if not conn.autocommit:
            raise ValueError(f"{type(self).__name__} needs a connection in autocommit mode")
        self._res = res = resilience or Resilience()
        self._core = Core(res.health_check_interval)
        self._adopt(conn)
        self._connector = connector or opener(reconnect_conninfo(conn), {"autocommit": True})
        self._install_schema = install_schema
        self._closed = False
        self._closing = Event()
        # Bumped by every reconnect: one that saw the connection fail under
        # generation g reconnects only if nobody did since.
        self._generation = 0
        self._reconnect_lock = Lock()
        self._reconnecting: object | None = None  # the thread or task doing it
        self._hooks: list[Callable[[Any], Awaitable[None]]] = []
        # Commands running or about to run: the iterating thread or task sends
        # no probe meanwhile (libpq runs one command at a time).
        self._queries = 0
        self._in_flight = 0  # commands on the wire (not transactions held open)
        self._state_lock = StateLock()
        self._waiter = SocketWaiter(conn.pgconn)
        # Called whenever this PubSub wakes its own waiter (see set_wake_callback).
        self._wake_callback: Callable[[], object] | None = None

    def _adopt(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Make *conn* (the first or a new one) the connection: the core takes
        its notifications (as bytes: :mod:`pgcast._encoding`) and notices."""
        self._conn = conn
        self._pgconn = conn.pgconn
        # The commands that return nothing (notify, listen) share a cursor: a
        # fresh one per NOTIFY costs a third of psycopg's client work (cold
        # adapters); its execute() runs under the connection's lock.
        self._cursor = conn.cursor()
        conn.pgconn.notify_handler = self._core.on_notify
        conn.add_notice_handler(self._core.on_notice)
        self._core.new_connection(conn.info.backend_pid)

    # -- the connection ----------------------------------------------------

    @property
    def connection(self) -> psycopg.AsyncConnection[Any]:
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
        channels = sorted(self._core.channels)
        return f"<pgcast.{type(self).__name__} {state} channels={channels!r}>"

    async def close(self) -> None:
        """Close the connection. Idempotent; iterating threads or tasks stop."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wake()
        await self._release(self._conn, graceful=True)
        self._waiter.close()

    def _wake(self) -> None:
        self._waiter.wake()
        if self._wake_callback is not None:
            self._wake_callback()

    def _check_open(self, lost_ok: bool = False) -> None:
        if self._closed:
            raise ClosedError(f"this {type(self).__name__} is closed")
        if self._conn.closed and not lost_ok:
            raise ConnectionLostError("the connection to PostgreSQL is closed")

    # -- commands ----------------------------------------------------------

    async def _execute(self, sql: str | bytes, params: Any = None) -> None:
        await self._command(sql, params, fetch=False)

    async def _fetch(self, sql: str | bytes, params: Any = None) -> Rows:
        return await self._command(sql, params, fetch=True)

    async def _command(self, sql: str | bytes, params: Any, *, fetch: bool) -> Rows:
        self._check_open(lost_ok=True)  # a lost one is restored by _begin_command
        try:
            await self._begin_command()
            try:
                if not self._core.identified:  # built on a connection, not by connect()
                    await self._identify()
                conn = self._conn
                generation = self._generation
                with self._state_lock:
                    self._in_flight += 1
                try:
                    cur = self._cursor  # a fresh one for rows, or after a reconnect:
                    if fetch or cur.connection is not conn:
                        cur = conn.cursor()
                    await cur.execute(sql, params, prepare=None if params else False)
                    rows = await cur.fetchall() if fetch and cur.description is not None else []
                except psycopg.Error as exc:
                    raise self._command_failed(exc, generation) from exc
                finally:
                    with self._state_lock:
                        self._in_flight -= 1
                self._core.health.heard(self._core.clock())
                return rows
            finally:
                self._end_command()
                await self._after_query()
        except (PgcastError, psycopg.Error, OSError) as exc:
            self._raise_public(exc)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """A transaction: notifications sent inside are delivered at commit,
        and not at all if it rolls back (on an exception). A connection lost
        inside raises :class:`~pgcast.ConnectionLostError`: nothing of the
        transaction was committed."""
        self._check_open()
        await self._begin_command()
        try:
            async with self._conn.transaction():
                yield
        except psycopg.Error as exc:
            raise self._public_error(exc) from exc
        finally:
            self._end_command()
            await self._after_query()

    async def _begin_command(self) -> None:
        """Make the connection ready for a command: no probe outstanding, not
        known to be lost. A connection known lost before anything is sent is
        restored first, within ``notify_timeout`` (else NotSentError): the
        command is then sent, never dropped. Not by the one reconnecting (its
        hooks' commands), nor with ``reconnect=False``: those see the loss."""
        with self._state_lock:
            self._queries += 1
        deadline: float | None = None
        try:
            while True:  # ends: _recover gives up at the deadline
                generation = self._generation
                try:
                    await self._settle()
                    return
                except ConnectionLostError as exc:
                    if not self._res.reconnect or self._in_reconnect():
                        raise
                    if deadline is None:
                        deadline = time.monotonic() + self._res.notify_timeout
                    try:
                        await self._recover(exc, generation, deadline)
                    except ConnectionLostError as gave_up:
                        raise self._not_sent(gave_up) from gave_up
        except BaseException as exc:
            self._end_command()
            if isinstance(exc, PgcastError | psycopg.Error | OSError):
                self._raise_public(exc)
            raise

    def _end_command(self) -> None:
        with self._state_lock:
            self._queries -= 1

    async def _settle(self) -> None:
        # Reads what is pending (which notices a connection closed by the
        # server) and waits for an outstanding probe's answer.
        # Nothing to read and no probe out: nothing to settle (one poll costs
        # the round trip less than the reads; see benchmarks/bench_latency.py).
        self._check_open()
        conn = self._conn
        async with conn.lock:
            try:
                if not self._core.probe_in_flight and not _has_input(conn.pgconn.socket):
                    return
                for step in self._core.settle(conn.pgconn):
                    await readable(conn.pgconn.socket, step.timeout)
            except (psycopg.Error, OSError, ValueError) as exc:
                # The socket went away under us: closed by close() (say so)
                # or lost (the caller reconnects or reports it).
                self._check_open(lost_ok=True)
                if isinstance(exc, psycopg.Error):
                    raise wrap_error(exc) from exc
                raise ConnectionLostError(f"connection to PostgreSQL lost: {exc}") from exc

    async def _after_query(self) -> None:
        # Notifications that came in with the query's results are already in
        # the inbox (psycopg's notify handler), and libpq may hold more parsed
        # ones; the waiter waits on a socket that will not become readable
        # for them: wake it, if it waits.
        conn = self._conn
        if self._closed or conn.closed:
            return
        async with conn.lock:
            try:
                self._core.take(conn.pgconn)
            except (ConnectionLostError, psycopg.Error):
                return  # closed or lost meanwhile: the next read or command notices it
        if self._core.inbox and (self._wake_callback is not None or self._waiter.waiting()):
            self._wake()

    # -- reconnecting ------------------------------------------------------

    def _in_reconnect(self) -> bool:
        return self._reconnecting is not None and self._reconnecting == current()

    async def _recover(
        self,
        exc: ConnectionLostError,
        generation: int,
        deadline: float | None = None,
        *,
        force: bool = False,
    ) -> Reconnected | None:
        """Reconnect after *exc*, seen on connection *generation*, unless
        another thread or task did meanwhile (then its marker); give up at
        *deadline* (``time.monotonic()``; None: the backoff's own end). Raise
        *exc* itself when reconnecting is off, unless *force*. Steps 4 and 5
        of :mod:`pgcast._reconnect`'s order are here: ``on_reconnect``, then
        the marker queued and the waiter woken."""
        core = self._core
        if not (self._res.reconnect or force):
            core.lost(exc)
            raise exc
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not await acquire(self._reconnect_lock, timeout):
            raise ConnectionLostError(
                f"another {ACTOR} is restoring the connection and was not done in "
                f"time; the connection was lost: {exc}"
            ) from exc
        try:
            if self._generation != generation and not self._conn.closed:
                # Restored by another meanwhile (a failed attempt leaves its
                # connection closed: then go on here).
                return core.last_marker
            self._check_open(lost_ok=True)
            self._reconnecting = current()
            marker = await self._reconnect_loop(exc, deadline)
            callback = self._res.on_reconnect
            if callback is not None:
                try:
                    await resolve(callback(marker))
                except Exception:
                    logger.exception("pgcast: on_reconnect failed on %r", marker,
                                     extra={"pid": core.backend_pid})
            core.inbox.append(marker)
            self._wake()
            return marker
        finally:
            self._reconnecting = None
            self._reconnect_lock.release()

    async def _reconnect_loop(
        self, error: ConnectionLostError, deadline: float | None
    ) -> Reconnected:
        """Drop the lost connection, then attempt, sleep and attempt again as
        :func:`~pgcast._reconnect.reconnect_plan` says until one succeeds."""
        core = self._core
        fields = connection_fields(core.backend_pid, core.channels)
        logger.warning("pgcast: connection lost (%s); reconnecting", error, extra=fields)
        core.lost(error)
        await self._discard()
        plan = reconnect_plan(self._res.backoff, error, deadline=deadline)
        failure: Exception | None = None
        while True:  # ends: the plan gives up
            try:
                step = plan.send(None) if failure is None else plan.throw(failure)
            except StopIteration as done:
                attempts: int = done.value
                break
            failure = None
            if type(step) is Sleep:
                if await sleep_unless(self._closing, step.seconds):
                    raise self._closed_meanwhile()
                continue
            # Even with no delay (Backoff(initial=0)) each attempt lets close()
            # in: the event loop gets a turn, a manager's stop is looked at.
            if await sleep_unless(self._closing, 0):
                raise self._closed_meanwhile()
            try:
                await self._attempt()
            except BaseException as exc:
                await self._discard()
                if not isinstance(exc, Exception):  # cancelled, interrupted
                    raise
                failure = exc
            if self._closed:
                await self._discard()
                raise self._closed_meanwhile()
        marker = core.restored(attempts)
        downtime = marker.downtime.total_seconds()
        fields = {**connection_fields(core.backend_pid, core.channels), "downtime": downtime}
        logger.warning("pgcast: reconnected after %.3f s", downtime, extra=fields)
        return marker

    def _closed_meanwhile(self) -> ClosedError:
        return ClosedError(f"this {type(self).__name__} was closed while reconnecting")

    async def _attempt(self) -> None:
        """One attempt: open a connection, LISTEN again, check it, run the
        hooks; what fails is thrown back into the plan."""
        conn = await self._connector()
        self._adopt(conn)
        self._generation += 1
        self._waiter.replace(conn.pgconn)  # the waiter waits on the old socket
        core = self._core
        try:
            await self._identify()
            sql = core.relisten_sql()
            if sql is not None:
                await self._direct(sql)
                core.did_listen(())
                rows = await self._direct(diagnostics.VERIFY_SQL, fetch=True)
                diagnostics.check_session(core.expected_listening(), rows[0] if rows else None)
                await self._check_pinned()
        finally:
            await self._after_query()
        await self._after_reconnect()
        for hook in self._hooks:
            await hook(self)

    async def _after_reconnect(self) -> None:
        """What the layers above do on a new connection, before the user's
        reconnect hooks (the durable channels' replay)."""

    async def _discard(self) -> None:
        if not self._conn.closed:
            await self._release(self._conn, graceful=False)

    async def _release(self, conn: psycopg.AsyncConnection[Any], *, graceful: bool) -> None:
        """Close *conn*, which a command in another thread (or task) may be
        using: closing it under that command's libpq call would free what the
        call uses (a crash, not an error). Shutting the socket down makes
        such a command fail at once (and release the lock); only then is it
        safe to close. *graceful*: an idle connection is closed as usual
        (it tells the server), without the shutdown."""
        locked = graceful and await acquire(conn.lock, 0)
        if not locked:
            shutdown(conn.pgconn)
            if not await acquire(conn.lock, DISCARD_TIMEOUT):
                logger.warning("pgcast: a command on the connection did not end; leaving it")
                return
        try:
            with contextlib.suppress(Exception):
                await conn.close()
        finally:
            conn.lock.release()
