"""The cache-invalidation example (examples/cache_invalidation) runs end to end.

``run.py`` checks its own outcome (which cache files were cleared, the queue
backlog drained) and exits 1 if any check failed; these tests run it as a user
would: once on its own embedded server, once with ``--dsn``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "cache_invalidation" / "run.py"
TIMEOUT = 90.0


def run_example(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PGCAST_DSN"}
    try:
        done = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True,
                              text=True, timeout=TIMEOUT, check=False, env=env)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the example did not finish in {TIMEOUT} s") from exc
    assert done.returncode == expect, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


@pytest.fixture
def own_database(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh database, so the example's ``ports`` table meets no other test's."""
    name = f"example_{uuid.uuid4().hex[:10]}"
    conn.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(dsn, dbname=name)
    conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.slow  # starts a server of its own
def test_the_example_runs_on_its_own_embedded_server() -> None:
    done = run_example()
    assert "all checks passed" in done.stdout
    assert "cleared: ['databases/postgresql18-server', 'databases/redis', 'lang/ruby', " \
           "'www/nginx']" in done.stdout
    assert "jobs waiting: 2" in done.stdout and "jobs waiting: 0" in done.stdout


def test_the_example_runs_on_a_given_database(own_database: str, tmp_path: pathlib.Path) -> None:
    done = run_example("--dsn", own_database, "--cache-dir", str(tmp_path / "cache"))
    assert "all checks passed" in done.stdout
    # The pages the example rendered after its last change are still there.
    kept = sorted(p.relative_to(tmp_path / "cache").as_posix()
                  for p in (tmp_path / "cache").glob("*/*.html"))
    assert kept == ["databases/postgresql18-server.html", "databases/redis.html",
                    "sysutils/tmux.html", "www/caddy.html"]


def test_the_example_refuses_to_touch_an_existing_ports_table(
    own_database: str, tmp_path: pathlib.Path
) -> None:
    """A user's own ``ports`` table is never dropped without --reset: the
    example stops with exit 2 and one line, and the rows are still there."""
    with psycopg.connect(own_database, autocommit=True) as user:
        user.execute("CREATE TABLE ports (id int PRIMARY KEY, precious text)")
        user.execute("INSERT INTO ports VALUES (1, 'my data')")
        done = run_example("--dsn", own_database, "--cache-dir", str(tmp_path / "c1"), expect=2)
        assert "--reset" in done.stderr and "Traceback" not in done.stderr
        assert user.execute("SELECT * FROM ports").fetchall() == [(1, "my data")]
        done = run_example("--dsn", own_database, "--cache-dir", str(tmp_path / "c2"),
                           "--reset")
        assert "all checks passed" in done.stdout
