"""Retention that waits for named consumers, and their lag: pgcast.prune()
(both flavours), ``pgcast prune``, ``pgcast consumers``, ``pgcast doctor``,
``pgcast init`` upgrading a version-1 schema; and the pure gap decision.

Each test that prunes without a channel, or truncates, gets its own database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgcast
import pgcast.aio
from pgcast.diagnostics import run_checks
from pgcast.durable import LATEST_VERSION, _schema, consumers, install_schema
from pgcast.durable._gaps import decide

Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def db(dsn: str, conn: Conn) -> Iterator[str]:
    """A new database with the pgcast schema, dropped afterwards."""
    name = f"pgcast_consumers_{uuid.uuid4().hex[:12]}"
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = psycopg.conninfo.make_conninfo(dsn, dbname=name)
        with psycopg.connect(url, autocommit=True) as c:
            install_schema(c)
        yield url
    finally:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def publish(c: Conn, channel: str, *payloads: str) -> list[int]:
    return [
        int(c.execute("SELECT pgcast.notify(%s, %s)", (channel, p)).fetchone()[0])  # type: ignore[index]
        for p in payloads
    ]


def consumer(c: Conn, name: str, channel: str, position: int) -> None:
    """Create or move consumer *name*, as ``listen(consumer=, since=)`` does."""
    with pgcast.connect(c.info.dsn, password=c.info.password) as ps:
        ps.listen(channel, durable=True, consumer=name, since=position)


def backdate(c: Conn, ids: list[int], days: int) -> None:
    c.execute("UPDATE pgcast.log SET created_at = now() - make_interval(days => %s) "
              "WHERE id = ANY(%s)", (days, ids))


def payloads(c: Conn, channel: str) -> list[str]:
    return [r[0] for r in c.execute(
        "SELECT payload FROM pgcast.log WHERE channel = %s ORDER BY id", (channel,))]


def pgcast_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "pgcast", *args], capture_output=True, text=True,
            timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"pgcast {' '.join(args)} did not finish in {timeout} s")


# -- prune waits for consumers -----------------------------------------------------------


def test_prune_keeps_what_a_consumer_has_not_acknowledged(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as c:
        ids = publish(c, "jobs", "a", "b", "c", "d", "e")
        publish(c, "free", "x", "y")  # no consumer: pruned as before
        consumer(c, "slow", "jobs", ids[1])
        consumer(c, "fast", "jobs", ids[3])
        result = pgcast.prune(c, older_than=timedelta(0))
        assert result == {"jobs": 2, "free": 2}  # a, b: the slowest consumer has them
        assert result.held == {"jobs": 3}
        assert result.left_behind == []
        assert payloads(c, "jobs") == ["c", "d", "e"]


def test_prune_force_and_max_age_leave_consumers_behind(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as c:
        ids = publish(c, "jobs", "a", "b", "c", "d")
        consumer(c, "slow", "jobs", 0)
        backdate(c, ids[:2], 3)
        result = pgcast.prune(c, older_than=timedelta(0), max_age=timedelta(days=2))
        assert result == {"jobs": 2} and result.held == {"jobs": 2}
        assert [(b.consumer, b.channel, b.position) for b in result.left_behind] == [
            ("slow", "jobs", 0)
        ]
        assert payloads(c, "jobs") == ["c", "d"]
        result = pgcast.prune(c, older_than=timedelta(0), force=True)
        assert result == {"jobs": 2} and result.held == {}
        assert len(result.left_behind) == 1
        assert payloads(c, "jobs") == []
        with pytest.raises(ValueError, match="max_age must not be negative"):
            pgcast.prune(c, max_age=timedelta(seconds=-1))
        with pytest.raises(TypeError, match="force must be True or False"):
            pgcast.prune(c, force="yes")  # type: ignore[arg-type]


def test_a_consumer_of_another_epoch_holds_nothing(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as c:
        consumer(c, "old", "jobs", 0)
        c.execute("TRUNCATE pgcast.log RESTART IDENTITY")
        publish(c, "jobs", "a", "b")
        assert pgcast.prune(c, older_than=timedelta(0)) == {"jobs": 2}
        (lag,) = consumers(c)
        assert (lag.name, lag.status, lag.lost, lag.behind) == ("old", "lost", True, 0)


def test_async_prune_waits_for_consumers(db: str) -> None:
    async def body() -> None:
        with psycopg.connect(db, autocommit=True) as c:
            ids = publish(c, "jobs", "a", "b", "c")
            consumer(c, "w", "jobs", ids[0])
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as ac:
            result = await pgcast.aio.prune(ac, older_than=timedelta(0))
            assert result == {"jobs": 1} and result.held == {"jobs": 2}
            result = await pgcast.aio.prune(ac, older_than=timedelta(0), force=True)
            assert result == {"jobs": 2}
            assert [b.consumer for b in result.left_behind] == ["w"]

    asyncio.run(asyncio.wait_for(body(), 60))


# -- the consumers' lag ------------------------------------------------------------------------


def test_consumers_lists_position_lag_and_status(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as c:
        assert consumers(c) == []
        ids = publish(c, "jobs", "a", "b", "c")
        consumer(c, "ok", "jobs", ids[2])
        consumer(c, "slow", "jobs", 0)
        consumer(c, "gone", "other", 0)
        (other,) = publish(c, "other", "x")
        backdate(c, ids[:1], 10)
        c.execute("DELETE FROM pgcast.log WHERE id = %s", (other,))
        lags = {lag.name: lag for lag in consumers(c)}
        assert (lags["ok"].behind, lags["ok"].time_behind, lags["ok"].status) == (0, None, "ok")
        slow = lags["slow"]
        assert (slow.position, slow.behind, slow.status, slow.lost) == (0, 3, "holding", False)
        assert slow.time_behind is not None and slow.time_behind > timedelta(days=9)
        assert (lags["gone"].status, lags["gone"].lost) == ("lost", True)
        # With a retention longer than its lag, the slow one is fine.
        assert {lag.name: lag.status for lag in consumers(c, timedelta(days=30))}["slow"] == "ok"


def test_async_consumers_and_drive_agree_with_the_sync_ones(db: str) -> None:
    """pgcast.aio.consumers and pgcast.aio.drive: the same code as the sync
    ones (generated from them), on an asyncio connection."""
    with psycopg.connect(db, autocommit=True) as c:
        ids = publish(c, "jobs", "a", "b")
        consumer(c, "slow", "jobs", ids[0])
        expected = [dataclasses.replace(lag, time_behind=None) for lag in consumers(c)]

    def steps() -> Iterator[tuple[str, Any]]:
        rows = yield ("SELECT count(*) FROM pgcast.log WHERE channel = %s", ("jobs",))
        more = yield ("SELECT %s::int + 1", (rows[0][0],))
        return more[0][0]

    async def body() -> None:
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as ac:
            got = await pgcast.aio.consumers(ac)
            assert [dataclasses.replace(lag, time_behind=None) for lag in got] == expected
            assert [(lag.name, lag.behind) for lag in expected] == [("slow", 1)]

            async def fetch(query: str, params: Any) -> list[tuple[Any, ...]]:
                cur = await ac.execute(query, params)
                return await cur.fetchall()

            assert await pgcast.aio.drive(steps(), fetch) == 3  # type: ignore[arg-type]
            with psycopg.connect(db) as c, pytest.raises(
                TypeError, match=r"use pgcast\.durable\.consumers\(\)"
            ):
                await pgcast.aio.consumers(c)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=r"use pgcast\.aio\.prune\(\)"):
                pgcast.prune(ac)  # type: ignore[arg-type]

    asyncio.run(asyncio.wait_for(body(), 60))


def test_consumers_and_prune_without_the_schema_say_so(dsn: str) -> None:
    """Both flavours, read-only: no schema is installed by asking."""
    name = f"pgcast_noschema_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            url = psycopg.conninfo.make_conninfo(dsn, dbname=name)
            with psycopg.connect(url, autocommit=True) as c:
                with pytest.raises(pgcast.SchemaError, match="there are no consumers"):
                    consumers(c)
                with pytest.raises(pgcast.SchemaError, match="nothing to prune"):
                    pgcast.prune(c, older_than=timedelta(0))

            async def body() -> None:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as ac:
                    with pytest.raises(pgcast.SchemaError, match="there are no consumers"):
                        await pgcast.aio.consumers(ac)
                    with pytest.raises(pgcast.SchemaError, match="nothing to prune"):
                        await pgcast.aio.prune(ac, older_than=timedelta(0))
                    schema = await ac.execute("SELECT to_regnamespace('pgcast')")
                    assert await schema.fetchone() == (None,)

            asyncio.run(asyncio.wait_for(body(), 60))
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_cli_consumers_prune_and_doctor(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as c:
        done = pgcast_cli("consumers", "--dsn", db)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "no named consumers\n"
        ids = publish(c, "jobs", "a", "b", "c")
        consumer(c, "w", "jobs", ids[0])
    done = pgcast_cli("prune", "--dsn", db, "--older-than", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "jobs\t1\npruned 1 message(s)\n"
        "kept 2 message(s) of 'jobs' that a consumer has not acknowledged "
        "(--force or --max-age deletes them)\n"
    )
    done = pgcast_cli("prune", "--dsn", db, "--older-than", "0", "--force")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"jobs\t2\npruned 2 message(s)\nleft behind: consumer 'w' on 'jobs' (at {ids[0]}) "
        "lost messages it had not acknowledged\n"
    )
    done = pgcast_cli("consumers", "--dsn", db)
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["consumer", "channel", "position", "behind", "time", "behind",
                                "status"]
    assert lines[1].split() == ["w", "jobs", str(ids[0]), "0", "-", "lost"]
    done = pgcast_cli("consumers", "--dsn", db, "--json")
    row = json.loads(done.stdout)
    assert (row["name"], row["status"], row["lost"], row["behind"]) == ("w", "lost", True, 0)
    report = run_checks(db)
    (check,) = [ch for ch in report.checks if ch.name == "consumers"]
    assert check.verdict == "warn" and "'w' on 'jobs'" in check.detail
    assert "gap" in check.detail
    done = pgcast_cli("prune", "--dsn", db, "--max-age", "7x")
    assert done.returncode == 2 and "invalid duration '7x'" in done.stderr


def test_cli_init_upgrades_a_version_1_schema(dsn: str, conn: Conn) -> None:
    name = f"pgcast_v1_{uuid.uuid4().hex[:12]}"
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = psycopg.conninfo.make_conninfo(dsn, dbname=name)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(_schema._BOOTSTRAP)
            c.execute(_schema.MIGRATIONS[0].sql)
            c.execute("INSERT INTO pgcast.schema_version (version, description) "
                      "VALUES (1, 'v1')")
            publish(c, "jobs", "a")
            consumer(c, "w", "jobs", 0)
            (lag,) = consumers(c)  # version 1: whether it lost messages is unknown
            assert (lag.behind, lag.lost, lag.status) == (1, None, "ok")
        done = pgcast_cli("init", "--dsn", url)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"pgcast schema migrated from version 1 to {LATEST_VERSION}\n"
        with psycopg.connect(url, autocommit=True) as c:
            (lag,) = consumers(c)
            assert (lag.behind, lag.lost) == (1, False)
            assert c.execute("SELECT count(*) FROM pgcast.meta").fetchone() == (1,)
    finally:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


# -- the gap decision (pure) ---------------------------------------------------------------


def test_decide_reports_exactly_deletions_after_the_position() -> None:
    header = (None, None, "E1", 10, 12)  # epoch E1, highest deleted 10, oldest kept 12
    assert decide("c", 10, "E1", header).gap is None  # deleted up to 10: all before 11
    assert decide("c", 50, "E1", header).gap is None  # quiet since: not a gap
    gap = decide("c", 9, "E1", header).gap
    assert gap == pgcast.Gap("c", 9, 12, "pruned", "E1")
    assert decide("c", 9, "E1", header, announced=10).gap is None  # said once
    assert decide("c", 9, None, header).gap is not None  # no epoch known: still checked
    no_deletion = (None, None, "E1", None, None)
    assert decide("c", 0, "E1", no_deletion).gap is None
    other = decide("c", 70, "E0", header)
    assert other.gap == pgcast.Gap("c", 70, 12, "epoch", "E1") and other.start == 0
