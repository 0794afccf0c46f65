"""The asyncio PubSub (:mod:`pgcast.aio`) against real PostgreSQL.

It mirrors test_client.py: the same contract, awaited. Each test body is a
coroutine run by :func:`_eventwait.arun` in a fresh event loop with an overall
timeout, so no pytest plugin is needed and nothing can hang. Senders are
plain psycopg connections unless the test is about asyncio sending.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import _hba
import pgcast
import pgcast.aio
from _eventwait import acollect, acollect_until, arun
from pgcast.embedded import EmbeddedServer

Conn = psycopg.Connection[tuple[Any, ...]]
password_role = _hba.password_role  # a fixture, shared by test_client/test_aio
IMMEDIATE = 0.05


async def server_channels(aps: pgcast.AsyncPubSub) -> set[str]:
    cur = await aps.connection.execute("SELECT pg_listening_channels()")
    return {r[0] for r in await cur.fetchall() if not r[0].startswith("pgcast.probe.")}


# -- connect ---------------------------------------------------------------------


def test_server_that_never_answers_times_out() -> None:
    async def main(port: int) -> None:
        with pytest.raises(pgcast.ConnectError, match="timeout"):
            await pgcast.aio.connect(
                f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=1
            )

    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        arun(main(mute.getsockname()[1]), timeout=15)


# -- subscriptions and notify ---------------------------------------------------------


def test_notify_payloads(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.listen(unique_channel)
            await aps.notify(unique_channel)
            await aps.notify(unique_channel, "shipped 42")
            await aps.notify(unique_channel, {"id": 42})
            await aps.notify(unique_channel, [1, "two"])
            events = await acollect(aps, 4)
            assert [e.payload for e in events] == ["", "shipped 42", '{"id":42}', '[1,"two"]']
            assert events[2].json() == {"id": 42}
            assert events[3].json() == [1, "two"]
            channel, payload, pid = events[1]
            assert (channel, payload, pid) == (unique_channel, "shipped 42", aps.backend_pid)

    arun(main())


# -- receiving ---------------------------------------------------------------------------


def test_get_event_never_blocks(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.listen(unique_channel)
            for _ in range(5):
                start = time.monotonic()
                assert await aps.get_event() is None
                assert time.monotonic() - start < IMMEDIATE
            pgcast.notify(conn, unique_channel, "1")
            got: object = None
            deadline = time.monotonic() + 10
            while got is None and time.monotonic() < deadline:
                got = await aps.get_event()
                if got is None:
                    await asyncio.sleep(0.01)
            assert isinstance(got, pgcast.Event) and got.payload == "1"
            assert await aps.get_event() is None

    arun(main())


def test_events_without_yield_timeouts_only_yields_events(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps, await pgcast.aio.connect(dsn) as sender:
            await aps.listen(unique_channel)

            async def later() -> None:
                await asyncio.sleep(0.3)
                await sender.notify(unique_channel, "late")

            task = asyncio.create_task(later())
            async for event in aps.events(select_timeout=0.05):
                first = event
                break
            await task
            assert isinstance(first, pgcast.Event) and first.payload == "late"

            task = asyncio.create_task(later())
            async for event in aps.wait(timeout=None):
                first = event
                break
            await task
            assert isinstance(first, pgcast.Event) and first.payload == "late"

    arun(main())


def test_wait_zero_yields_what_is_pending_and_ends(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.listen(unique_channel)
            for i in range(3):
                pgcast.notify(conn, unique_channel, str(i))
            await asyncio.sleep(0.1)  # let all three reach the socket
            pending = [e async for e in aps.wait(0)]
            assert [e.payload for e in pending if isinstance(e, pgcast.Event)] == ["0", "1", "2"]
            assert [x async for x in aps.wait(0)] == []

    arun(main())


@pytest.mark.parametrize("how", ["events", "wait"])
def test_breaking_out_loses_nothing(dsn: str, conn: Conn, unique_channel: str, how: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.listen(unique_channel)
            for i in range(5):
                pgcast.notify(conn, unique_channel, str(i))
            iterator = aps.events(select_timeout=10) if how == "events" else aps.wait(10)
            async for event in iterator:  # and break out of it
                first = event
                break
            assert isinstance(first, pgcast.Event) and first.payload == "0"
            assert [e.payload for e in await acollect(aps, 4)] == ["1", "2", "3", "4"]

    arun(main())


def test_backend_pid_and_ignore_own(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.listen(unique_channel)
            await aps.notify(unique_channel, "mine")
            pgcast.notify(conn, unique_channel, "theirs")
            await aps.notify(unique_channel, "mine again")
            pgcast.notify(conn, unique_channel, "theirs again")
            got = []
            async for event in aps.events(select_timeout=10, ignore_own=True):
                assert isinstance(event, pgcast.Event)
                got.append(event)
                if len(got) == 2:
                    break
            assert [e.payload for e in got] == ["theirs", "theirs again"]
            assert {e.pid for e in got} == {conn.info.backend_pid}

    arun(main())


def test_using_a_closed_async_pubsub_raises_closed_error(dsn: str) -> None:
    async def main() -> None:
        aps = await pgcast.aio.connect(dsn)
        await aps.listen("x")
        await aps.close()
        uses: list[Callable[[], Any]] = [
            lambda: aps.listen("x"),
            lambda: aps.listen("y"),
            lambda: aps.unlisten("x"),
            aps.unlisten,
            lambda: aps.notify("x", "p"),
            lambda: aps.notify_many([("x", "p")]),
            aps.get_event,
            lambda: anext(aps.events()),
            lambda: anext(aps.wait(0)),
            lambda: aps.transaction().__aenter__(),
            lambda: aps.subscribe("y", print),
            aps.run,
        ]
        for use in uses:
            with pytest.raises(pgcast.ClosedError, match="closed"):
                await use()

    arun(main())


def test_receiving_wakes_on_the_socket(dsn: str, unique_channel: str) -> None:
    # select_timeout=30: only a wake-up on the socket can deliver promptly.
    rounds = 50

    async def main() -> list[float]:
        latencies: list[float] = []
        sent_at: list[float] = []
        ready = asyncio.Event()
        async with await pgcast.aio.connect(dsn) as aps, await psycopg.AsyncConnection.connect(
            dsn, autocommit=True
        ) as sender:
            await aps.listen(unique_channel)

            async def send() -> None:
                for i in range(rounds):
                    await asyncio.wait_for(ready.wait(), 10)
                    ready.clear()
                    await asyncio.sleep(0.002)
                    sent_at.append(time.perf_counter())
                    await pgcast.aio.notify(sender, unique_channel, str(i))

            task = asyncio.create_task(send())
            ready.set()
            async for event in aps.events(select_timeout=30, yield_timeouts=True):
                assert isinstance(event, pgcast.Event), "no event within 30 s"
                latencies.append(time.perf_counter() - sent_at[int(event.payload)])
                if len(latencies) == rounds:
                    break
                ready.set()
            await task
        return latencies

    latencies = arun(main())
    assert statistics.median(latencies) < 0.020, sorted(latencies)


# -- names and payloads -------------------------------------------------------------------


def test_channel_names_are_exact(dsn: str, conn: Conn, psql: Callable[..., str]) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.listen("Prices")
            conn.execute("SELECT pg_notify('Prices', 'via pg_notify')")
            conn.execute("SELECT pg_notify('prices', 'lower case')")
            psql("""NOTIFY Prices, 'unquoted'; NOTIFY "Prices", 'quoted'; NOTIFY "Prices", 'end'""")
            got = await acollect_until(aps, "end")
            assert [e.payload for e in got] == ["via pg_notify", "quoted", "end"]
            assert {e.channel for e in got} == {"Prices"}

    arun(main())


INJECTION = 'x"; DROP TABLE users; --'


def test_injection_name_is_just_a_channel(dsn: str, conn: Conn) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.connection.execute("CREATE TEMP TABLE users (name text)")
            await aps.connection.execute("INSERT INTO users VALUES ('alice')")
            await aps.listen(INJECTION)
            assert await server_channels(aps) == {INJECTION}
            pgcast.notify(conn, INJECTION, "works")
            [event] = await acollect(aps, 1)
            assert (event.channel, event.payload) == (INJECTION, "works")
            await aps.unlisten(INJECTION)
            cur = await aps.connection.execute("SELECT name FROM users")
            assert await cur.fetchall() == [("alice",)]

    arun(main())


# -- transactions and the seeds' semantics ---------------------------------------------------


def test_application_transaction_freshports_pattern(dsn: str, unique_channel: str) -> None:
    table = f"ports_{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps, await psycopg.AsyncConnection.connect(
            dsn
        ) as app:
            await aps.listen(unique_channel)
            await app.execute(f"CREATE TABLE {table} (name text)")
            await app.commit()
            try:
                await app.execute(f"INSERT INTO {table} VALUES ('x')")
                await pgcast.aio.notify(app, unique_channel, "rolled back")
                await app.rollback()
                await app.execute(f"INSERT INTO {table} VALUES ('y')")
                await pgcast.aio.notify(app, unique_channel, "committed")
                await app.commit()
                await pgcast.aio.notify(app, unique_channel, "end")
                await app.commit()
                got = await acollect_until(aps, "end")
                assert [e.payload for e in got] == ["committed", "end"]
                assert got[0].pid == app.info.backend_pid
            finally:
                await app.rollback()
                await app.execute(f"DROP TABLE {table}")
                await app.commit()

    arun(main())


def test_psql_notify_arrives_with_psql_s_pid(dsn: str, psql: Callable[..., str]) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.listen("data")
            out = await asyncio.to_thread(
                psql, "NOTIFY data, 'green'", "-Atq", "--command=SELECT pg_backend_pid()"
            )
            [event] = await acollect(aps, 1)
            assert event == ("data", "green", int(out.strip()))

    arun(main())


def test_wrong_password_raises_connect_error(
    server: EmbeddedServer, password_role: tuple[str, str]
) -> None:
    role, password = password_role
    base = f"127.0.0.1:{server.port}/postgres"

    async def main() -> None:
        with pytest.raises(
            pgcast.ConnectError, match=f'password authentication failed for user "{role}"'
        ):
            await pgcast.aio.connect(f"postgresql://{role}:wrong@{base}")
        async with await pgcast.aio.connect(f"postgresql://{role}:{password}@{base}") as aps:
            assert aps.backend_pid > 0

    arun(main())


@pytest.mark.parametrize("delay_ms", [0, 1, 2, 5, 10, 20, 50])
def test_close_while_notifying_raises_closed_error(
    dsn: str, unique_channel: str, delay_ms: int
) -> None:
    """close() from another task while notify() runs: every notify after the
    close started raises ClosedError, never a psycopg or a database error
    made up from the torn connection (the race hammered at several delays)."""

    async def body() -> list[str]:
        ps = await pgcast.aio.connect(dsn)
        outcomes: list[str] = []

        async def publish() -> None:
            try:
                for i in range(5_000):
                    await ps.notify(unique_channel, str(i))
                outcomes.append("finished")
            except pgcast.PgcastError as exc:
                outcomes.append(type(exc).__name__)

        task = asyncio.create_task(publish())
        await asyncio.sleep(delay_ms / 1000)
        await ps.close()
        await asyncio.wait_for(task, 10)
        return outcomes

    assert arun(body()) in (["finished"], ["ClosedError"])
