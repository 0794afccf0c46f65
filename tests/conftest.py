"""Shared fixtures: one PostgreSQL per session, real connections, psql.

By default the session runs against an embedded PostgreSQL 18 started once
(``max_connections=600`` so fan-out tests can open many connections). Set
``PGCAST_TEST_DSN`` to run the suite against another server instead; tests
that must stop or restart the server (the ``server`` fixture) are then skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from hypothesis import settings
from psycopg import sql

from pgcast.embedded import BIN_DIR, EmbeddedServer

settings.register_profile("pgcast", deadline=None)
settings.register_profile("ci", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pgcast"))

EXTERNAL_DSN = os.environ.get("PGCAST_TEST_DSN") or None
PSQL_TIMEOUT = 30.0


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedServer | None]:
    """The session's embedded server, or None when PGCAST_TEST_DSN is set."""
    if EXTERNAL_DSN is not None:
        yield None
        return
    with EmbeddedServer(settings={"max_connections": 600}) as srv:
        yield srv


@pytest.fixture(scope="session")
def dsn(pg_server: EmbeddedServer | None) -> str:
    """The DSN every test connects to."""
    if pg_server is None:
        assert EXTERNAL_DSN is not None
        return EXTERNAL_DSN
    return pg_server.dsn


@pytest.fixture
def server(pg_server: EmbeddedServer | None) -> Iterator[EmbeddedServer]:
    """The embedded server, for tests that stop, kill or restart it.

    Whatever the test did, the server is running again afterwards, on the same
    port, for the tests that follow.
    """
    if pg_server is None:
        pytest.skip(
            "PGCAST_TEST_DSN is set: this test stops or restarts the server, "
            "so it needs the embedded one"
        )
    yield pg_server
    if not pg_server.is_running:
        pg_server.start()


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to the test server, closed after the test."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as connection:
        yield connection


@pytest.fixture
def psql(pg_server: EmbeddedServer | None, dsn: str) -> Callable[..., str]:
    """``psql(sql, *args, timeout=30)``: run psql against the test server, return stdout.

    ``args`` go before ``--command`` (``"-At"`` gives bare values). Raises
    AssertionError with psql's stderr if it fails or overruns the timeout.
    """
    if pg_server is not None:
        make_argv = pg_server.psql_command
    else:
        executable = shutil.which("psql") or str(BIN_DIR / "psql")

        def make_argv(sql: str, *args: str) -> list[str]:
            return [
                executable,
                "--no-psqlrc",
                "--set=ON_ERROR_STOP=1",
                f"--dbname={dsn}",
                *args,
                f"--command={sql}",
            ]

    def run(sql: str, *args: str, timeout: float = PSQL_TIMEOUT) -> str:
        argv = make_argv(sql, *args)
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"psql did not finish in {timeout} s: {argv}") from None
        if done.returncode != 0:
            raise AssertionError(
                f"psql exited with status {done.returncode}: {argv}\n{done.stderr}"
            )
        return done.stdout

    return run


@pytest.fixture
def unique_channel() -> str:
    """A channel name no other test (or concurrent run) uses."""
    return f"pgcast_test_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def fresh_dsn(dsn: str, conn: psycopg.Connection[tuple[object, ...]]) -> Iterator[str]:
    """A new, empty database (no pgcast schema), dropped afterwards."""
    name = f"pgcast_fresh_{uuid.uuid4().hex[:12]}"
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(dsn, dbname=name)
    finally:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def _database_in(dsn: str, encoding: str) -> Iterator[str]:
    """A new database in *encoding* (C locale), dropped at the end."""
    name = f"pgcast_{encoding.lower()}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
        c.execute(
            sql.SQL(
                "CREATE DATABASE {} ENCODING {} TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
            ).format(sql.Identifier(name), sql.Literal(encoding))
        )
    try:
        yield psycopg.conninfo.make_conninfo(dsn, dbname=name)
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
            c.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def sql_ascii_dsn(dsn: str) -> Iterator[str]:
    """A database in ``SQL_ASCII``, which stores whatever bytes a session
    sends (the embedded server and PGCAST_TEST_DSN's alike); dropped after
    the test (one per test: tests that restart the embedded server may give
    it a new data directory)."""
    with _database_in(dsn, "SQL_ASCII") as ascii_dsn:
        yield ascii_dsn


@pytest.fixture
def win1252_dsn(dsn: str) -> Iterator[str]:
    """A database in ``WIN1252``, where five bytes have no UTF-8 equivalent."""
    with _database_in(dsn, "WIN1252") as win_dsn:
        yield win_dsn
