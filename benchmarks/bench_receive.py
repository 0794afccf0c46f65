"""Receive rate: notifications reaching user code per second, none lost.

Method, the same for every subject: the listener connects and LISTENs (or
SUBSCRIBEs); then, from another connection, N small notifications are sent
in transactions of 10,000 (``pg_notify`` over ``generate_series``; Redis:
pipelined PUBLISH); only then is the listener's loop started and timed until
its user code has counted all N. The server queues what the listener has not
read yet, so the timed part is the receive path alone: server to socket to
the library to user code, with no sender competing for the two cores. A
subject that does not count exactly N in time is reported as failed.

Subjects run round-robin, ``REPEATS`` times each, so slow phases of the
shared machine spread over all of them; the median is reported.
"""

from __future__ import annotations

import asyncio
import gc
import select
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from _common import (
    Row,
    acount_events,
    count_events,
    listen_raw,
    median,
    prefill,
    redis_client,
    redis_parser,
    row,
    spread,
)

import pgcast

BENCH = "receive"
N = 200_000
SMOKE_N = 20_000
REPEATS = 5
SMOKE_REPEATS = 1
DRAIN_TIMEOUT = 60.0

# A subject: set up with (dsn, channel, n); the returned callable drains
# (timed) and returns how many notifications user code saw.
Drain = Callable[[], int]
Setup = Callable[[str, str, int], tuple[Drain, Callable[[], None]]]


def _fresh_channel() -> str:
    return f"bench_rx_{uuid.uuid4().hex[:8]}"


# -- pgcast ---------------------------------------------------------------------


def pgcast_sync_events(dsn: str, channel: str, n: int) -> tuple[Drain, Callable[[], None]]:
    ps = pgcast.connect(dsn)
    ps.listen(channel)

    def drain() -> int:
        events = ps.events(select_timeout=1.0, yield_timeouts=True)
        return count_events(events, n, DRAIN_TIMEOUT)

    return drain, ps.close


def pgcast_sync_callbacks(dsn: str, channel: str, n: int) -> tuple[Drain, Callable[[], None]]:
    ps = pgcast.connect(dsn)
    done = threading.Event()
    count = 0

    def handler(event: pgcast.Event) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    ps.subscribe(channel, handler)

    def drain() -> int:
        runner = ps.run_in_thread()
        done.wait(DRAIN_TIMEOUT)
        runner.stop()
        return count

    return drain, ps.close


def _in_loop(
    setup: Callable[[], Any], drain: Callable[[Any], Any], close: Callable[[Any], Any]
) -> tuple[Drain, Callable[[], None]]:
    """Run an asyncio subject's steps in one event loop, set up now."""
    runner = asyncio.Runner()
    state = runner.run(setup())

    def do_drain() -> int:
        result: int = runner.run(drain(state))
        return result

    def do_close() -> None:
        try:
            runner.run(close(state))
        finally:
            runner.close()

    return do_drain, do_close


def pgcast_async_events(dsn: str, channel: str, n: int) -> tuple[Drain, Callable[[], None]]:
    async def setup() -> pgcast.AsyncPubSub:
        ps = await pgcast.aio.connect(dsn)
        await ps.listen(channel)
        return ps

    async def drain(ps: pgcast.AsyncPubSub) -> int:
        events = ps.events(select_timeout=1.0, yield_timeouts=True)
        return await acount_events(events, n, DRAIN_TIMEOUT)

    async def close(ps: pgcast.AsyncPubSub) -> None:
        await ps.close()

    return _in_loop(setup, drain, close)


def pgcast_async_callbacks(dsn: str, channel: str, n: int) -> tuple[Drain, Callable[[], None]]:
    counter = [0]

    async def setup() -> pgcast.AsyncPubSub:
        ps = await pgcast.aio.connect(dsn)

        def handler(event: pgcast.Event) -> None:
            counter[0] += 1
            if counter[0] == n:
                ps.stop()

        await ps.subscribe(channel, handler)
        return ps

    async def drain(ps: pgcast.AsyncPubSub) -> int:
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await ps.run()
        except TimeoutError:
            pass
        return counter[0]

    async def close(ps: pgcast.AsyncPubSub) -> None:
        await ps.close()

    return _in_loop(setup, drain, close)


def pgcast_manager(dsn: str, channel: str, n: int) -> tuple[Drain, Callable[[], None]]:
    from pgcast.manager import NotificationManager

    ps = pgcast.connect(dsn)
    ps.listen(channel)

    def drain() -> int:
        count = 0
        deadline = time.monotonic() + DRAIN_TIMEOUT
        with NotificationManager(ps, timeout=1.0) as nm:
            for item in nm:
                if item is not None:
                    count += len(item[1])
                    if count >= n:
                        break
                elif time.monotonic() > deadline:
                    break
        return count

    return drain, ps.close


# -- the raw drivers and Redis ----------------------------------------------------


def raw_psycopg3(dsn: str, channel: str, n: int) -> tuple[Drain, Callable[[], None]]:
    conn = listen_raw(dsn, channel)

    def drain() -> int:
        count = 0
        for _ in conn.notifies(timeout=DRAIN_TIMEOUT, stop_after=n):
            count += 1
        return count

    return drain, conn.close


def floor_pgconn(dsn: str, channel: str, n: int) -> tuple[Drain, Callable[[], None]]:
    # The least any library on psycopg 3 can do per notification: libpq's
    # consume_input() and one pgconn.notifies() call each, no decoding, no
    # objects of its own. pgcast's receive path is this plus its Event.
    import selectors

    conn = listen_raw(dsn, channel)

    def drain() -> int:
        pgconn = conn.pgconn
        notifies = pgconn.notifies
        count = 0
        deadline = time.monotonic() + DRAIN_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(pgconn.socket, selectors.EVENT_READ)
            while count < n and time.monotonic() < deadline:
                if not selector.select(1.0):
                    continue
                pgconn.consume_input()
                while notifies() is not None:
                    count += 1
        return count

    return drain, conn.close


def raw_psycopg3_async(dsn: str, channel: str, n: int) -> tuple[Drain, Callable[[], None]]:
    async def setup() -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await conn.execute(f'LISTEN "{channel}"')
        return conn

    async def drain(conn: psycopg.AsyncConnection[Any]) -> int:
        count = 0
        async for _ in conn.notifies(timeout=DRAIN_TIMEOUT, stop_after=n):
            count += 1
        return count

    async def close(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.close()

    return _in_loop(setup, drain, close)


def raw_psycopg2(dsn: str, channel: str, n: int) -> tuple[Drain, Callable[[], None]]:
    import psycopg2
    import psycopg2.extensions

    conn = psycopg2.connect(dsn)
    conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    conn.cursor().execute(f'LISTEN "{channel}"')

    def drain() -> int:
        # The loop of psycopg2's documentation: select(), poll(), take the list.
        count = 0
        deadline = time.monotonic() + DRAIN_TIMEOUT
        notifies = conn.notifies
        while count < n and time.monotonic() < deadline:
            if select.select([conn], [], [], 1.0) == ([], [], []):
                continue
            conn.poll()
            for _ in notifies:
                count += 1
            notifies.clear()
        return count

    return drain, conn.close


def raw_asyncpg(dsn: str, channel: str, n: int) -> tuple[Drain, Callable[[], None]]:
    import asyncpg

    state: dict[str, Any] = {"count": 0}

    async def setup() -> Any:
        conn = await asyncpg.connect(dsn)
        done = asyncio.get_running_loop().create_future()
        state["done"] = done

        def listener(connection: Any, pid: int, chan: str, payload: str) -> None:
            state["count"] += 1
            if state["count"] == n and not done.done():
                done.set_result(None)

        await conn.add_listener(channel, listener)
        return conn

    async def drain(conn: Any) -> int:
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await state["done"]
        except TimeoutError:
            pass
        return int(state["count"])

    async def close(conn: Any) -> None:
        await conn.close()

    return _in_loop(setup, drain, close)


def redis_pubsub(channel: str, n: int) -> tuple[Drain, Callable[[], None]] | None:
    client = redis_client()
    if client is None:
        return None
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    confirmed = pubsub.get_message(timeout=5.0)
    assert confirmed is not None and confirmed["type"] == "subscribe", confirmed
    sender = client.pipeline(transaction=False)
    for start in range(0, n, 10_000):
        for i in range(start, min(n, start + 10_000)):
            sender.publish(channel, str(i))
        sender.execute()

    def drain() -> int:
        count = 0
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while count < n and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "message":
                count += 1
        return count

    def close() -> None:
        pubsub.close()
        client.close()

    return drain, close


SUBJECTS: dict[str, Setup] = {
    "pgcast sync events()": pgcast_sync_events,
    "pgcast asyncio events()": pgcast_async_events,
    "pgcast sync callbacks (run_in_thread)": pgcast_sync_callbacks,
    "pgcast asyncio callbacks (await run())": pgcast_async_callbacks,
    "pgcast NotificationManager": pgcast_manager,
    "raw psycopg 3 notifies()": raw_psycopg3,
    "raw psycopg 3 asyncio notifies()": raw_psycopg3_async,
    "raw psycopg2 select()+poll()": raw_psycopg2,
    "raw asyncpg add_listener": raw_asyncpg,
    "floor: psycopg 3 pgconn.notifies(), count only": floor_pgconn,
}
REDIS = "Redis pub/sub (redis-py)"


def measure_once(dsn: str, name: str, n: int) -> float | str:
    """One timed drain of *n*: the rate, or why there is none."""
    channel = _fresh_channel()
    if name == REDIS:
        made = redis_pubsub(channel, n)
        if made is None:
            return "no Redis answers on 127.0.0.1:6379"
    else:
        try:
            made = SUBJECTS[name](dsn, channel, n)
        except ImportError as exc:
            return f"not available: {exc}"
        prefill(dsn, channel, n)
    drain, close = made
    gc.collect()
    try:
        start = time.perf_counter()
        count = drain()
        elapsed = time.perf_counter() - start
    finally:
        close()
    if count != n:
        return f"FAILED: user code counted {count} of {n} within {DRAIN_TIMEOUT} s"
    return n / elapsed


def run(dsn: str, smoke: bool) -> list[Row]:
    """Measure every subject; one row per subject (median rate)."""
    n = SMOKE_N if smoke else N
    repeats = SMOKE_REPEATS if smoke else REPEATS
    names = [*SUBJECTS, REDIS]
    rates: dict[str, list[float]] = {name: [] for name in names}
    problems: dict[str, str] = {}
    for _ in range(repeats):
        for name in names:
            if name in problems:
                continue
            result = measure_once(dsn, name, n)
            if isinstance(result, str):
                problems[name] = result
            else:
                rates[name].append(result)
    rows = []
    for name in names:
        if name in problems:
            rows.append(row(BENCH, name, "rate", float("nan"), "msg/s", problems[name]))
            continue
        note = f"{n:,} msgs, median of {repeats}; {spread(rates[name])}"
        if name == REDIS:
            note += f"; {redis_parser()}"
        rows.append(row(BENCH, name, "rate", median(rates[name]), "msg/s", note))
    return rows


if __name__ == "__main__":
    from _common import main

    main(run)
