"""Durable channels and payloads of any size: the schema, retention, drivers.

A *durable* message is stored in the table ``pgcast.log`` and announced by a
NOTIFY carrying its id, in the same transaction (one statement:
``SELECT pgcast.notify(channel, payload)``, also callable from SQL and
triggers). A listener of a durable channel
(``ps.listen(channel, durable=True, since=ID)``, or with
``consumer="name"``, whose position is kept in ``pgcast.consumers`` and
advanced by ``ps.ack(event)``) replays from the log what it missed, offline
or across reconnects, then continues live: per channel in commit order, with
no gap and no duplicate. How that is guaranteed is explained in
:mod:`pgcast.durable._core`, which holds all the logic; this module only
runs it against a connection.

What "exactly once" covers: within the life of a PubSub, every durable
message of a durable channel is handed out once, across any number of
reconnects (the replay starts after the last message received, and comes
before the :class:`~pgcast.Reconnected` marker). A named consumer that
stops and starts again resumes after its last :meth:`~pgcast.PubSub.ack`:
what it received but did not acknowledge comes again (at least once across
restarts, as with any consumer offset). Without *since* or a consumer, a
durable listen starts at the end of the log and replays only across
reconnects.

A payload too large for NOTIFY (8000 bytes of UTF-8 or more) is stored the
same way, and a receiving PubSub fetches it before handing the event out:
:meth:`pgcast.PubSub.notify` takes payloads of any size. Such a message is in
the log, so it is durable too. Events that went through the log are
:class:`pgcast.DurableEvent`: an :class:`~pgcast.Event` with an ``id``.

**The schema** lives in its own schema, ``pgcast``, versioned by
``pgcast.schema_version``: :func:`install_schema` (or ``pgcast init``)
applies the migrations this release knows, in one transaction, serialised by
an advisory lock, and does nothing when the schema is up to date. A PubSub
runs no DDL unless asked: one that needs the schema and finds it missing (or
older) raises a :class:`~pgcast.SchemaError` saying to run ``pgcast init``,
unless opened with ``connect(..., install_schema=True)``; then it installs it
itself, and a role that may not create it gets a :class:`~pgcast.SchemaError`
saying to run ``pgcast init`` as one that may.

**Retention**: nothing is deleted by itself. :func:`prune` (``pgcast prune``)
deletes messages older than :data:`DEFAULT_RETENTION` (7 days) unless told
otherwise, optionally keeping the newest *keep_last* of every channel
whatever their age. Run it from cron or a scheduler. Prune waits for named
consumers: what one has not acknowledged is kept, unless ``force=True`` or
it is older than ``max_age``; the consumers that lose messages that way are
reported (:class:`PruneResult`).

**Gaps and epochs** (schema version 2): every deletion from the log is
recorded per channel, and the log has an *epoch*, made anew when it is
truncated. A resume that cannot be complete (a position before deleted
messages, or from another epoch) is announced by a :class:`pgcast.Gap`
marker before the replay; see :mod:`pgcast.durable._core`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import psycopg

from .. import _flavour, _flavour_async
from .._checks import wrap_error
from .._errors import PgcastError, SchemaError
from ._lag import ConsumerLag, consumers_query, lag_of
from ._schema import (
    DEFAULT_RETENTION,
    LATEST_VERSION,
    LeftBehind,
    PruneResult,
    Query,
    Rows,
    Steps,
    install_steps,
    parse_duration,
    prune_query,
    warn_old_schema,
)

__all__ = [
    "DEFAULT_RETENTION",
    "LATEST_VERSION",
    "ConsumerLag",
    "LeftBehind",
    "PruneResult",
    "adrive",
    "consumers",
    "drive",
    "install_schema",
    "install_schema_async",
    "parse_duration",
    "prune",
    "prune_async",
    "schema_error",
]

T = TypeVar("T")
Params = Sequence[Any] | Mapping[str, Any] | None


def drive(steps: Steps[T], fetch: Callable[[str, Params], Rows]) -> T:
    """Run *steps* (see :mod:`pgcast.durable._core`) with a sync *fetch*."""
    try:
        query: Query = next(steps)
        while True:
            query = steps.send(fetch(*query))
    except StopIteration as stop:
        result: T = stop.value
        return result
    except BaseException:
        steps.close()  # lets the steps undo their bookkeeping
        raise


async def adrive(steps: Steps[T], fetch: Callable[[str, Params], Awaitable[Rows]]) -> T:
    """Run *steps* with an async *fetch*: the asyncio twin of :func:`drive`."""
    try:
        query: Query = next(steps)
        while True:
            query = steps.send(await fetch(*query))
    except StopIteration as stop:
        result: T = stop.value
        return result
    except BaseException:
        steps.close()
        raise


def schema_error(exc: BaseException) -> PgcastError:
    """The error to raise when installing the schema failed with *exc* (a
    psycopg error, or a pgcast error caused by one)."""
    cause = exc if isinstance(exc, psycopg.Error) else exc.__cause__
    if isinstance(cause, psycopg.errors.InsufficientPrivilege):
        return SchemaError(
            "the pgcast schema (needed for durable channels and payloads of 8000 "
            f"bytes or more) is not installed and this role may not install it: {cause}. "
            "Run `pgcast init` (or pgcast.install_schema(conn)) as a role that may "
            "create schemas in this database"
        )
    if isinstance(cause, psycopg.errors.ReadOnlySqlTransaction):
        return SchemaError(
            f"the pgcast schema cannot be installed on a read-only server or transaction: {cause}"
        )
    if isinstance(exc, PgcastError):
        return exc
    assert isinstance(exc, psycopg.Error)
    return wrap_error(exc)


def _sync_fetch(conn: psycopg.Connection[Any]) -> Callable[[str, Params], Rows]:
    def fetch(sql: str, params: Params) -> Rows:
        cur = conn.execute(sql, params, prepare=None if params else False)
        return cur.fetchall() if cur.description is not None else []

    return fetch


def _async_fetch(
    conn: psycopg.AsyncConnection[Any],
) -> Callable[[str, Params], Awaitable[Rows]]:
    async def fetch(sql: str, params: Params) -> Rows:
        cur = await conn.execute(sql, params, prepare=None if params else False)
        return await cur.fetchall() if cur.description is not None else []

    return fetch


def install_schema(conn: psycopg.Connection[Any]) -> int:
    """Install the ``pgcast`` schema, or migrate it to this release's version.

    Safe to call any number of times and from many processes at once. It runs
    in one transaction of *conn* (a savepoint if one is open). Returns the
    version found before: 0 when the schema was not there, the current
    version (:data:`LATEST_VERSION`) when nothing had to be done.

    :raises SchemaError: the role may not create the schema, or the
        installed schema is newer than this pgcast.
    """
    _flavour.check_connection(conn, "pgcast.install_schema()", "pgcast.aio.install_schema()")
    try:
        with conn.transaction():
            return drive(install_steps(), _sync_fetch(conn))
    except psycopg.Error as exc:
        raise schema_error(exc) from exc


async def install_schema_async(conn: psycopg.AsyncConnection[Any]) -> int:
    """:func:`install_schema` on an asyncio connection."""
    _flavour_async.check_connection(
        conn, "pgcast.install_schema()", "pgcast.aio.install_schema()"
    )
    try:
        async with conn.transaction():
            return await adrive(install_steps(), _async_fetch(conn))
    except psycopg.Error as exc:
        raise schema_error(exc) from exc


def _prune_steps(
    older_than: timedelta | None,
    keep_last: int | None,
    channel: str | None,
    force: bool,
    max_age: timedelta | None,
) -> Steps[PruneResult]:
    prune_query(older_than, keep_last, channel, force=force, max_age=max_age)  # checks
    exists = yield ("SELECT to_regclass('pgcast.log') IS NOT NULL", None)
    if not exists[0][0]:
        raise SchemaError(
            "the pgcast schema is not installed in this database: there is nothing to "
            "prune (`pgcast init` installs it)"
        )
    found = yield ("SELECT coalesce(max(version), 0) FROM pgcast.schema_version", None)
    version = int(found[0][0])
    warn_old_schema(version)  # version 1: what is deleted is not recorded
    rows = yield prune_query(
        older_than, keep_last, channel, force=force, max_age=max_age, version=version
    )
    return PruneResult(rows)


def prune(
    conn: psycopg.Connection[Any],
    older_than: timedelta | None = DEFAULT_RETENTION,
    keep_last: int | None = None,
    channel: str | None = None,
    *,
    force: bool = False,
    max_age: timedelta | None = None,
) -> PruneResult:
    """Delete from the log the messages retention no longer keeps.

    A message is old enough to go when it is older than *older_than*
    (default: 7 days; ``None`` keeps messages of any age) and is not among
    the *keep_last* newest of its channel (``None``: no such protection). So
    ``prune(conn, older_than=timedelta(0), keep_last=1000)`` keeps exactly the
    last 1000 messages per channel. *channel* limits it to one channel.

    **Consumers are waited for**: a message a named consumer of its channel
    has not acknowledged (:meth:`pgcast.PubSub.ack`) is kept, unless
    *force*, or it is older than *max_age* (a bound on how long a stalled
    consumer may hold the log). Consumers that lose messages that way are
    reported, and get a :class:`pgcast.Gap` when they resume.

    Returns a :class:`~pgcast.durable.PruneResult`: how many messages were
    deleted per channel (a dict), ``.held`` (per channel, how many were kept
    for consumers) and ``.left_behind`` (the consumers that lost messages).
    Every deletion is recorded per channel in ``pgcast.pruned`` (schema
    version 2) so that a resume from before it is announced as a gap.

    :raises SchemaError: the schema is not installed.
    :raises ValueError: a negative age or count, or neither limit.
    """
    try:
        with conn.transaction():
            return drive(
                _prune_steps(older_than, keep_last, channel, force, max_age), _sync_fetch(conn)
            )
    except psycopg.Error as exc:
        raise wrap_error(exc) from exc


async def prune_async(
    conn: psycopg.AsyncConnection[Any],
    older_than: timedelta | None = DEFAULT_RETENTION,
    keep_last: int | None = None,
    channel: str | None = None,
    *,
    force: bool = False,
    max_age: timedelta | None = None,
) -> PruneResult:
    """:func:`prune` on an asyncio connection."""
    try:
        async with conn.transaction():
            return await adrive(
                _prune_steps(older_than, keep_last, channel, force, max_age),
                _async_fetch(conn),
            )
    except psycopg.Error as exc:
        raise wrap_error(exc) from exc


def _consumers_steps(retention: timedelta) -> Steps[list[ConsumerLag]]:
    exists = yield ("SELECT to_regclass('pgcast.consumers') IS NOT NULL", None)
    if not exists[0][0]:
        raise SchemaError(
            "the pgcast schema is not installed in this database: there are no "
            "consumers (`pgcast init` installs it)"
        )
    found = yield ("SELECT coalesce(max(version), 0) FROM pgcast.schema_version", None)
    rows = yield consumers_query(int(found[0][0]))
    return [lag_of(row, retention) for row in rows]


def consumers(
    conn: psycopg.Connection[Any], retention: timedelta = DEFAULT_RETENTION
) -> list[ConsumerLag]:
    """Every named consumer of every channel, and how far behind it is
    (``pgcast consumers``): its position, the messages and the time it is
    behind, and whether it holds messages older than *retention* (which
    ``prune`` keeps for it) or lost some (a :class:`~pgcast.Gap` awaits it).
    Reads only.

    :raises SchemaError: the schema is not installed.
    """
    try:
        return drive(_consumers_steps(retention), _sync_fetch(conn))
    except psycopg.Error as exc:
        raise wrap_error(exc) from exc
