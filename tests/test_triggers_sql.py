"""``pgcast.triggers.sql_text``: the SQL of ``watch_table`` as text for a
migration. Reading it changes nothing; running it (as a migration would, in a
database without the pgcast schema) gives a working feed."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import psycopg

import pgcast
import pgcast.triggers


def test_sql_text_changes_nothing_and_works_when_run(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    table = f"migr_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
    try:
        before = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass", (table,)
        ).fetchone()
        text = pgcast.triggers.sql_text(conn, table, channel=f"{table}_changed")
        after = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass", (table,)
        ).fetchone()
        assert before == after == (0,)
        assert "CREATE TRIGGER" in text and "CREATE SCHEMA IF NOT EXISTS pgcast" in text
        with pgcast.connect(dsn) as ps:
            ps.listen(f"{table}_changed")
            conn.execute(text.encode())  # as a migration's RunSQL would
            conn.execute(text.encode())  # and idempotent
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            for item in ps.wait(timeout=10.0):
                assert isinstance(item, pgcast.Event), item
                change = pgcast.triggers.Change.from_event(item)
                assert change.op == "INSERT" and change.row == {"id": 1, "name": "a"}
                break
    finally:
        conn.execute(f"DROP TABLE {table}")


def test_pgcast_watch_sql_prints_the_same_text(conn: psycopg.Connection[Any], dsn: str) -> None:
    table = f"migr_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pgcast", "watch", table, "--sql", "--dsn", dsn],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == pgcast.triggers.sql_text(conn, table)
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass", (table,)
        ).fetchone()
        assert triggers == (0,)
    finally:
        conn.execute(f"DROP TABLE {table}")
