"""The durable channels' commands: ``pgcast init`` and ``pgcast prune``.

They run as a subprocess, the way a user runs them: no flavour (the sync
and asyncio drivers are tested in tests/test_aio_durable.py).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
import pytest

import pgcast
from _durable_log import age, log_rows
from pgcast.durable import install_schema
from pgcast.durable._schema import LATEST_VERSION

Conn = psycopg.Connection[tuple[Any, ...]]


def pgcast_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "pgcast", *args], capture_output=True, text=True,
            timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"pgcast {' '.join(args)} did not finish in {timeout} s")


def test_cli_init(fresh_dsn: str) -> None:
    done = pgcast_cli("init", "--dsn", fresh_dsn)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"pgcast schema installed (version {LATEST_VERSION})\n"
    done = pgcast_cli("init", "--dsn", fresh_dsn)
    assert done.stdout == f"pgcast schema is up to date (version {LATEST_VERSION})\n"


def test_cli_prune(dsn: str, conn: Conn, unique_channel: str) -> None:
    install_schema(conn)
    with pgcast.connect(dsn) as pub:
        sent = [pub.notify(unique_channel, str(i), durable=True) or 0 for i in range(5)]
    done = pgcast_cli("prune", "--dsn", dsn, "--channel", unique_channel)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "pruned 0 message(s)\n"  # nothing is 7 days old
    age(conn, unique_channel, sent, 2)
    done = pgcast_cli("prune", "--dsn", dsn, "--channel", unique_channel,
                      "--older-than", "1d", "--keep-last", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{unique_channel}\t3\npruned 3 message(s)\n"
    assert [r[1] for r in log_rows(conn, unique_channel)] == ["3", "4"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "7x"], "invalid duration '7x'"),
        (["--keep-last", "-2"], "must be >= 0"),
        (["--keep-last", "many"], "not a whole number"),
    ],
)
def test_cli_prune_usage_errors(args: list[str], message: str) -> None:
    done = pgcast_cli("prune", *args, "--dsn", "postgresql://127.0.0.1:1/none")
    assert done.returncode == 2 and message in done.stderr


def test_cli_prune_without_the_schema_is_one_line(fresh_dsn: str) -> None:
    done = pgcast_cli("prune", "--dsn", fresh_dsn)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "pgcast init" in done.stderr
