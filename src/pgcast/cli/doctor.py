"""``pgcast doctor``: is this server fit for LISTEN/NOTIFY, and how is it set up?

Prints the checks of :func:`pgcast.diagnostics.run_checks` (connection,
primary or standby, LISTEN confirmed by ``pg_listening_channels()``, a
notification round trip, queue usage) and the server's notify-related
settings. Exit code 0 when no check failed (warnings allowed), 1 otherwise;
``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..diagnostics import Report, run_checks
from ._common import add_dsn_argument, resolve_dsn

__all__ = ["format_report", "register"]

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check that the server suits LISTEN/NOTIFY and print its notify settings",
        description="Connect, check that the server is a primary, that LISTEN takes effect "
        "(pg_listening_channels(); a pooler in transaction mode fails this), that a "
        "notification comes back, and how full the notification queue is; then print "
        "the server's notify-related settings. Exits 1 if a check failed.",
    )
    add_dsn_argument(p)
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for the connection and the round trip (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_doctor)


def format_report(report: Report) -> str:
    """The report as aligned text lines."""
    width = max((len(c.name) for c in report.checks), default=0)
    lines = ["checks"]
    lines += [f"  {_MARK[c.verdict]}  {c.name:<{width}}  {c.detail}" for c in report.checks]
    if report.settings:
        lines.append("settings")
        sw = max(len(name) for name in report.settings)
        for name, value in report.settings.items():
            shown = value if value is not None else "(not on this server)"
            lines.append(f"  {name:<{sw}}  {shown}")
    lines.append("result: " + ("ok" if report.ok else "problems found"))
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise ValueError("--timeout must be > 0 seconds")
    report = run_checks(resolve_dsn(args), timeout=args.timeout)
    if args.json:
        print(json.dumps({
            "ok": report.ok,
            "checks": [
                {"name": c.name, "verdict": c.verdict, "detail": c.detail} for c in report.checks
            ],
            "settings": report.settings,
        }, ensure_ascii=False))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
