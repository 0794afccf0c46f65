"""Reconnect of the asyncio PubSub against real PostgreSQL: the twin of
test_reconnect.py (terminations, restarts, outages, reconnect=False)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psycopg
import pytest

import pgcast
import pgcast.aio
from _eventwait import arun
from _faults import FAST, RECONNECT_TIMEOUT, auntil, dedicated_server, markers, payloads, terminate
from pgcast.embedded import EmbeddedServer

Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture(scope="module")
def own_server(pg_server: EmbeddedServer | None) -> Iterator[EmbeddedServer]:
    if pg_server is None:
        pytest.skip("PGCAST_TEST_DSN is set: restart tests need an embedded server")
    with dedicated_server() as srv:
        yield srv


@pytest.fixture
def running(own_server: EmbeddedServer) -> EmbeddedServer:
    if not own_server.is_running:
        own_server.start()
    return own_server


def test_terminated_backend_gives_a_marker_then_events_flow_again(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn, health_check_interval=0) as aps:
            await aps.listen(unique_channel)
            old = aps.backend_pid
            terminate(conn, old)
            got = await auntil(aps, pgcast.Reconnected)
            assert payloads(got) == []
            marker = markers(got)[0]
            assert marker.lost_at <= marker.restored_at
            assert aps.backend_pid != old
            assert aps.generation == 1
            assert not aps.closed
            conn.execute("SELECT pg_notify(%s, 'after')", (unique_channel,))
            assert payloads(await auntil(aps, "after")) == ["after"]

    arun(body())


def test_a_marker_after_every_one_of_five_terminations(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn, health_check_interval=0) as aps:
            await aps.listen(unique_channel)
            for round_ in range(5):
                terminate(conn, aps.backend_pid)
                assert len(markers(await auntil(aps, pgcast.Reconnected))) == 1
                conn.execute("SELECT pg_notify(%s, %s)", (unique_channel, f"r{round_}"))
                assert payloads(await auntil(aps, f"r{round_}")) == [f"r{round_}"]
            assert aps.generation == 5

    arun(body())


def test_reconnect_false_raises_connection_lost(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(
            dsn, reconnect=False, health_check_interval=0
        ) as aps:
            await aps.listen(unique_channel)
            terminate(conn, aps.backend_pid)
            deadline = time.monotonic() + RECONNECT_TIMEOUT
            with pytest.raises(pgcast.ConnectionLostError):
                async for _ in aps.events(select_timeout=0.05, yield_timeouts=True):
                    assert time.monotonic() < deadline, "the loss was not noticed"
            assert aps.closed
            with pytest.raises(pgcast.ConnectionLostError):
                await aps.get_event()
            with pytest.raises(pgcast.ConnectionLostError):
                await aps.notify(unique_channel, "x")

    arun(body())


def test_notify_after_a_termination_reconnects_and_sends(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn, health_check_interval=0) as aps:
            await aps.listen(unique_channel)
            terminate(conn, aps.backend_pid)
            await asyncio.sleep(0.2)  # let the server's goodbye reach the socket
            await aps.notify(unique_channel, "sent-after-loss")
            got = await auntil(aps, "sent-after-loss")
            assert len(markers(got)) == 1

    arun(body())


def test_async_on_reconnect_and_hooks_run_before_the_marker(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    order: list[str] = []

    async def on_reconnect(marker: pgcast.Reconnected) -> None:
        await asyncio.sleep(0)
        order.append("on_reconnect")

    async def hook(aps: pgcast.AsyncPubSub) -> None:
        usage = await aps.queue_usage()  # commands work on the new connection
        assert 0.0 <= usage <= 1.0
        order.append("hook")
        aps._core.inbox.append(pgcast.Event(unique_channel, "replayed", 0))

    async def body() -> None:
        async with await pgcast.aio.connect(
            dsn, health_check_interval=0, on_reconnect=on_reconnect
        ) as aps:
            await aps.listen(unique_channel)
            aps.add_reconnect_hook(hook)
            terminate(conn, aps.backend_pid)
            got = await auntil(aps, pgcast.Reconnected)
            assert order == ["hook", "on_reconnect"]
            assert payloads(got) == ["replayed"]

    arun(body())


def test_explicit_reconnect_and_get_event(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn, health_check_interval=0) as aps:
            await aps.listen(unique_channel)
            marker = await aps.reconnect()
            assert await aps.get_event() == marker
            terminate(conn, aps.backend_pid)
            deadline = time.monotonic() + RECONNECT_TIMEOUT
            item = None
            while item is None and time.monotonic() < deadline:
                item = await aps.get_event()
                await asyncio.sleep(0.02)  # polling is what get_event() is for
            assert isinstance(item, pgcast.Reconnected)
            assert aps.generation == 2

    arun(body())


def test_run_survives_a_termination(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def body() -> None:
        received: list[str] = []
        arrived = asyncio.Event()
        reconnected = asyncio.Event()

        async def handler(event: pgcast.Event) -> None:
            received.append(event.payload)
            arrived.set()

        async with await pgcast.aio.connect(
            dsn, health_check_interval=0, on_reconnect=lambda m: reconnected.set()
        ) as aps:
            await aps.subscribe(unique_channel, handler)
            runner = asyncio.create_task(aps.run())
            try:
                terminate(conn, aps.backend_pid)
                await asyncio.wait_for(reconnected.wait(), RECONNECT_TIMEOUT)
                conn.execute("SELECT pg_notify(%s, 'after')", (unique_channel,))
                await asyncio.wait_for(arrived.wait(), RECONNECT_TIMEOUT)
            finally:
                aps.stop()
                await asyncio.wait_for(runner, 10)
            assert received == ["after"]

    arun(body())


@pytest.mark.slow
def test_server_restart_and_notify_during_the_outage(
    running: EmbeddedServer, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(
            running.dsn, health_check_interval=0, reconnect_backoff=FAST, notify_timeout=60
        ) as aps:
            await aps.listen(unique_channel)
            await asyncio.to_thread(running.stop)
            starter = asyncio.create_task(asyncio.to_thread(_start_later, running, 1.5))
            try:
                await aps.notify(unique_channel, "waited")  # waits for the server
            finally:
                await asyncio.wait_for(starter, 60)
            got = await auntil(aps, "waited")
            assert len(markers(got)) == 1
            await asyncio.to_thread(running.restart)
            assert len(markers(await auntil(aps, pgcast.Reconnected))) == 1

    arun(body(), timeout=110)


@pytest.mark.slow
def test_notify_during_an_outage_fails_clearly_after_the_timeout(
    running: EmbeddedServer, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(
            running.dsn, health_check_interval=0, reconnect_backoff=FAST, notify_timeout=1.0
        ) as aps:
            await aps.listen(unique_channel)
            await asyncio.to_thread(running.stop)
            try:
                with pytest.raises(pgcast.NotSentError, match=r"not sent.*notify_timeout=1 s"):
                    await aps.notify(unique_channel, "lost?")
            finally:
                await asyncio.to_thread(running.start)
            await aps.notify(unique_channel, "later")
            assert "lost?" not in payloads(await auntil(aps, "later"))

    arun(body(), timeout=110)


def _start_later(server: EmbeddedServer, delay: float) -> None:
    time.sleep(delay)
    server.start()
