"""Argument checks, error mapping and connection arguments that every driver
shares (the PubSub, the managers, the publishers, the workers), both flavours.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import psycopg

from ._errors import ConnectionLostError, DatabaseError, HotStandbyError, PgcastError

__all__ = ["check_timeout", "connect_args", "is_async_callable", "wrap_error"]


def is_async_callable(handler: object) -> bool:
    """True for a coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        type(handler).__call__ if callable(handler) else None
    )


def check_timeout(name: str, value: float | None) -> float | None:
    """Validate a timeout argument: ``None`` or a number >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, not {value!r}")
    if not value >= 0:  # NaN too: every comparison with it is false (a busy loop)
        raise ValueError(f"{name} must be >= 0 seconds, got {value}")
    return float(value)


def _ends_the_connection(exc: psycopg.OperationalError) -> bool:
    """Whether *exc* means the connection is gone: libpq's own error (no
    SQLSTATE: the socket broke), a connection exception (08), an operator
    intervention that ends the session (57P..), or any FATAL. psycopg files
    more under OperationalError, where the server refused one statement on a
    connection that is fine: a full notification queue (54000), a statement
    timeout (57014), out of memory or disk (53...)."""
    state = exc.sqlstate
    if state is None or state.startswith(("08", "57P")):
        return True
    return exc.diag.severity_nonlocalized in ("FATAL", "PANIC")


def wrap_error(exc: psycopg.Error) -> PgcastError:
    """Map a psycopg error to the pgcast tree, keeping the server's message."""
    if isinstance(exc, psycopg.OperationalError) and _ends_the_connection(exc):
        return ConnectionLostError(f"connection to PostgreSQL lost: {exc}")
    # LISTEN and NOTIFY on a standby fail with read_only_sql_transaction and
    # "cannot execute ... during recovery": say what to do about it.
    if exc.sqlstate == "25006" and "recovery" in str(exc):
        return HotStandbyError(
            f"the server is a hot standby: {exc}; connect to the primary, for "
            "example with target_session_attrs=read-write in the DSN"
        )
    return DatabaseError(str(exc))


def connect_args(conninfo: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The arguments for ``psycopg.connect`` that every pgcast connection uses.

    No arguments at all means ``DATABASE_URL``, then libpq's ``PG*`` variables.
    The connection is in autocommit (a NOTIFY outside :meth:`transaction` is
    sent at once), speaks UTF-8 (the unit of the payload limit; a PubSub on a
    database in ``SQL_ASCII`` listens in ``SQL_ASCII``: :mod:`pgcast._encoding`), and gives up
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
