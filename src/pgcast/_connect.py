"""What ``connect()`` does with its arguments, for both drivers.

:func:`pgcast.connect` and :func:`pgcast.aio.connect` take the same
arguments: :func:`connect_plan` validates the reconnect and health-check ones
(:func:`pgcast._reconnect.resilience`) and turns the rest into the arguments
of ``psycopg.connect`` (:func:`pgcast._core.connect_args`, plus TCP
keepalives for the health check). The drivers only open the connection, and
report a failure with :func:`connect_failed`. A PubSub built on a connection
directly reconnects with :func:`reconnect_conninfo`.
"""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg.conninfo

from ._backoff import Backoff
from ._core import connect_args
from ._errors import ConnectError
from ._reconnect import OnReconnect, Resilience, add_keepalives, resilience

__all__ = ["connect_failed", "connect_plan", "reconnect_conninfo"]


def connect_plan(
    conninfo: str,
    kwargs: dict[str, Any],
    *,
    reconnect: bool,
    reconnect_backoff: Backoff | None,
    health_check_interval: float | None,
    notify_timeout: float,
    on_reconnect: OnReconnect | None,
) -> tuple[str, dict[str, Any], Resilience]:
    """``connect()``'s arguments checked: the conninfo and options to open
    every connection of the PubSub with, and its :class:`Resilience`."""
    res = resilience(reconnect, reconnect_backoff, health_check_interval, notify_timeout,
                     on_reconnect)
    conninfo, options = connect_args(conninfo, kwargs)
    return conninfo, add_keepalives(conninfo, options, res.health_check_interval), res


def reconnect_conninfo(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    """What *conn* was opened with (its password included), to reconnect."""
    return psycopg.conninfo.make_conninfo(conn.info.dsn, password=conn.info.password)


def connect_failed(exc: psycopg.Error) -> ConnectError:
    """The error of a connection that could not be opened: the server's message."""
    return ConnectError(f"cannot connect to PostgreSQL: {exc}".strip())
