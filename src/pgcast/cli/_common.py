"""Helpers shared by the subcommands: the ``--dsn`` option and its fallbacks."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["UsageError", "add_dsn_argument", "resolve_dsn"]


class UsageError(ValueError):
    """Options that contradict each other or are missing: one line, exit 2."""


def add_dsn_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        help="PostgreSQL DSN or URL (default: PGCAST_DSN, DATABASE_URL, then PG* variables, "
        "else the embedded server, started if needed)",
    )


def resolve_dsn(args: argparse.Namespace) -> str:
    """``--dsn``, else ``DATABASE_URL``, else libpq's ``PG*`` variables (an
    empty DSN), else the persistent embedded server, started (and announced on
    stderr) if needed."""
    dsn: str | None = getattr(args, "dsn", None)
    if dsn:
        return dsn
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    if any(k in os.environ for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")):
        return ""
    from ..embedded import default_datadir, ensure_running, persistent_dsn

    if (running := persistent_dsn()) is not None:
        return running
    dsn = ensure_running()
    print(f"pgcast: no DSN given: using the embedded PostgreSQL at {dsn} (data in "
          f"{default_datadir()}); it keeps running: `pgcast embedded stop` stops it",
          file=sys.stderr, flush=True)
    return dsn
