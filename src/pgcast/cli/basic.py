"""``pgcast listen`` and ``pgcast notify``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from .. import client
from ._common import UsageError, add_dsn_argument, resolve_dsn

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "listen", help="print one JSON line per notification on CHANNEL...",
        description="Print one JSON line per notification (channel, payload, pid, "
        "received) until Ctrl-C, --count or --timeout.",
    )
    p.add_argument("channels", nargs="+", metavar="CHANNEL")
    p.add_argument("--count", type=int, help="stop after N events")
    p.add_argument("--timeout", type=float,
                   help="stop after S seconds (exit 3 if nothing was received)")
    p.add_argument("--decode", action="store_true",
                   help="print a payload that is valid JSON as JSON, not as a string")
    add_dsn_argument(p)
    p.set_defaults(func=cmd_listen)

    p = subparsers.add_parser(
        "notify", help="send PAYLOAD (or each line of stdin) on CHANNEL",
    )
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("payload", nargs="?", metavar="PAYLOAD",
                   help="the payload; when omitted, one notification per line of stdin")
    add_dsn_argument(p)
    p.set_defaults(func=cmd_notify)


#: ``pgcast listen --timeout`` ended without receiving anything.
EXIT_NOTHING_RECEIVED = 3


def _decoded(payload: str) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return payload


def event_line(event: Any, *, decode: bool = False) -> str:
    """The JSON line ``pgcast listen`` prints for *event* (with *decode*, a
    payload that is valid JSON appears as that JSON value)."""
    record = {
        "channel": event.channel,
        "payload": _decoded(event.payload) if decode else event.payload,
        "pid": event.pid,
        "received": datetime.now(UTC).isoformat(timespec="microseconds"),
    }
    return json.dumps(record, ensure_ascii=False)


def cmd_listen(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be > 0 seconds")
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    seen = 0
    with client.connect(resolve_dsn(args)) as ps:
        ps.listen(*args.channels)
        print(f"listening on {', '.join(args.channels)} (pid {ps.backend_pid})",
              file=sys.stderr, flush=True)
        slice_ = 0.5 if deadline is None else min(0.5, args.timeout)
        for event in ps.events(select_timeout=slice_, yield_timeouts=True):
            if event is not None:
                print(event_line(event, decode=args.decode), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    return 0
            if deadline is not None and time.monotonic() >= deadline:
                return 0 if seen else EXIT_NOTHING_RECEIVED
    return 0


def cmd_notify(args: argparse.Namespace) -> int:
    with client.connect(resolve_dsn(args)) as ps:
        if args.payload is not None:
            ps.notify(args.channel, args.payload)
            return 0
        if sys.stdin.isatty():
            print(f"pgcast notify: reading payloads for {args.channel!r} from the terminal, "
                  "one per line; Ctrl-D ends", file=sys.stderr, flush=True)
        for line in sys.stdin:
            # The line without its end, "\n" or "\r\n" (text from Windows).
            ps.notify(args.channel, line.removesuffix("\n").removesuffix("\r"))
    return 0
