"""``pgcast watch``, ``pgcast unwatch`` and ``pgcast worker``.

``watch`` installs a table change feed (:func:`pgcast.watch_table`) and prints
the channel to listen to; ``pgcast listen CHANNEL`` then shows the events.
``worker module:attribute`` imports a :class:`pgcast.Worker` (or a function
returning one) the way ``uvicorn`` imports an app, the current directory
first on the import path, and runs it until SIGTERM or Ctrl-C, exiting 0
after a graceful stop.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from ..feeds import triggers
from ._common import add_dsn_argument, connection, resolve_dsn

__all__ = ["load_worker", "register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "watch", help="send a JSON event on a channel for every change to TABLE",
        description="Install (idempotently) a trigger that sends a JSON change event "
        "for every INSERT, UPDATE and DELETE on TABLE, and print the channel. "
        "Watch it with `pgcast listen CHANNEL`.",
    )
    p.add_argument("table", metavar="TABLE", help="table name, e.g. ports or shop.ports")
    p.add_argument("--channel", help="channel name (default: TABLE_changed, "
                   "or SCHEMA.TABLE_changed outside public)")
    p.add_argument("--columns", help="comma-separated columns to send in the row "
                   "(default: all; row mode only)")
    p.add_argument("--per", choices=("row", "statement"), default="row",
                   help="one event per row (default), or the set of keys per statement")
    p.add_argument("--operations", default="INSERT,UPDATE,DELETE",
                   help="comma-separated among INSERT, UPDATE, DELETE, TRUNCATE "
                   "(default: INSERT,UPDATE,DELETE)")
    p.add_argument("--max-parts", type=int, default=triggers.DEFAULT_MAX_PARTS,
                   help="statement mode: most notifications per statement before the "
                   "keys are left out (default: %(default)s)")
    p.add_argument("--sql", action="store_true",
                   help="print the SQL instead of running it (for a migration); changes nothing")
    add_dsn_argument(p)
    p.set_defaults(func=cmd_watch)

    p = subparsers.add_parser(
        "unwatch", help="remove pgcast's change feeds from TABLE",
    )
    p.add_argument("table", metavar="TABLE")
    p.add_argument("--channel", help="remove only the feed on this channel")
    add_dsn_argument(p)
    p.set_defaults(func=cmd_unwatch)

    p = subparsers.add_parser(
        "worker", help="run a pgcast.Worker given as MODULE:ATTRIBUTE",
        description="Import MODULE (the current directory first on the path) and run "
        "its ATTRIBUTE, a pgcast.Worker or a function returning one, until SIGTERM or "
        "Ctrl-C; the batch in hand is finished before exiting.",
    )
    p.add_argument("target", metavar="MODULE:ATTRIBUTE")
    add_dsn_argument(p)
    p.set_defaults(func=cmd_worker)


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_watch(args: argparse.Namespace) -> int:
    if args.sql:
        with connection(args) as conn:
            text = triggers.sql_text(
                conn, args.table, channel=args.channel,
                operations=_split(args.operations) or (), columns=_split(args.columns),
                per=args.per, max_parts=args.max_parts,
            )
        print(text, end="", flush=True)
        return 0
    with connection(args) as conn:
        feed = triggers.watch_table(
            conn,
            args.table,
            channel=args.channel,
            operations=_split(args.operations) or (),
            columns=_split(args.columns),
            per=args.per,
            max_parts=args.max_parts,
        )
    key = ", ".join(feed.key) if feed.key else "none (events carry key null)"
    print(f"watching {feed.schema}.{feed.table} ({', '.join(feed.operations)}, per "
          f"{feed.per}, key: {key}) on channel:", file=sys.stderr)
    print(feed.channel, flush=True)
    return 0


def cmd_unwatch(args: argparse.Namespace) -> int:
    with connection(args) as conn:
        dropped = triggers.unwatch_table(conn, args.table, args.channel)
    what = f"the feed on {args.channel!r}" if args.channel else "the change feeds"
    if dropped:
        print(f"removed {what} of {args.table} ({dropped} triggers)", file=sys.stderr)
    else:
        print(f"{args.table} had no pgcast change feed to remove", file=sys.stderr)
    return 0


def load_worker(target: str) -> Any:
    """Import ``module:attribute`` and return the Worker it names.

    A function is called with no arguments and must return a Worker.

    :raises ValueError: *target* is malformed, or does not name a Worker.
    """
    from ..worker import Worker

    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected MODULE:ATTRIBUTE (e.g. myapp.workers:worker), got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ValueError(f"cannot import module {module_name!r}: {exc}") from exc
        raise
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(obj, Worker) and callable(obj):
        try:
            obj = obj()
        except TypeError as exc:
            raise ValueError(f"{target} is not a pgcast.Worker, and calling it with no "
                             f"arguments failed: {exc}") from exc
    if not isinstance(obj, Worker):
        raise ValueError(f"{target} is a {type(obj).__name__}, not a pgcast.Worker "
                         "(or a function returning one)")
    return obj


def cmd_worker(args: argparse.Namespace) -> int:
    worker = load_worker(args.target)
    if args.dsn or not worker.dsn:
        worker.dsn = resolve_dsn(args)
    print(f"pgcast worker {args.target} running: {worker!r}", file=sys.stderr, flush=True)
    worker.run()
    print("pgcast worker stopped", file=sys.stderr, flush=True)
    return 0
