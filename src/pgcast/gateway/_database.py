"""The gateway's connections to PostgreSQL, apart from what the hub decides.

The :class:`~pgcast.gateway._hub.Hub` decides *when* to connect, LISTEN and
reconnect; this module says *how*, with no state of the hub's:

* :func:`connect_listener` opens the LISTEN connection (an
  :class:`pgcast.AsyncPubSub` named ``pgcast-gateway``, with TCP keepalives so
  a peer that vanished without closing the socket is noticed);
* :func:`listen_all` LISTENs to channels, the durable ones durably;
* :class:`QueryConnection` is the second connection the durable replay
  queries run on, never the LISTEN one, opened when first needed, one query
  at a time, least served client first (:mod:`._turns`);
* :class:`QueueUsage` reads ``pg_notification_queue_usage()`` for
  ``/metrics`` from a short connection of its own, cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import psycopg

from .. import aio
from .._encoding import encoding_setup
from ._metrics import Stats
from ._turns import ReplayBusy, Served, Turns

if TYPE_CHECKING:
    from ._client import Settings
    from ._resume import Fetch

__all__ = ["QueryConnection", "QueueUsage", "connect_listener", "listen_all"]

logger = logging.getLogger("pgcast.gateway")


async def connect_listener(settings: Settings) -> aio.AsyncPubSub:
    """Open the gateway's LISTEN connection.

    :raises pgcast.ConnectError: PostgreSQL cannot be reached.
    """
    options = dict(settings.connect_kwargs)
    options.setdefault("application_name", "pgcast-gateway")
    # TCP keepalives notice a peer that vanished without closing the socket.
    for key, value in _KEEPALIVES:
        options.setdefault(key, value)
    return await aio.connect(settings.dsn, reconnect_backoff=settings.reconnect_backoff,
                             **options)


#: libpq's TCP keepalive settings for the gateway's long-lived connections.
_KEEPALIVES = (("keepalives", 1), ("keepalives_idle", 10),
               ("keepalives_interval", 5), ("keepalives_count", 3))


class _NoAnswer(Exception):
    """A replay query (or its connect) took longer than ``database_timeout``."""


async def listen_all(
    aps: aio.AsyncPubSub, channels: Iterable[str], is_durable: Callable[[str], bool]
) -> None:
    """LISTEN to *channels* on *aps*: the plain ones, then durably the durable ones.

    :raises pgcast.PgcastError: as :meth:`pgcast.AsyncPubSub.listen`.
    """
    channels = list(channels)
    plain = [c for c in channels if not is_durable(c)]
    durable = [c for c in channels if is_durable(c)]
    if plain:
        await aps.listen(*plain)
    if durable:
        # The shared connection itself replays what it missed across its
        # reconnects, so no client misses any.
        await aps.listen(*durable, durable=True)


class QueryConnection:
    """The connection the replay queries run on (not the LISTEN one)."""

    def __init__(self, settings: Settings, stats: Stats | None = None) -> None:
        self._settings = settings
        self._stats = stats or Stats()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._turns = Turns()

    def fetch_for(self, who: Served) -> Fetch:
        """:meth:`fetch` for the replay queries of *who* (a client): its
        place among the waiting queries is by the rows read for it so far."""

        async def fetch(sql: str, params: Any) -> list[tuple[Any, ...]]:
            return await self.fetch(sql, params, who)

        return fetch

    async def fetch(
        self, sql: str, params: Any, who: Served | None = None
    ) -> list[tuple[Any, ...]]:
        """Run a query and return its rows; the connection is opened when
        first needed and again after it broke.

        One query at a time: a query waits for its turn at most
        ``replay_wait`` seconds, least served client (*who*) first (see
        :mod:`._turns`).

        The replay's queries only read, so one that fails because the
        connection broke (its backend terminated, the server restarted) is
        run once more on a fresh connection: a connection that died while
        idle is noticed only by the next query. So is one that got no answer
        within ``database_timeout`` (a peer gone without closing the socket:
        without a bound it held the connection, and so every client's
        resume, forever); its connection is closed.

        :raises psycopg.OperationalError: it failed on a fresh connection too.
        :raises ReplayBusy: it got no turn within ``replay_wait``.
        """
        try:
            async with self._turns.turn(who, self._settings.replay_wait):
                self._stats.replay_queries += 1
                rows = await self._retried(sql, params)
        except ReplayBusy:
            self._stats.replay_busy += 1
            raise
        if who is not None:
            who.replay_rows += max(1, len(rows))
        return rows

    async def _retried(self, sql: str, params: Any) -> list[tuple[Any, ...]]:
        timeout = self._settings.database_timeout
        for attempt in range(2):
            try:
                return await self._bounded(sql, params, timeout)
            except _NoAnswer:
                if attempt:
                    raise psycopg.OperationalError(
                        f"a replay query got no answer within {timeout:g} s "
                        "(database_timeout), twice"
                    ) from None
                logger.warning("pgcast gateway: a replay query got no answer within "
                               "%g s; reopening its connection", timeout)
            except psycopg.OperationalError:
                conn = self._conn
                if attempt or not (conn is None or conn.closed or conn.broken):
                    raise
                logger.info("pgcast gateway: the replay connection broke; reopening it")
                self._conn = None
                if conn is not None:
                    await conn.close()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _bounded(self, sql: str, params: Any, timeout: float) -> list[tuple[Any, ...]]:
        """Connect if needed and run the query, in at most *timeout* seconds.

        :raises _NoAnswer: it took longer; the connection is closed. Its
            socket is shut first: a query cancelled the usual way makes
            psycopg send a cancel request and wait seconds for the answer
            that the silent peer will never give.
        """
        task = asyncio.ensure_future(self._query(sql, params))
        try:
            done, _ = await asyncio.wait([task], timeout=timeout)
        finally:
            if not task.done():
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.pgconn.finish()
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
        if not done:
            raise _NoAnswer
        return task.result()

    async def _query(self, sql: str, params: Any) -> list[tuple[Any, ...]]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            conn = self._conn = await self._connect()
        cur = await conn.execute(sql, params)
        return await cur.fetchall()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        options = dict(self._settings.connect_kwargs)
        options.update(autocommit=True, application_name="pgcast-gateway-replay",
                       client_encoding="UTF8")
        options.setdefault("connect_timeout", 10)
        for key, value in _KEEPALIVES:
            options.setdefault(key, value)
        conn = await psycopg.AsyncConnection.connect(self._settings.dsn, **options)
        # In SQL_ASCII, as the PubSubs: the server refuses to send a UTF-8
        # client the log's bytes that are not UTF-8 (a client in LATIN1 stored
        # them), and every resume failed at that row.
        setup = encoding_setup(conn)
        if setup is not None:
            await conn.execute(setup)
        return conn

    async def close(self) -> None:
        """Close the connection, if it was opened."""
        if self._conn is not None:
            await self._conn.close()


class QueueUsage:
    """``pg_notification_queue_usage()``, read at most every ``metrics_cache`` s.

    At most one read is in flight: concurrent ``/metrics`` requests (which
    need no authentication) share it, so a flood of them can never open more
    than one connection and starve other applications of connections.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._last: tuple[float, float | None] = (-1e9, None)
        self._reading: asyncio.Future[float | None] | None = None

    @property
    def cached(self) -> float | None:
        """The value last read (None before the first read, or if it failed)."""
        return self._last[1]

    async def read(self) -> float | None:
        """The fraction of the NOTIFY queue in use (cached); None if it
        cannot be read."""
        at, value = self._last
        if time.monotonic() - at < self._settings.metrics_cache:
            return value
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._done)
        # Shielded: a client that leaves does not cancel the others' read.
        return await asyncio.shield(self._reading)

    def _done(self, future: asyncio.Future[float | None]) -> None:
        self._reading = None
        if not future.cancelled():
            self._last = (time.monotonic(), future.result())

    async def _read(self) -> float | None:
        conn = None
        try:
            options = dict(self._settings.connect_kwargs)
            options.update(autocommit=True, application_name="pgcast-gateway-metrics")
            options.setdefault("connect_timeout", 5)
            conn = await psycopg.AsyncConnection.connect(self._settings.dsn, **options)
            # Bounded: every /metrics request waits for this one read, so a
            # peer that stops answering must not hang them all.
            task = asyncio.ensure_future(_usage(conn))
            done, _ = await asyncio.wait([task], timeout=self._settings.database_timeout)
            if not done:
                conn.pgconn.finish()  # no cancel request to a silent peer
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                logger.warning("pgcast gateway: reading the NOTIFY queue usage got no answer "
                               "within %g s", self._settings.database_timeout)
                return None
            return task.result()
        except psycopg.Error as exc:
            logger.warning("pgcast gateway: cannot read the NOTIFY queue usage: %s", exc)
            return None
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()


async def _usage(conn: psycopg.AsyncConnection[Any]) -> float | None:
    cur = await conn.execute("SELECT pg_notification_queue_usage()")
    row = await cur.fetchone()
    return float(row[0]) if row is not None else None
