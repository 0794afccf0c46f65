"""``pgcast init``, ``pgcast prune``, ``pgcast consumers``: the schema of
durable channels, retention, and the named consumers' lag.

``pgcast init`` installs the ``pgcast`` schema (or migrates it to this
release's version); it is idempotent. ``pgcast prune`` deletes old messages
from the log: by default those older than 7 days; ``--keep-last N`` keeps the
newest N of each channel whatever their age (with ``--older-than 0``, only
those). It keeps what a named consumer has not acknowledged, unless
``--force`` or older than ``--max-age``, and says which consumers it held
messages for and which it left behind. ``pgcast consumers`` lists every
consumer's position and how far it is behind. See :mod:`pgcast.durable`.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from typing import Any

from ..durable import consumers, install_schema, prune
from ..durable._lag import ConsumerLag
from ..durable._schema import DEFAULT_RETENTION, LATEST_VERSION, parse_duration
from ._common import add_dsn_argument, connection

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``init``, ``prune`` and ``consumers``."""
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
    p.add_argument(
        "--force", action="store_true",
        help="delete even what a named consumer has not acknowledged (it gets a gap)",
    )
    p.add_argument(
        "--max-age", metavar="AGE", type=_age,
        help="delete what a named consumer has not acknowledged once older than AGE",
    )
    add_dsn_argument(p)
    p.set_defaults(func=cmd_prune)

    p = subparsers.add_parser(
        "consumers",
        help="list named consumers: position, messages and time behind, retention",
        description="List every named consumer of every durable channel: its position "
        "(the last id it acknowledged), how many messages and how much time it is "
        "behind, and its status: ok; holding (it has not acknowledged messages older "
        "than --retention, which prune keeps for it); lost (messages it had not "
        "acknowledged were deleted: it gets a gap when it resumes).",
    )
    p.add_argument(
        "--retention", metavar="AGE", type=_age, default=DEFAULT_RETENTION,
        help=f"the retention prune runs with (default {days}d)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    add_dsn_argument(p)
    p.set_defaults(func=cmd_consumers)


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


def cmd_init(args: argparse.Namespace) -> int:
    """Install or migrate the schema; say what was done."""
    with connection(args) as conn:
        before = install_schema(conn)
    if before == LATEST_VERSION:
        print(f"pgcast schema is up to date (version {LATEST_VERSION})")
    elif before == 0:
        print(f"pgcast schema installed (version {LATEST_VERSION})")
    else:
        print(f"pgcast schema migrated from version {before} to {LATEST_VERSION}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune the log; print the count deleted per channel and the total, then
    what was kept for consumers and which consumers were left behind."""
    with connection(args) as conn:
        result = prune(conn, args.older_than, args.keep_last, args.channel,
                       force=args.force, max_age=args.max_age)
    for channel, count in result.items():
        print(f"{channel}\t{count}")
    print(f"pruned {sum(result.values())} message(s)")
    for channel, count in result.held.items():
        print(f"kept {count} message(s) of {channel!r} that a consumer has not "
              "acknowledged (--force or --max-age deletes them)")
    for behind in result.left_behind:
        print(f"left behind: consumer {behind.consumer!r} on {behind.channel!r} (at "
              f"{behind.position}) lost messages it had not acknowledged")
    return 0


def _duration(value: timedelta | None) -> str:
    """``3.5d``, ``2.0h``, ``12.3m``, ``40s``, or ``-`` for none."""
    if value is None:
        return "-"
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _lag_json(lag: ConsumerLag) -> str:
    return json.dumps({
        "name": lag.name, "channel": lag.channel, "position": lag.position,
        "behind": lag.behind,
        "seconds_behind": None if lag.time_behind is None else lag.time_behind.total_seconds(),
        "status": lag.status, "lost": lag.lost, "updated_at": lag.updated_at.isoformat(),
    }, ensure_ascii=False)


def cmd_consumers(args: argparse.Namespace) -> int:
    """List the consumers and their lag."""
    with connection(args) as conn:
        lags = consumers(conn, args.retention)
    if args.json:
        for lag in lags:
            print(_lag_json(lag))
        return 0
    if not lags:
        print("no named consumers")
        return 0
    rows = [("consumer", "channel", "position", "behind", "time behind", "status")]
    rows += [(lag.name, lag.channel, str(lag.position), str(lag.behind),
              _duration(lag.time_behind), lag.status) for lag in lags]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0
