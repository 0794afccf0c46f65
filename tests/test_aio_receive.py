"""Receiving, the same in both flavours: written once for asyncio;
tests/test_receive.py, the same tests for the sync flavour, is generated from
this file by tools/async_to_sync.py (edit this one, then run the script).

Payloads as sent and received, get_event() and wait(0) that never block,
breaking out of an iteration, the backend pid and ignore_own, exact channel
names (and one that looks like an injection), notifications sent in an
application's transaction (the FreshPorts pattern) and by psql. *conn* is a
plain sync psycopg connection in both flavours: the "other session" that
sends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgcast
import pgcast.aio
from _eventwait import acollect, acollect_until, apause, arun, wait_readable

Conn = psycopg.Connection[tuple[Any, ...]]

#: A bound for "never blocks" / "returns at once", not a benchmark.
IMMEDIATE = 0.05

INJECTION = 'x"; DROP TABLE users; --'


async def server_channels(ps: pgcast.AsyncPubSub) -> set[str]:
    """The PubSub's session's LISTENs, less the health check's own probe channel."""
    cur = await ps.connection.execute("SELECT pg_listening_channels()")
    return {r[0] for r in await cur.fetchall() if not r[0].startswith("pgcast.probe.")}


def test_notify_payloads(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            await ps.notify(unique_channel)
            await ps.notify(unique_channel, "shipped 42")
            await ps.notify(unique_channel, {"id": 42, "state": "shipped"})
            await ps.notify(unique_channel, [1, "two", None])
            await ps.notify(unique_channel, "ünïcödé ✓")
            events = await acollect(ps, 5)
            assert [e.payload for e in events] == [
                "", "shipped 42", '{"id":42,"state":"shipped"}', '[1,"two",null]', "ünïcödé ✓"
            ]
            assert events[2].json() == {"id": 42, "state": "shipped"}
            assert events[3].json() == [1, "two", None]
            assert {(e.channel, e.pid) for e in events} == {(unique_channel, ps.backend_pid)}
            channel, payload, pid = events[1]
            assert (channel, payload, pid) == (unique_channel, "shipped 42", ps.backend_pid)

    arun(body())


def test_get_event_never_blocks(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            for _ in range(5):
                start = time.monotonic()
                assert await ps.get_event() is None
                assert time.monotonic() - start < IMMEDIATE
            pgcast.notify(conn, unique_channel, "1")
            pgcast.notify(conn, unique_channel, "2")
            got: list[pgcast.Event] = []
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                event = await ps.get_event()
                if event is None:
                    wait_readable(ps, 0.1)
                else:
                    assert isinstance(event, pgcast.Event)
                    got.append(event)
            assert [e.payload for e in got] == ["1", "2"]
            assert await ps.get_event() is None

    arun(body())


def test_wait_zero_yields_what_is_pending_and_ends(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            start = time.monotonic()
            assert [type(x) async for x in ps.wait(timeout=0)] == []  # nothing at all
            assert time.monotonic() - start < IMMEDIATE
            for i in range(3):
                pgcast.notify(conn, unique_channel, str(i))
            wait_readable(ps, 10)
            await apause(0.05)  # let all three reach the socket
            pending = [e.payload async for e in ps.wait(0) if isinstance(e, pgcast.Event)]
            assert pending == ["0", "1", "2"]
            assert [type(x) async for x in ps.wait(0)] == []

    arun(body())


@pytest.mark.parametrize("how", ["events", "wait"])
def test_breaking_out_loses_nothing(dsn: str, conn: Conn, unique_channel: str, how: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            for i in range(5):
                pgcast.notify(conn, unique_channel, str(i))
            iterator = ps.events(select_timeout=10) if how == "events" else ps.wait(timeout=10)
            async for event in iterator:  # and break out of it
                first = event
                break
            assert isinstance(first, pgcast.Event) and first.payload == "0"
            assert [e.payload for e in await acollect(ps, 4)] == ["1", "2", "3", "4"]

    arun(body())


def test_backend_pid_and_ignore_own(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            cur = await ps.connection.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None and ps.backend_pid == row[0]
            await ps.listen(unique_channel)
            await ps.notify(unique_channel, "mine")
            pgcast.notify(conn, unique_channel, "theirs")
            await ps.notify(unique_channel, "mine again")
            pgcast.notify(conn, unique_channel, "theirs again")
            got = []
            async for event in ps.events(select_timeout=10, ignore_own=True):
                assert isinstance(event, pgcast.Event)
                got.append(event)
                if len(got) == 2:
                    break
            assert [e.payload for e in got] == ["theirs", "theirs again"]
            assert {e.pid for e in got} == {conn.info.backend_pid}

    arun(body())


# -- names ---------------------------------------------------------------------------------


def test_channel_names_are_exact(dsn: str, conn: Conn, psql: Callable[..., str]) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen("Prices")
            pgcast.notify(conn, "Prices", "via pg_notify")
            conn.execute("SELECT pg_notify('Prices', 'via SQL pg_notify')")
            conn.execute("SELECT pg_notify('prices', 'lower case')")
            psql("""NOTIFY Prices, 'unquoted'; NOTIFY "Prices", 'quoted'; NOTIFY "Prices", 'end'""")
            got = await acollect_until(ps, "end")
            assert [e.payload for e in got] == [
                "via pg_notify", "via SQL pg_notify", "quoted", "end"]
            assert {e.channel for e in got} == {"Prices"}

    arun(body())


def test_injection_name_is_just_a_channel(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            # A temporary table of the listener's own session: the one an
            # injected DROP TABLE users would hit, and invisible to other tests.
            await ps.connection.execute("CREATE TEMP TABLE users (name text)")
            await ps.connection.execute("INSERT INTO users VALUES ('alice')")
            await ps.listen(INJECTION)
            assert ps.listening_channels() == {INJECTION}
            assert await server_channels(ps) == {INJECTION}
            pgcast.notify(conn, INJECTION, "from another session")
            await ps.notify(INJECTION, "from itself")
            got = await acollect(ps, 2)
            assert [(e.channel, e.payload) for e in got] == [
                (INJECTION, "from another session"), (INJECTION, "from itself")
            ]
            await ps.unlisten(INJECTION)
            assert await server_channels(ps) == set()
            cur = await ps.connection.execute("SELECT name FROM users")
            assert await cur.fetchall() == [("alice",)]

    arun(body())


# -- sent by others ------------------------------------------------------------------------


def test_application_transaction_freshports_pattern(dsn: str, unique_channel: str) -> None:
    table = f"ports_{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps, \
                await psycopg.AsyncConnection.connect(dsn, connect_timeout=10) as app:
            await ps.listen(unique_channel)
            await app.execute(f"CREATE TABLE {table} (name text)")  # not autocommit
            await app.commit()
            try:
                await app.execute(f"INSERT INTO {table} VALUES ('rolled back')")
                await pgcast.aio.notify(app, unique_channel, "rolled back")
                await app.rollback()
                await app.execute(f"INSERT INTO {table} VALUES ('committed')")
                await pgcast.aio.notify(app, unique_channel, {"port": "committed"})
                assert await ps.get_event() is None  # not before the commit
                await app.commit()
                [event] = await acollect(ps, 1)
                assert event.json() == {"port": "committed"}
                assert event.pid == app.info.backend_pid
                # The listener sees the data the notification announces.
                cur = await ps.connection.execute(f"SELECT name FROM {table}")
                assert await cur.fetchall() == [("committed",)]
                await app.execute(f"SELECT pg_notify('{unique_channel}', 'end')")
                await app.commit()
                assert [e.payload for e in await acollect_until(ps, "end")] == ["end"]
            finally:
                await app.rollback()
                await app.execute(f"DROP TABLE {table}")
                await app.commit()

    arun(body())


def test_psql_notify_arrives_with_psql_s_pid(dsn: str, psql: Callable[..., str]) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen("data")
            # psql blocks; nothing needs the event loop meanwhile: the
            # notification waits on the socket.
            out = psql("NOTIFY data, 'green'", "-Atq", "--command=SELECT pg_backend_pid()")
            psql_pid = int(out.strip())
            [event] = await acollect(ps, 1)
            assert event == ("data", "green", psql_pid)
            assert event.pid != ps.backend_pid

    arun(body())


def latin1_notify(dsn: str, channel: str, *payloads: str) -> int:
    """Send *payloads* from a session in LATIN1 (as raw SQL, as a legacy
    application would); return its pid."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10,
                         client_encoding="LATIN1") as c:
        for payload in payloads:
            c.execute(
                sql.SQL("NOTIFY {}, {}").format(
                    sql.Identifier(channel), sql.Literal(payload)
                )
            )
        return c.info.backend_pid


def test_payload_not_utf8_on_a_sql_ascii_database(sql_ascii_dsn: str, unique_channel: str) -> None:
    # The server stores LATIN1's "caf\xe9" as it is; a listener asking for
    # UTF-8 had its session ended by the server (a Reconnected marker, the
    # notification and the one after it lost).
    async def body() -> None:
        async with await pgcast.aio.connect(sql_ascii_dsn) as ps:
            await ps.listen(unique_channel)
            pid = ps.backend_pid
            sender = latin1_notify(sql_ascii_dsn, unique_channel, "café", "after")
            bad, after = await acollect(ps, 2)  # fails on a Reconnected marker
            assert isinstance(bad, pgcast.UndecodableEvent)
            assert bad.raw == b"caf\xe9"
            assert bad == pgcast.UndecodableEvent(unique_channel, "caf\ufffd", sender, b"caf\xe9")
            assert bad.raw.decode("latin-1") == "café"
            assert type(after) is pgcast.Event
            assert after == (unique_channel, "after", sender)
            assert ps.backend_pid == pid
            # One that arrives with a command's results (psycopg's notify
            # handler would raise from the command), and UTF-8 as usual.
            sender = latin1_notify(sql_ascii_dsn, unique_channel, "è 2")
            await apause(0.2)  # in the socket before the command's answer
            await ps.notify(unique_channel, "ünïcödé ✓")
            bad, mine = await acollect(ps, 2)
            assert isinstance(bad, pgcast.UndecodableEvent) and bad.raw == b"\xe8 2"
            assert mine == (unique_channel, "ünïcödé ✓", pid)
            assert type(mine) is pgcast.Event
            assert await server_channels(ps) == {unique_channel}  # text results are str
            assert ps.backend_pid == pid

    arun(body())


def test_durable_payload_not_utf8_on_a_sql_ascii_database(
    sql_ascii_dsn: str, unique_channel: str
) -> None:
    # A client in LATIN1 stores "x\xe9y" in the log: live, its reference came
    # out as an UndecodableEvent with pgcast's prefix; replayed, the log's row
    # raised UnicodeDecodeError out of the iteration, for ever at that row.
    from pgcast.durable import install_schema

    with psycopg.connect(sql_ascii_dsn, autocommit=True, connect_timeout=10) as conn:
        install_schema(conn)

    def send(*payloads: str) -> list[int]:
        with psycopg.connect(sql_ascii_dsn, autocommit=True, connect_timeout=10,
                             client_encoding="LATIN1") as c:
            return [int(c.execute("SELECT pgcast.notify(%s, %s)", (unique_channel, p))
                        .fetchone()[0]) for p in payloads]  # type: ignore[index]

    async def body() -> None:
        async with await pgcast.aio.connect(sql_ascii_dsn) as ps:
            await ps.listen(unique_channel, durable=True)
            ids = send("x\xe9y", "after")
            got = await acollect(ps, 2)  # fails on a Reconnected marker
            assert [(type(e), e.payload, getattr(e, "id", None)) for e in got] == [
                (pgcast.DurableEvent, "x\ufffdy", ids[0]),
                (pgcast.DurableEvent, "after", ids[1]),
            ]
        async with await pgcast.aio.connect(sql_ascii_dsn) as ps:
            await ps.listen(unique_channel, durable=True, since=0)
            got = await acollect(ps, 2)
            assert [(e.payload, getattr(e, "id", None)) for e in got] == [
                ("x\ufffdy", ids[0]), ("after", ids[1])]

    arun(body())


def test_a_byte_the_server_cannot_convert_ends_the_session_and_the_marker_says_why(
    win1252_dsn: str, unique_channel: str
) -> None:
    # What the README says of databases in other encodings: the server
    # converts a notification to the listener's UTF-8 and ends the session
    # over a byte it cannot convert (WIN1252's 0x81); the loss is announced
    # with the server's reason, and notifications after the marker arrive.
    async def body() -> None:
        async with await pgcast.aio.connect(win1252_dsn, health_check_interval=0) as ps:
            await ps.listen(unique_channel)
            with psycopg.connect(win1252_dsn, autocommit=True, connect_timeout=10,
                                 client_encoding="WIN1252") as c:
                c.execute(f"NOTIFY {unique_channel}, 'x".encode() + b"\x81y'")
            deadline = time.monotonic() + 20
            async for item in ps.events(select_timeout=0.05, yield_timeouts=True):
                assert not isinstance(item, pgcast.Event), item
                if isinstance(item, pgcast.Reconnected):
                    assert "has no equivalent in encoding" in item.error, item.error
                    break
                assert time.monotonic() < deadline, "the loss was not announced"
            with psycopg.connect(win1252_dsn, autocommit=True, connect_timeout=10) as c:
                c.execute(sql.SQL("NOTIFY {}, 'after'").format(sql.Identifier(unique_channel)))
            assert [e.payload for e in await acollect(ps, 1)] == ["after"]

    arun(body())


def test_pubsub_on_a_connection_in_latin1(dsn: str, unique_channel: str) -> None:
    # A connection handed to PubSub() may speak another encoding: the PubSub
    # decoded LATIN1's "caf\xe9" as UTF-8 (UnicodeDecodeError from the
    # iteration), and psycopg could not send "✓" in LATIN1.
    async def body() -> None:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=10, client_encoding="LATIN1"
        )
        if conn.info.parameter_status("server_encoding") != "UTF8":
            await conn.close()
            pytest.skip("the test database is not in UTF-8: LATIN1's bytes would reach it as such")
        async with pgcast.aio.AsyncPubSub(conn) as ps:
            await ps.listen(unique_channel)
            pid = ps.backend_pid
            sender = latin1_notify(dsn, unique_channel, "café")
            await ps.notify(unique_channel, "ünïcödé ✓")
            got = await acollect(ps, 2)
            assert got == [(unique_channel, "café", sender), (unique_channel, "ünïcödé ✓", pid)]
            assert ps.backend_pid == pid

    arun(body())
