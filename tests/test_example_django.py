"""The Django example (examples/django_app) against a real PostgreSQL.

In a fresh database of its own: ``manage.py migrate`` creates the table and
applies migration 0002, the SQL of ``pgcast watch --sql``; that SQL is what
``pgcast.triggers.sql_text()`` gives for the migrated table today (so the
shipped file cannot go stale unnoticed); an order placed in a Django
transaction is announced at commit, on its channel and by the table's
triggers, and an order rolled back is announced by neither; reversing the
migration drops the triggers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgcast

pytest.importorskip("django")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "django_app"
SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 60.0


@pytest.fixture
def own_database(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh database, so the example's tables meet no other test's."""
    name = f"django_{uuid.uuid4().hex[:10]}"
    conn.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(dsn, dbname=name)
    conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def manage(dsn: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGCAST_DSN": dsn,
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=EXAMPLE, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"manage.py {' '.join(args)} took over {TIMEOUT} s") from exc
    assert done.returncode == expect, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def triggers(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'orders_order'::regclass "
                        "AND NOT tgisinternal ORDER BY tgname").fetchall()
    return [r[0] for r in rows]


def test_migrations_notify_at_commit_and_never_on_rollback(own_database: str) -> None:
    manage(own_database, "migrate")
    with psycopg.connect(own_database, autocommit=True) as conn:
        shipped = (EXAMPLE / "orders" / "migrations" / "0002_watch_orders.sql").read_text()
        assert shipped == pgcast.triggers.sql_text(conn, "orders_order",
                                                   channel="orders_changed")
        assert triggers(conn) == ["pgcast_orders_changed_delete",
                                  "pgcast_orders_changed_insert",
                                  "pgcast_orders_changed_update"]

        with pgcast.connect(own_database) as ps:
            ps.listen("orders", "orders_changed")
            assert "placed order 1" in manage(own_database, "place_order", "tea", "2").stdout
            failed = manage(own_database, "place_order", "cake", "1", "--fail", expect=1)
            assert "rolled back" in failed.stderr
            conn.execute("NOTIFY orders, 'end'")  # after both, on the same server
            got: list[tuple[str, Any]] = []
            for item in ps.wait(timeout=TIMEOUT):
                assert item is not None, f"the end marker never came; got {got!r}"
                if isinstance(item, pgcast.Event):
                    if item.payload == "end":
                        break
                    got.append((item.channel, item.json()))
        assert conn.execute("SELECT id, item FROM orders_order").fetchall() == [(1, "tea")]

    # One order, announced twice: by the application and by the trigger.
    assert ("orders", {"id": 1, "item": "tea", "quantity": 2}) in got
    changes = [data for channel, data in got if channel == "orders_changed"]
    assert len(got) == 2 and len(changes) == 1
    assert changes[0]["op"] == "INSERT" and changes[0]["key"] == {"id": 1}
    assert changes[0]["table"] == "orders_order"


def test_reversing_the_migration_drops_the_triggers(own_database: str) -> None:
    manage(own_database, "migrate")
    manage(own_database, "migrate", "orders", "0001")
    with psycopg.connect(own_database, autocommit=True) as conn:
        assert triggers(conn) == []
