# Generated from src/pgcast/client/_open_async.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
"""Opening a PubSub, and notifying through an application's own connection.

Written for asyncio (``_open_async.py``: ``pgcast.aio.connect``,
``pgcast.aio.notify``); the sync twin (``pgcast.connect``, ``pgcast.notify``)
is generated from it by ``tools/async_to_sync.py``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import psycopg

from .._backoff import Backoff
from .._connect import connect_plan
from .._core import notify_query
from .._flavour import check_connection
from .._gap import OnGap
from .._payload import Payload
from .._reconnect import OnReconnect
from ._pubsub import PubSub
from ._session import opener

__all__ = ["connect", "connect_as", "notify"]

P = TypeVar("P", bound=PubSub)


def connect(
    conninfo: str = "",
    *,
    reconnect: bool = True,
    reconnect_backoff: Backoff | None = None,
    health_check_interval: float | None = 30.0,
    on_reconnect: OnReconnect | None = None,
    on_gap: OnGap | None = None,
    notify_timeout: float = 30.0,
    install_schema: bool = False,
    **kwargs: Any,
) -> PubSub:
    """Open a PubSub on a new connection.

    Takes what ``psycopg.connect`` takes: a DSN or URL, keyword arguments, or
    nothing (then ``DATABASE_URL``, then libpq's ``PG*`` variables); and
    ``psycopg2.connect()``'s spellings (``database=``, ``dsn=``: see
    :func:`pgcast._connect.psycopg2_args`). The connection arguments are kept
    to reconnect with.

    :param reconnect: when the connection is lost, reconnect with
        *reconnect_backoff* (default :class:`pgcast.Backoff`: 0.1 s growing
        to 10 s, with jitter, without end), LISTEN every channel again and
        deliver a :class:`pgcast.Reconnected` marker in the event stream.
        ``False``: raise :class:`~pgcast.ConnectionLostError` instead.
    :param health_check_interval: while listening, probe the connection after
        this many seconds of silence, and reconnect when a probe is not
        answered within as long again; also sets TCP keepalives. ``0`` turns
        the probe off.
    :param on_reconnect: called with each marker after every channel was
        LISTENed again, before the marker reaches the event stream; a coroutine
        function is run to completion.
    :param on_gap: called with each :class:`pgcast.Gap` (a durable resume
        that cannot be complete: messages after its position were pruned, or
        the position is from another epoch of the log) as it is found, by the
        one replaying; a coroutine function is run to completion. The marker
        is also in the event stream, before the replayed events.
    :param notify_timeout: how long a command (a notify, a listen) waits for a
        lost connection to come back before failing with
        :class:`~pgcast.NotSentError`.
    :param install_schema: let the PubSub install (or migrate) the ``pgcast``
        schema when it first needs it (a durable channel, a payload of 8000
        bytes or more). Default: no DDL; a missing schema is a
        :class:`~pgcast.SchemaError` naming ``pgcast init``.
    :raises ConnectError: the server could not be reached or refused the
        login; the message is the server's.
    """
    return connect_as(
        PubSub,
        conninfo,
        reconnect=reconnect,
        reconnect_backoff=reconnect_backoff,
        health_check_interval=health_check_interval,
        on_reconnect=on_reconnect,
        on_gap=on_gap,
        notify_timeout=notify_timeout,
        install_schema=install_schema,
        **kwargs,
    )


def connect_as(
    cls: type[P], conninfo: str = "", *, install_schema: bool = False, **kwargs: Any
) -> P:
    """:func:`connect` (the same arguments and defaults), opening an instance
    of *cls*, a subclass of the PubSub that adds names and no state
    (:mod:`pgcast.compat`'s connections), so that it is a PubSub in every
    way: a NotificationManager watches it and yields it."""
    conninfo, options, res = connect_plan(conninfo, kwargs)
    open_connection = opener(conninfo, options)
    pubsub = cls(
        open_connection(), resilience=res, connector=open_connection, install_schema=install_schema
    )
    try:
        pubsub._identify()
    except BaseException:
        pubsub.close()
        raise
    return pubsub


def notify(conn: psycopg.Connection[Any], channel: str, payload: Payload = "") -> None:
    """Send a notification through an application's own psycopg connection.

    It joins the connection's current transaction, if any, so it is delivered
    when (and only if) that transaction commits: the NOTIFY goes out with the
    data change it announces.
    """
    check_connection(conn, "pgcast.notify()", "pgcast.aio.notify()")
    sql, params = notify_query(channel, payload)
    conn.execute(sql, params)
