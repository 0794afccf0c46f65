# Generated from src/pgcast/durable/_run_async.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
"""Running durable steps against a connection, and the schema's maintenance:
:func:`install_schema`, :func:`prune`, :func:`consumers`.

Written for asyncio (``_run_async.py``); the sync twin, :mod:`pgcast.durable._run`,
is generated from it by ``tools/async_to_sync.py``. The steps themselves
(generators that yield queries, see :data:`pgcast.durable._schema.Steps`) are
pure, in :mod:`pgcast.durable._core`, :mod:`pgcast.durable._schema` and
:mod:`pgcast.durable._maintenance`: here they are only run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import psycopg

from .._checks import wrap_error
from .._flavour import check_connection
from ._lag import ConsumerLag
from ._maintenance import consumers_steps, prune_steps, schema_error
from ._schema import DEFAULT_RETENTION, PruneResult, Query, Rows, Steps, install_steps

__all__ = ["Params", "consumers", "drive", "install_schema", "prune"]

T = TypeVar("T")
Params = Sequence[Any] | Mapping[str, Any] | None


def drive(steps: Steps[T], fetch: Callable[[str, Params], Rows]) -> T:
    """Run *steps* (see :mod:`pgcast.durable._core`): each query they yield
    is run by *fetch* and its rows are sent back, until they return. What
    *fetch* raises is thrown into them: they may handle it, and their
    ``finally`` blocks undo their bookkeeping when they do not."""
    try:
        query: Query = next(steps)
        while True:  # ends: the steps return, or raise
            try:
                rows = fetch(*query)
            except BaseException as exc:
                query = steps.throw(exc)
                continue
            query = steps.send(rows)
    except StopIteration as stop:
        result: T = stop.value
        return result


def _fetcher(conn: psycopg.Connection[Any]) -> Callable[[str, Params], Rows]:
    """A *fetch* for :func:`drive` that runs the queries on *conn*."""

    def fetch(sql: str, params: Params) -> Rows:
        cur = conn.execute(sql, params, prepare=None if params else False)
        return cur.fetchall() if cur.description is not None else []

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
    check_connection(conn, "pgcast.install_schema()", "pgcast.aio.install_schema()")
    try:
        with conn.transaction():
            return drive(install_steps(), _fetcher(conn))
    except psycopg.Error as exc:
        raise schema_error(exc) from exc


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
    check_connection(conn, "pgcast.prune()", "pgcast.aio.prune()")
    try:
        with conn.transaction():
            return drive(
                prune_steps(older_than, keep_last, channel, force, max_age), _fetcher(conn)
            )
    except psycopg.Error as exc:
        raise wrap_error(exc) from exc


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
    check_connection(conn, "pgcast.durable.consumers()", "pgcast.aio.consumers()")
    try:
        return drive(consumers_steps(retention), _fetcher(conn))
    except psycopg.Error as exc:
        raise wrap_error(exc) from exc
