"""``pgcast init`` and ``pgcast prune``: the schema of durable channels, and retention.

``pgcast init`` installs the ``pgcast`` schema (or migrates it to this
release's version); it is idempotent. ``pgcast prune`` deletes old messages
from the log: by default those older than 7 days; ``--keep-last N`` keeps the
newest N of each channel whatever their age (with ``--older-than 0``, only
those). See :mod:`pgcast.durable`.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

import psycopg

from .._core import connect_args
from .._errors import ConnectError
from ..durable import install_schema, prune
from ..durable._schema import DEFAULT_RETENTION, LATEST_VERSION, parse_duration
from ._common import add_dsn_argument, resolve_dsn

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``init`` and ``prune``."""
    p = subparsers.add_parser(
        "init",
        help="install (or upgrade) the pgcast schema for durable channels and large payloads",
        description="Install the pgcast schema (log table, consumers, pgcast.notify()) in "
        "the database, or migrate it to this release's version. Safe to run again.",
    )
    add_dsn_argument(p)
    p.set_defaults(func=cmd_init)

    days = DEFAULT_RETENTION.days
    p = subparsers.add_parser(
        "prune",
        help=f"delete durable messages older than --older-than (default {days}d)",
        description="Delete messages from the pgcast log. A message is deleted when it is "
        "older than --older-than and not among the --keep-last newest of its channel.",
    )
    p.add_argument(
        "--older-than", metavar="AGE", type=_age, default=DEFAULT_RETENTION,
        help=f"age such as 30m, 12h, 7d, 2w (default {days}d; 0: any age)",
    )
    p.add_argument(
        "--keep-last", metavar="N", type=_count,
        help="always keep the newest N messages of each channel",
    )
    p.add_argument("--channel", help="prune this channel only")
    add_dsn_argument(p)
    p.set_defaults(func=cmd_prune)


def _age(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _connect(args: argparse.Namespace) -> psycopg.Connection[Any]:
    conninfo, options = connect_args(resolve_dsn(args), {})
    try:
        return psycopg.Connection.connect(conninfo, **options)
    except psycopg.Error as exc:
        raise ConnectError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc


def cmd_init(args: argparse.Namespace) -> int:
    """Install or migrate the schema; say what was done."""
    with _connect(args) as conn:
        before = install_schema(conn)
    if before == LATEST_VERSION:
        print(f"pgcast schema is up to date (version {LATEST_VERSION})")
    elif before == 0:
        print(f"pgcast schema installed (version {LATEST_VERSION})")
    else:
        print(f"pgcast schema migrated from version {before} to {LATEST_VERSION}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune the log; print the count deleted per channel and the total."""
    with _connect(args) as conn:
        deleted = prune(conn, args.older_than, args.keep_last, args.channel)
    for channel, count in deleted.items():
        print(f"{channel}\t{count}")
    print(f"pruned {sum(deleted.values())} message(s)")
    return 0
