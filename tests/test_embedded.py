"""The embedded server, against real PostgreSQL 18 processes (no mocks).

These tests start their own servers, so they run even with PGCAST_TEST_DSN set.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from pgcast.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    default_datadir,
    ensure_running,
    server,
)


def query(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


@pytest.fixture(scope="module")
def srv() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(
        settings={"max_connections": 42, "jit": False, "statement_timeout": "7s"}
    ) as s:
        yield s


def test_settings_take_effect(srv: EmbeddedServer) -> None:
    assert query(srv.dsn, "SHOW max_connections") == "42"
    assert query(srv.dsn, "SHOW jit") == "off"
    assert query(srv.dsn, "SHOW statement_timeout") == "7s"


def test_dsns(srv: EmbeddedServer) -> None:
    assert srv.dsn == f"postgresql://postgres@127.0.0.1:{srv.port}/postgres"
    assert query(srv.dsn, "SELECT current_user") == "postgres"
    # Over the Unix socket, the server reports no client address.
    assert query(srv.socket_dsn, "SELECT inet_client_addr()") is None
    assert query(srv.socket_dsn, "SELECT version()") == query(srv.dsn, "SELECT version()")
    assert str(query(srv.dsn, "SHOW server_version")).startswith("18")


def test_psql_command(srv: EmbeddedServer) -> None:
    argv = srv.psql_command("SELECT 40 + 2", "-At")
    assert Path(argv[0]).parent == srv.bin_dir
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == "42"

    failing = srv.psql_command("SELECT nonsense")
    done = subprocess.run(failing, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    assert "nonsense" in done.stderr


def test_create_database(srv: EmbeddedServer) -> None:
    db_dsn = srv.create_database("Other DB")
    assert query(db_dsn, "SELECT current_database()") == "Other DB"


def test_start_stop_temporary() -> None:
    s = EmbeddedServer()
    with pytest.raises(EmbeddedServerError, match="start"):
        _ = s.dsn
    try:
        s.start()
        assert s.is_running
        s.start()  # already running: nothing to do
        assert query(s.dsn, "SELECT 1") == 1
    finally:
        s.stop()
    assert not s.is_running
    assert not s.datadir.exists()
    s.stop()  # idempotent


def test_restart_and_kill_keep_port_and_data() -> None:
    with EmbeddedServer() as s:
        port = s.port
        with psycopg.connect(s.dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (1)")
            s.restart()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")  # the restart dropped it
        assert s.port == port
        assert query(s.dsn, "SELECT sum(x) FROM t") == 1

        s.kill()
        assert not s.is_running
        s.start()  # crash recovery
        assert s.port == port
        assert query(s.socket_dsn, "SELECT sum(x) FROM t") == 1


def test_persistent_datadir_attach(tmp_path: Path) -> None:
    datadir = tmp_path / "pg"
    owner = EmbeddedServer(datadir, persistent=True)
    owner.start()
    try:
        with pytest.raises(EmbeddedServerError, match="persistent=True"):
            EmbeddedServer(datadir).start()
        with EmbeddedServer(datadir, persistent=True) as attached:
            assert attached.port == owner.port
            assert attached.dsn == owner.dsn
            assert query(attached.socket_dsn, "SELECT 1") == 1
        assert owner.is_running  # leaving an attached server's block leaves it running
    finally:
        owner.stop()
    assert not owner.is_running
    assert (datadir / "PG_VERSION").exists()  # a given directory is kept

    with EmbeddedServer(datadir, persistent=True) as again:  # reuses the cluster
        assert query(again.dsn, "SELECT 1") == 1


def test_ensure_running_twice_gives_same_dsn(tmp_path: Path) -> None:
    datadir = tmp_path / "cli" / "pg18"
    try:
        with ThreadPoolExecutor(2) as pool:  # the lock makes concurrent starts safe
            first, second = pool.map(ensure_running, [datadir, datadir])
        assert first == second
        assert ensure_running(datadir) == first
        assert query(first, "SELECT 1") == 1
    finally:
        EmbeddedServer(datadir, persistent=True).stop()


def test_bad_setting_fails_with_server_log() -> None:
    s = EmbeddedServer(settings={"max_connections": "banana"})
    try:
        with pytest.raises(EmbeddedServerError) as info:
            s.start()
        message = str(info.value)
        assert "server log" in message
        assert 'invalid value for parameter "max_connections": "banana"' in message
        assert not s.is_running
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"port": 5432}, "port="),
        ({"unix_socket_directories": "/tmp"}, "socket"),
        ({"max_connections; rm -rf /": 1}, "invalid setting name"),
    ],
)
def test_settings_are_validated(settings: dict[str, int | str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EmbeddedServer(settings=settings)


def test_server_context_manager() -> None:
    with server(settings={"max_connections": 30}) as dsn:
        assert query(dsn, "SHOW max_connections") == "30"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=3).close()


def test_default_datadir() -> None:
    path = default_datadir()
    assert path.is_absolute()
    assert path.parts[-2:] == ("pgcast", "pg18")
