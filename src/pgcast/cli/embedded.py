"""``pgcast embedded status|stop``: the persistent embedded PostgreSQL that
commands without a DSN start (and announce on stderr)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "embedded", help="status or stop of the embedded PostgreSQL the CLI starts",
        description="Commands given no DSN start a persistent embedded PostgreSQL "
        "(needs pgcast[embedded]); it keeps running until `pgcast embedded stop`.",
    )
    p.add_argument("action", choices=("status", "stop"))
    p.set_defaults(func=cmd_embedded)


def cmd_embedded(args: argparse.Namespace) -> int:
    from ..embedded import default_datadir, persistent_dsn, stop_persistent

    datadir = default_datadir()
    if args.action == "status":
        dsn = persistent_dsn(datadir)
        if dsn is None:
            print(f"not running (data directory {datadir})")
        else:
            print(f"running at {dsn} (data directory {datadir})")
        return 0
    if stop_persistent(datadir):
        print(f"stopped (data kept in {datadir})")
    else:
        print("not running")
    return 0
