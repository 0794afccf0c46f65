"""What a PubSub sends and waits for, the same in both flavours: written once
for asyncio; tests/test_wire.py, the same tests for the sync flavour, is
generated from this file by tools/async_to_sync.py (edit this one, then run
the script).

Round trips counted in libpq's protocol trace, invalid channel names refused
before anything is sent, NOTIFY's payload limits,
what an unlisten leaves behind, closing while another task (a thread, in the
sync flavour) iterates, notifying while one iterates, and waiting idle
without spinning. *conn* is a plain sync psycopg connection in both
flavours: the "other session" that sends.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from psycopg import pq

import pgcast
import pgcast.aio
from _eventwait import acollect, acollect_until, ajoin, apause, arun, astart, wait_readable

Conn = psycopg.Connection[tuple[Any, ...]]


async def trace(ps: pgcast.AsyncPubSub, action: Callable[[], Awaitable[object]]) -> list[str]:
    """The protocol messages (names only) exchanged while *action()* runs."""
    pgconn = ps.connection.pgconn
    with tempfile.TemporaryFile("w+") as f:
        pgconn.trace(f.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            await action()
        finally:
            pgconn.untrace()
        f.seek(0)
        return [line.split("\t")[2] for line in f.read().splitlines() if line.count("\t") >= 2]


# -- round trips -----------------------------------------------------------------------------


def test_trace_helper_sees_messages(dsn: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            assert await trace(ps, lambda: ps.unlisten("nothing")) == []
            assert (await trace(ps, lambda: ps.notify("traced")))[-1] == "ReadyForQuery"

    arun(body())


def test_listen_many_channels_costs_no_more_round_trips_than_one(dsn: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            one = await trace(ps, lambda: ps.listen("c"))
            channels = [f"c{i}" for i in range(50)]
            many = await trace(ps, lambda: ps.listen(*channels))
            assert many.count("ReadyForQuery") == one.count("ReadyForQuery") <= 2
            assert len(ps.listening_channels()) == 51

    arun(body())


def test_notify_many_is_one_round_trip(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            batch: list[tuple[str, pgcast.Payload]] = [
                (unique_channel, str(i)) for i in range(200)]
            messages = await trace(ps, lambda: ps.notify_many(batch))
            assert messages.count("Sync") + messages.count("Query") == 1
            assert messages.count("ReadyForQuery") == 1
            got = await acollect(ps, 200)
            assert [e.payload for e in got] == [str(i) for i in range(200)]
            assert await trace(ps, lambda: ps.notify_many([])) == []  # nothing to send

    arun(body())


@pytest.mark.parametrize(
    "name", ["", "a" * 64, "チャンネル" * 4 + "名前", "nul\x00name"],
    ids=["empty", "64-ascii", "22-chars-66-bytes", "nul"],
)
def test_invalid_names_raise_before_anything_is_sent(
    dsn: str, name: str, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps, \
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as app:
            await ps.listen(unique_channel)
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: ps.listen("fine", name),
                lambda: ps.unlisten(unique_channel, name),
                lambda: ps.notify(name, "p"),
                lambda: ps.notify_many([(unique_channel, "no"), (name, "p")]),
                lambda: ps.subscribe(name, print),
                lambda: ps.unsubscribe(name),
                lambda: pgcast.aio.notify(app, name, "p"),
            ]

            async def attempt_all() -> None:
                for call in calls:
                    with pytest.raises(ValueError) as info:
                        await call()
                    assert isinstance(info.value, pgcast.InvalidChannelError)

            assert await trace(ps, attempt_all) == [], "something was sent"
            # The valid names in the same calls took no effect either.
            assert ps.listening_channels() == {unique_channel}
            cur = await ps.connection.execute("SELECT pg_listening_channels()")
            listening = {r[0] for r in await cur.fetchall()}
            assert {c for c in listening if not c.startswith("pgcast.probe.")} == {unique_channel}
            await ps.notify(unique_channel, "end")
            assert [e.payload for e in await acollect_until(ps, "end")] == ["end"]

    arun(body())


# -- payload limits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("a" * 8000, (pgcast.PayloadTooLargeError,
                      "8000 bytes in UTF-8; NOTIFY payloads must be under 8000")),
        ("é" * 4000, (pgcast.PayloadTooLargeError, "8000 bytes")),
        ({"k": "x" * 9000}, (pgcast.PayloadTooLargeError, "9008 bytes")),
        ("a" * 100_000, (pgcast.PayloadTooLargeError, "100000 bytes")),
        ("nul\x00inside", (pgcast.PayloadError, "NUL")),
    ],
    ids=["8000-ascii", "8000-bytes-4000-chars", "json", "100k", "nul"],
)
def test_payload_limits_and_the_connection_stays_usable(
    dsn: str, unique_channel: str, payload: pgcast.Payload,
    expected: tuple[type[Exception], str],
) -> None:
    error, message = expected
    # notify(conn, ...) is plain NOTIFY: the limit is NOTIFY's. (PubSub.notify
    # accepts any size: what NOTIFY cannot carry goes through the durable log;
    # see test_aio_durable.py. NUL it refuses, as here.)

    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps, \
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as app:
            await ps.listen(unique_channel)
            with pytest.raises(error, match=message) as info:
                await pgcast.aio.notify(app, unique_channel, payload)
            if isinstance(info.value, pgcast.PayloadTooLargeError):
                assert info.value.limit == 8000
                assert info.value.size >= 8000
            # The connection is still usable, and nothing was sent.
            await pgcast.aio.notify(app, unique_channel, "é" * 3999 + "a")  # 7999 bytes
            await pgcast.aio.notify(app, unique_channel, "end")
            got = await acollect_until(ps, "end")
            assert [e.payload for e in got] == ["é" * 3999 + "a", "end"]

    arun(body())


# -- unlisten ------------------------------------------------------------------------------


def test_after_unlisten_nothing_more_arrives(dsn: str, conn: Conn, unique_channel: str) -> None:
    other = unique_channel + "_other"

    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel, other)
            # Already read into the inbox but not handed out:
            for i in range(3):
                pgcast.notify(conn, unique_channel, f"read {i}")
            wait_readable(ps, 10)
            await apause(0.05)
            first = await ps.get_event()
            assert isinstance(first, pgcast.Event) and first.payload == "read 0"
            # Still on the socket, unread, when unlisten is called:
            pgcast.notify(conn, unique_channel, "unread")
            wait_readable(ps, 10)
            await ps.unlisten(unique_channel)
            assert await ps.get_event() is None
            pgcast.notify(conn, unique_channel, "after")
            pgcast.notify(conn, other, "end")
            got = await acollect_until(ps, "end")
            assert [(e.channel, e.payload) for e in got] == [(other, "end")]

    arun(body())


# -- alongside an iteration ----------------------------------------------------------------


def test_closing_ends_an_iteration_running_alongside(dsn: str) -> None:
    """close() from the test body ends the iteration of another task (in the
    sync flavour, another thread), which then ends without an error."""
    got: list[object] = []
    ended: list[bool] = []

    async def body() -> None:
        ps = await pgcast.aio.connect(dsn)
        await ps.listen("x")

        async def iterate() -> None:
            async for item in ps.events(select_timeout=30):
                got.append(item)
            ended.append(True)

        try:
            iterating = astart(iterate)
            await apause(0.1)
        finally:
            await ps.close()
        await ajoin(iterating, 5)  # fails if the iteration did not end

    arun(body())
    assert ended == [True] and got == []


def test_others_notify_while_one_iterates(dsn: str, unique_channel: str) -> None:
    """One task (a thread, in the sync flavour) iterates; the test body
    notifies on the same PubSub meanwhile without waiting for the iteration's
    select timeout."""

    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            got: list[pgcast.Event] = []

            async def iterate() -> None:
                async for event in ps.events(select_timeout=30, yield_timeouts=True):
                    assert isinstance(event, pgcast.Event), "no event within 30 s"
                    got.append(event)
                    if len(got) == 50:
                        return

            iterating = astart(iterate)
            await apause(0.05)  # the iterating side is waiting now
            start = time.monotonic()
            for i in range(50):
                await ps.notify(unique_channel, str(i))
            elapsed = time.monotonic() - start
            await ajoin(iterating, 10)
            assert elapsed < 1.0  # not one select_timeout per notify
            assert [e.payload for e in got] == [str(i) for i in range(50)]
            assert {e.pid for e in got} == {ps.backend_pid}

    arun(body())


def test_waiting_idle_burns_no_cpu(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            cpu = time.process_time()
            values = []
            async for value in ps.events(select_timeout=0.5, yield_timeouts=True):
                values.append(value)
                break
            assert values == [None]
            # A sleep-and-poll loop would spin; waiting on the socket uses no CPU.
            assert time.process_time() - cpu < 0.1

    arun(body())
