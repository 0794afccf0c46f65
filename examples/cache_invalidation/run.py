"""The FreshPorts cache-invalidation case, end to end, in one command.

    python examples/cache_invalidation/run.py            # on a throwaway embedded server
    python examples/cache_invalidation/run.py --dsn postgresql://...

It creates a ``ports`` table and a cache of one HTML file per port, then:

1. **Change feed.** ``watch_table`` puts a trigger on ``ports``; ``app.worker``
   runs. Several "scripts" change ports: an update, a delete, a bulk update
   of a whole category in one statement, and an update that rolls back. The
   changed ports' files disappear; the others, and the rolled-back one, stay.
2. **Queue table.** With ``app.durable_worker`` *not running*, more ports
   change; their jobs wait in ``pgcast.queue_ports_cache_clearing``. The
   worker starts, drains the backlog, and the files disappear.

It prints what happens and exits 0 when every check held, 1 otherwise.
On a database you pass (``--dsn`` or ``PGCAST_DSN``) it creates a table named
``ports``; if one exists it stops and changes nothing, unless ``--reset`` says
it may drop and replace it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import app
import psycopg

import pgcast

PORTS = [
    ("www", "nginx", "1.26"),
    ("www", "caddy", "2.8"),
    ("lang", "ruby", "3.3"),
    ("lang", "python", "3.12"),
    ("databases", "postgresql18-server", "18.1"),
    ("databases", "redis", "7.4"),
    ("sysutils", "tmux", "3.5"),
]
WAIT = 30.0


class ExistingTable(Exception):
    """A ``ports`` table exists and --reset was not given."""


def setup(conn: psycopg.Connection[Any], *, reset: bool = False) -> None:
    """The ports table, its change feed, and the trigger feeding the queue."""
    row = conn.execute("SELECT to_regclass('ports')::text").fetchone()
    if row is not None and row[0] is not None:
        if not reset:
            raise ExistingTable(
                f"this database already has a table {row[0]!r}: the example would drop "
                "it. Use another database, or pass --reset to let it replace that table"
            )
        conn.execute("DROP TABLE ports")
    conn.execute(
        "CREATE TABLE ports (category text, name text, version text NOT NULL,"
        " PRIMARY KEY (category, name))"
    )
    conn.cursor().executemany("INSERT INTO ports VALUES (%s, %s, %s)", PORTS)
    feed = pgcast.watch_table(conn, "ports", channel="ports_changed",
                              operations=("INSERT", "UPDATE", "DELETE", "TRUNCATE"))
    print(f"watching {feed.schema}.{feed.table} on {feed.channel!r}, key {feed.key}")
    app.CLEARING.install(conn)
    conn.execute(f"""
        CREATE OR REPLACE FUNCTION ports_enqueue_cache_clearing() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE r ports;
        BEGIN
            r := CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
            INSERT INTO pgcast.{app.CLEARING.table} (payload)
            VALUES (jsonb_build_object('category', r.category, 'name', r.name));
            RETURN NULL;
        END $$""")
    conn.execute(
        "CREATE TRIGGER ports_cache_clearing AFTER INSERT OR UPDATE OR DELETE ON ports"
        " FOR EACH ROW EXECUTE FUNCTION ports_enqueue_cache_clearing()"
    )


def render_cache(conn: psycopg.Connection[Any]) -> None:
    """Write every port's page, as the web site would on a cache miss."""
    for category, name, version in conn.execute("SELECT * FROM ports"):
        path = app.cache_file(category, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<h1>{category}/{name} {version}</h1>\n")


def cached() -> set[str]:
    return {f"{p.parent.name}/{p.stem}" for p in app.CACHE_DIR.glob("*/*.html")}


def wait_for(what: str, check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    print(f"FAILED: {what} within {WAIT} s", file=sys.stderr)
    return False


@contextlib.contextmanager
def running(worker: pgcast.Worker, dsn: str) -> Iterator[None]:
    worker.dsn = dsn
    thread = worker.run_in_thread()
    try:
        if not worker.wait_ready(WAIT):
            raise RuntimeError("the worker did not start")
        yield
    finally:
        thread.stop()


def change_feed(dsn: str, conn: psycopg.Connection[Any]) -> bool:
    print("\n1. change feed: app.worker is running")
    render_cache(conn)
    before = cached()
    with running(app.worker, dsn):
        conn.execute("UPDATE ports SET version = '1.27' WHERE name = 'nginx'")
        conn.execute("DELETE FROM ports WHERE name = 'ruby'")
        conn.execute("UPDATE ports SET version = version || '_1' WHERE category = 'databases'")
        with contextlib.suppress(RuntimeError), conn.transaction():
            conn.execute("UPDATE ports SET version = '4.0' WHERE name = 'python'")
            raise RuntimeError("this script fails: its change rolls back, unannounced")
        changed = {"www/nginx", "lang/ruby", "databases/postgresql18-server",
                   "databases/redis"}
        ok = wait_for("the changed ports' pages to be cleared",
                      lambda: cached() == before - changed)
    print(f"   cleared: {sorted(before - cached())}")
    print(f"   kept:    {sorted(cached())}")
    return ok


def queue_table(dsn: str, conn: psycopg.Connection[Any]) -> bool:
    print("\n2. queue table: app.durable_worker is down while ports change")
    conn.execute(f"DELETE FROM pgcast.{app.CLEARING.table}")  # part 1's jobs
    render_cache(conn)
    before = cached()
    conn.execute("UPDATE ports SET version = '1.28' WHERE name = 'nginx'")
    conn.execute("UPDATE ports SET version = '3.13' WHERE name = 'python'")
    print(f"   jobs waiting: {app.CLEARING.pending(conn)}; pages still cached: {len(cached())}")
    with running(app.durable_worker, dsn):  # ready means: the backlog is drained
        ok = cached() == before - {"www/nginx", "lang/python"}
        ok = ok and app.CLEARING.pending(conn) == 0
    print(f"   after the worker started: cleared {sorted(before - cached())}, "
          f"jobs waiting: {app.CLEARING.pending(conn)}")
    if not ok:
        print("FAILED: the backlog was not drained as expected", file=sys.stderr)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL to use (default: PGCAST_DSN, else a "
                        "throwaway embedded one)")
    parser.add_argument("--cache-dir", type=Path, help="default: a temporary directory")
    parser.add_argument("--reset", action="store_true",
                        help="drop and replace an existing table named ports")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or os.environ.get("PGCAST_DSN")
        if not dsn:
            from pgcast.embedded import server  # needs pgcast[embedded]

            dsn = stack.enter_context(server())
        app.CACHE_DIR = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        print(f"database: {dsn}\ncache:    {app.CACHE_DIR}")
        conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))
        try:
            setup(conn, reset=args.reset)
        except ExistingTable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        ok = change_feed(dsn, conn)
        ok = queue_table(dsn, conn) and ok
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
