"""Helpers shared by the subcommands: the ``--dsn`` option and its fallbacks."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = [
    "EXIT_ERROR",
    "EXIT_NOTHING",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "add_dsn_argument",
    "connection",
    "resolve_dsn",
]


class UsageError(ValueError):
    """Options that contradict each other or are missing: one line, exit 2."""


#: Exit codes of every ``pgcast`` command.
EXIT_OK = 0
EXIT_ERROR = 1  # a runtime error: the database, a file, a refused request
EXIT_USAGE = 2  # bad or contradictory options (argparse's own code)
EXIT_NOTHING = 3  # ``listen --timeout``: the time ran out with nothing received

DSN_HELP = ("PostgreSQL DSN or URL (default: PGCAST_DSN, then DATABASE_URL, then PG* "
            "variables, else the embedded server, started if needed)")


def add_dsn_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help=DSN_HELP)


def resolve_dsn(args: argparse.Namespace) -> str:
    """``--dsn`` (after the subcommand, or before it: ``pgcast --dsn X
    notify``), else ``PGCAST_DSN``, else ``DATABASE_URL``, else libpq's
    ``PG*`` variables (an empty DSN), else the persistent embedded server,
    started (and announced on stderr) if needed."""
    dsn: str | None = getattr(args, "dsn", None) or getattr(args, "global_dsn", None)
    if dsn:
        return dsn
    for name in ("PGCAST_DSN", "DATABASE_URL"):
        if os.environ.get(name):
            return os.environ[name]
    if any(k in os.environ for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")):
        return ""
    try:
        from ..embedded import default_datadir, ensure_running, persistent_dsn
    except ImportError as exc:
        raise ImportError(
            "no DSN given (--dsn, PGCAST_DSN, DATABASE_URL or PG* variables), and the "
            f"embedded server needs {exc.name}: pip install 'pgcast[embedded]'",
            name=exc.name,
        ) from exc

    if (running := persistent_dsn()) is not None:
        return running
    dsn = ensure_running()
    print(f"pgcast: no DSN given: using the embedded PostgreSQL at {dsn} (data in "
          f"{default_datadir()}); it keeps running: `pgcast embedded stop` stops it",
          file=sys.stderr, flush=True)
    return dsn


@contextlib.contextmanager
def connection(args: argparse.Namespace) -> Iterator[Any]:
    """A connection to :func:`resolve_dsn`'s server, opened as every pgcast
    connection is (autocommit, UTF-8, a connect timeout:
    :func:`pgcast._checks.connect_args`); psycopg's errors become pgcast's,
    which the command prints in one line."""
    import psycopg

    from .._checks import connect_args, wrap_error
    from .._connect import connect_failed

    conninfo, options = connect_args(resolve_dsn(args), {})
    try:
        conn = psycopg.Connection.connect(conninfo, **options)
    except psycopg.Error as exc:
        raise connect_failed(exc) from exc
    try:
        with conn:
            yield conn
    except psycopg.Error as exc:
        raise wrap_error(exc) from exc
