"""What ``connect()`` does with its arguments, for both drivers.

:func:`pgcast.connect` and :func:`pgcast.aio.connect` take the same
arguments: :func:`connect_plan` validates the reconnect and health-check ones
(:func:`pgcast._reconnect.resilience`) and turns the rest into the arguments
of ``psycopg.connect`` (:func:`pgcast._core.connect_args`, plus TCP
keepalives for the health check). :func:`psycopg2_args` first maps the
keywords ``psycopg2.connect()`` takes where psycopg 3 differs, so code
written for psycopg2 (and pgpubsub, which passes its arguments on) connects
unchanged. The drivers only open the connection, and
report a failure with :func:`connect_failed`. A PubSub built on a connection
directly reconnects with :func:`reconnect_conninfo`.
"""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg.conninfo

from ._core import connect_args
from ._errors import ConnectError
from ._reconnect import Resilience, add_keepalives, resilience

__all__ = [
    "RESILIENCE_KEYWORDS",
    "connect_failed",
    "connect_plan", "psycopg2_args", "reconnect_conninfo"]

#: psycopg2 keywords that name a Python object rather than a connection
#: setting: pgcast makes its own connections and cursors, so none applies.
_PSYCOPG2_OBJECTS = ("connection_factory", "cursor_factory")


def psycopg2_args(conninfo: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``psycopg2.connect()``'s arguments as psycopg 3 takes them.

    The differences psycopg2's documentation lists for ``connect(dsn=None,
    connection_factory=None, cursor_factory=None, async=False, **kwargs)``:

    * ``database`` is psycopg2's (deprecated) alias of ``dbname``;
    * ``dsn`` may be given as a keyword (psycopg 3: the first argument);
    * ``async``/``async_`` asks psycopg2 for an asynchronous connection:
      false is accepted, true names :func:`pgcast.aio.connect`;
    * ``connection_factory`` and ``cursor_factory`` are refused with the
      reason: pgcast opens its own connections.

    Every other keyword is a libpq parameter, as in both drivers.

    :raises TypeError: a name given twice (``database`` and ``dbname``,
        ``dsn`` and a connection string), or a keyword that cannot apply.
    """
    if not any(k in kwargs for k in ("database", "dsn", "async", "async_", *_PSYCOPG2_OBJECTS)):
        return conninfo, kwargs
    options = dict(kwargs)
    if "database" in options:
        if "dbname" in options:
            raise TypeError(
                "connect() got both 'database' and 'dbname': 'database' is psycopg2's "
                "alias of 'dbname', give one of them"
            )
        options["dbname"] = options.pop("database")
    if "dsn" in options:
        dsn = options.pop("dsn")
        if conninfo:
            raise TypeError(
                "connect() got both a connection string and 'dsn=': 'dsn' is psycopg2's "
                "name for the connection string, give one of them"
            )
        if dsn is not None and not isinstance(dsn, str):
            raise TypeError(f"dsn must be a connection string, not {type(dsn).__name__}")
        conninfo = dsn or ""
    for name in ("async", "async_"):
        if options.pop(name, False):
            raise TypeError(
                f"connect({name}=True) asks psycopg2 for an asynchronous connection: "
                "use pgcast.aio.connect() (asyncio) instead"
            )
    for name in _PSYCOPG2_OBJECTS:
        if options.pop(name, None) is not None:
            raise TypeError(
                f"connect() does not take psycopg2's {name}=: pgcast opens and manages "
                "its own connections and cursors"
            )
    return conninfo, options



#: ``connect()``'s keywords that set how the PubSub behaves, validated by
#: :func:`~pgcast._reconnect.resilience` (its defaults are ``connect()``'s);
#: every other keyword goes to ``psycopg.connect``.
RESILIENCE_KEYWORDS = (
    "reconnect", "reconnect_backoff", "health_check_interval", "notify_timeout",
    "on_reconnect", "on_gap",
)


def connect_plan(conninfo: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], Resilience]:
    """``connect()``'s arguments checked: the conninfo and options to open
    every connection of the PubSub with, and its :class:`Resilience`."""
    if not isinstance(conninfo, str):
        # pgcast.connect(my_psycopg_connection) failed deep in libpq's parser
        # with "'Connection' object has no attribute 'encode'".
        raise TypeError(
            f"connect() takes a DSN or URL (a str) or psycopg's keyword arguments, not "
            f"{type(conninfo).__name__}; to use a connection you already have, wrap it "
            "(pgcast.PubSub(conn) or pgcast.aio.AsyncPubSub(conn), autocommit, used by nothing "
            "else), or send from its transaction with pgcast.notify(conn, ...)")
    res = resilience(**{name: kwargs[name] for name in RESILIENCE_KEYWORDS if name in kwargs})
    rest = {name: value for name, value in kwargs.items() if name not in RESILIENCE_KEYWORDS}
    conninfo, options = connect_args(*psycopg2_args(conninfo, rest))
    return conninfo, add_keepalives(conninfo, options, res.health_check_interval), res


def reconnect_conninfo(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    """What *conn* was opened with (its password included), to reconnect."""
    return psycopg.conninfo.make_conninfo(conn.info.dsn, password=conn.info.password)


#: What to do about the connection failures a newcomer meets first: a
#: fragment of libpq's message, and the advice appended to it.
_CONNECT_ADVICE = (
    ("does not exist", "database \"", "create it (createdb NAME, or CREATE DATABASE) or "
     "fix the database name at the end of the DSN"),
    ("does not exist", "role \"", "fix the user name in the DSN (postgresql://USER@HOST/DB)"),
    ("password authentication failed", "", "check the password (in the DSN, PGPASSWORD "
     "or ~/.pgpass)"),
    ("no password supplied", "", "give one in the DSN (postgresql://USER:PASSWORD@HOST/DB), "
     "PGPASSWORD or ~/.pgpass"),
    ("Connection refused", "", "check the host and port in the DSN, and that PostgreSQL "
     "is running there"),
    ("missing \"=\"", "", "a DSN looks like postgresql://USER:PASSWORD@HOST:5432/DB "
     "or 'host=HOST dbname=DB user=USER'"),
    ("invalid connection option", "", "a DSN looks like postgresql://USER:PASSWORD@HOST:5432/DB "
     "or 'host=HOST dbname=DB user=USER'"),
    ("invalid URI", "", "a DSN looks like postgresql://USER:PASSWORD@HOST:5432/DB"),
)


def connect_failed(exc: psycopg.Error) -> ConnectError:
    """The error of a connection that could not be opened: the server's
    message, and what to do about the common ones."""
    message = str(exc).strip()
    for fragment, also, advice in _CONNECT_ADVICE:
        if fragment in message and also in message:
            message = f"{message.rstrip('.')}; {advice}"
            break
    return ConnectError(f"cannot connect to PostgreSQL: {message}")
