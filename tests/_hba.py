"""A fixture for the wrong-password tests of the sync and asyncio clients.

The embedded server trusts every local login, so to see PostgreSQL refuse a
password a pg_hba.conf line asking one throwaway role for a password is put
first, the configuration reloaded, and both undone afterwards. Tests using it
need the embedded server (the ``server`` fixture skips with PGCAST_TEST_DSN).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgcast.embedded import EmbeddedServer


@pytest.fixture
def password_role(
    server: EmbeddedServer, conn: psycopg.Connection[tuple[Any, ...]]
) -> Iterator[tuple[str, str]]:
    """A role that must log in with a password over TCP.

    The embedded server trusts every local login, so a pg_hba.conf line that
    asks this one role for a password goes first, and is removed afterwards.
    """
    role = f"pgcast_pw_{uuid.uuid4().hex[:8]}"
    password = "right-password"
    conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    row = conn.execute("SHOW hba_file").fetchone()
    assert row is not None
    hba = row[0]
    with open(hba) as f:
        original = f.read()
    line = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
    try:
        with open(hba, "w") as f:
            f.write(line + original)
        conn.execute("SELECT pg_reload_conf()")
        url = f"postgresql://{role}:wrong@127.0.0.1:{server.port}/postgres"
        deadline = time.monotonic() + 10
        while True:  # the postmaster reloads asynchronously
            try:
                psycopg.connect(url, connect_timeout=5).close()
            except psycopg.OperationalError:
                break
            assert time.monotonic() < deadline, "pg_hba.conf reload not seen in 10 s"
            time.sleep(0.05)
        yield role, password
    finally:
        with open(hba) as f:
            current = f.read()
        with open(hba, "w") as f:
            f.write(current.replace(line, "", 1))
        conn.execute("SELECT pg_reload_conf()")
        conn.execute(f"DROP ROLE IF EXISTS {role}")
