"""``pgcast listen`` and ``pgcast notify``."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from .. import client
from .._errors import PgcastError
from .._event import Event, UndecodableEvent
from .._reconnect import Reconnected
from ._common import EXIT_NOTHING, EXIT_OK, UsageError, add_dsn_argument, resolve_dsn

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
                   help=f"stop after S seconds (exit code {EXIT_NOTHING} if nothing came)")
    p.add_argument("--decode", action="store_true",
                   help="print a payload that is JSON as that JSON value, not as a string")
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


def event_line(event: Any, decode: bool = False) -> str:
    """The JSON line ``pgcast listen`` prints for *event*; with *decode*, a
    payload that is valid JSON is printed as that value (else as a string).
    An :class:`~pgcast.UndecodableEvent` adds ``raw``, its bytes in base64."""
    payload: Any = event.payload
    if decode:
        with contextlib.suppress(ValueError):
            payload = json.loads(payload)
    record = {"channel": event.channel, "payload": payload, "pid": event.pid}
    if isinstance(event, UndecodableEvent):  # not UTF-8: the bytes, as the gateway sends them
        record["raw"] = base64.b64encode(event.raw).decode("ascii")
    record["received"] = datetime.now(UTC).isoformat(timespec="microseconds")
    return json.dumps(record, ensure_ascii=False)


def cmd_listen(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.timeout is not None and not args.timeout > 0:  # NaN: never timing out
        raise UsageError("--timeout must be > 0 seconds")
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    seen = 0
    with client.connect(resolve_dsn(args)) as ps:
        ps.listen(*args.channels)
        print(f"listening on {', '.join(args.channels)} (pid {ps.backend_pid})",
              file=sys.stderr, flush=True)
        slice_ = 0.5 if deadline is None else min(0.5, args.timeout)
        for event in ps.events(select_timeout=slice_, yield_timeouts=True):
            if isinstance(event, Reconnected):
                print(f"pgcast listen: reconnected after the connection was lost "
                      f"({event.error}); notifications sent meanwhile may be missed",
                      file=sys.stderr, flush=True)
            elif isinstance(event, Event):
                print(event_line(event, args.decode), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    return EXIT_OK
            if deadline is not None and time.monotonic() >= deadline:
                return EXIT_OK if seen else EXIT_NOTHING
    return EXIT_OK


def cmd_notify(args: argparse.Namespace) -> int:
    with client.connect(resolve_dsn(args)) as ps:
        if args.payload is not None:
            ps.notify(args.channel, args.payload)
            return 0
        if sys.stdin.isatty():
            print(f"pgcast notify: reading payloads for {args.channel} from the terminal, one "
                  "per line; Ctrl-D to end (or give the payload as an argument)",
                  file=sys.stderr, flush=True)
        sent = 0
        try:
            # Bytes, decoded a line at a time: a line that is not text names
            # itself (a text stream fails at the chunk it read ahead).
            for raw in sys.stdin.buffer:
                # The line without its end, "\n" or "\r\n" (text from Windows).
                line = raw.removesuffix(b"\n").removesuffix(b"\r").decode(sys.stdin.encoding)
                ps.notify(args.channel, line)
                sent += 1
        except (PgcastError, UnicodeDecodeError) as exc:
            raise _stopped(sent, exc) from exc
    return 0


def _stopped(sent: int, exc: Exception) -> ValueError:
    """The error of ``pgcast notify`` reading stdin: which line stopped it,
    what was sent before it, that nothing after it was read."""
    why = str(exc)
    if isinstance(exc, UnicodeDecodeError):
        why = f"it is not {sys.stdin.encoding} text ({exc.reason})"
    return ValueError(
        f"line {sent + 1} of stdin: {why}; the {sent} line(s) before it were sent, "
        "the lines after it were not read"
    )
