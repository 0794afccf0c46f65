"""The supervisor interface of a PubSub: what a NotificationManager (or any
program that waits on many sockets itself) uses instead of iterating it.

Written for asyncio; tests/test_supervisor.py, the same tests for the sync
flavour, is generated from this file by tools/async_to_sync.py.
"""

from __future__ import annotations

import select
import time
from typing import Any

import psycopg

import pgcast
import pgcast.aio
from _eventwait import arun

TIMEOUT = 10.0

Conn = psycopg.Connection[tuple[Any, ...]]


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], TIMEOUT)[0])


def test_read_ready_takes_in_what_arrived_and_take_pending_hands_it_out(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            assert ps.take_pending() == []
            conn.execute("SELECT pg_notify(%s, 'one'), pg_notify(%s, 'two')",
                         (unique_channel, unique_channel))
            assert readable(ps.fileno()), "the socket did not become readable"
            deadline = time.monotonic() + TIMEOUT
            got: list[Any] = []
            while len(got) < 2 and time.monotonic() < deadline:
                await ps.read_ready()
                got += ps.take_pending()
            assert [e.payload for e in got] == ["one", "two"]
            assert ps.take_pending() == []  # handed out once

    arun(body())


def test_the_wake_callback_tells_of_events_that_came_another_way(
    dsn: str, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            woken: list[int] = []
            ps.set_wake_callback(lambda: woken.append(1))
            assert ps.wake_callback is not None
            # Its own notify comes back with the command's results: the
            # socket has nothing more to say, so only the callback tells.
            await ps.notify(unique_channel, "mine")
            assert woken, "the wake callback was not called"
            assert [e.payload for e in ps.take_pending()] == ["mine"]
            ps.set_wake_callback(None)
            assert ps.wake_callback is None
            count = len(woken)
            await ps.notify(unique_channel, "again")
            assert len(woken) == count
            assert [e.payload for e in ps.take_pending()] == ["again"]

    arun(body())


def test_wake_ends_a_wait_without_making_up_an_event(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            woken: list[int] = []
            ps.set_wake_callback(lambda: woken.append(1))
            ps.wake()  # what Worker.stop() uses to end the worker's wait
            assert woken == [1]
            assert ps.take_pending() == []
            ps.set_wake_callback(None)
            ps.wake()
            assert woken == [1]
            # The wakes left pending end the iteration's first wait at once,
            # with nothing to hand out: it waits again, and the first thing
            # it yields is the event that came next, not an idle None.
            conn.execute("SELECT pg_notify(%s, 'after the wake')", (unique_channel,))
            first = await anext(ps.wait(TIMEOUT))
            assert isinstance(first, pgcast.Event) and first.payload == "after the wake"

    arun(body())


def test_health_check_schedule_and_tick(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn, health_check_interval=0.5) as ps:
            assert ps.health_check_interval == 0.5
            await ps.listen(unique_channel)
            due = ps.health_check_due()
            assert due is not None and due <= time.monotonic() + 0.5 + 0.01
            wait = await ps.health_tick()
            assert wait is not None and 0 <= wait <= 0.5
        async with await pgcast.aio.connect(dsn, health_check_interval=0) as ps:
            await ps.listen(unique_channel)
            assert ps.health_check_interval == 0
            assert ps.health_check_due() is None
            assert await ps.health_tick() is None

    arun(body())


def test_reconnect_queues_its_marker_and_a_new_socket(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            pid = ps.backend_pid
            marker = await ps.reconnect()
            assert isinstance(marker, pgcast.Reconnected)
            assert ps.generation == 1 and ps.backend_pid != pid
            assert ps.take_pending() == [marker]
            # Still listening, on the new socket.
            conn.execute("SELECT pg_notify(%s, 'after')", (unique_channel,))
            assert readable(ps.fileno())
            deadline = time.monotonic() + TIMEOUT
            got: list[Any] = []
            while not got and time.monotonic() < deadline:
                await ps.read_ready()
                got = ps.take_pending()
            assert [e.payload for e in got] == ["after"]

    arun(body())


def test_a_closed_pubsub_refuses_the_supervisor(dsn: str) -> None:
    async def body() -> None:
        ps = await pgcast.aio.connect(dsn)
        await ps.close()
        for call in (ps.fileno,):
            try:
                call()
            except pgcast.ClosedError:
                pass
            else:
                raise AssertionError(f"{call.__name__} worked on a closed PubSub")
        try:
            await ps.read_ready()
        except pgcast.ClosedError:
            pass
        else:
            raise AssertionError("read_ready worked on a closed PubSub")

    arun(body())
