"""The callback interface: subscribe / unsubscribe, ``run_in_thread()`` and its
worker's ``stop()`` for the sync PubSub, ``await run()`` / ``stop()`` for the
asyncio one; sync and async handlers; per-channel order; a failing handler
goes to the exception handler and delivery goes on.

Handlers record what they see into lists; tests wait for the expected count
with a bounded poll of those lists (the handlers run in another thread or
task, so there is nothing else to wait on).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import pgcast
import pgcast.aio
from _eventwait import arun

Conn = psycopg.Connection[tuple[Any, ...]]
DELIVERY_TIMEOUT = 10.0


def wait_for(predicate: Callable[[], bool], timeout: float = DELIVERY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.005)


async def await_for(predicate: Callable[[], bool], timeout: float = DELIVERY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


@pytest.fixture
def ps(dsn: str) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as pubsub:
        yield pubsub


@pytest.fixture
def runners() -> Iterator[list[pgcast.Runner]]:
    """Runners to stop after the test, whatever happened."""
    started: list[pgcast.Runner] = []
    yield started
    for runner in started:
        runner.stop(10)


# -- sync: run_in_thread -----------------------------------------------------------


def test_subscribe_and_run_in_thread(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str, runners: list[pgcast.Runner]
) -> None:
    seen: list[tuple[str, pgcast.Event]] = []
    threads: set[str] = set()

    def first(event: pgcast.Event) -> None:
        threads.add(threading.current_thread().name)
        seen.append(("first", event))

    def second(event: pgcast.Event) -> None:
        seen.append(("second", event))

    ps.subscribe(unique_channel, first)
    ps.subscribe(unique_channel, second)
    assert ps.listening_channels() == {unique_channel}
    runner = ps.run_in_thread()
    runners.append(runner)
    assert isinstance(runner, pgcast.Runner) and runner.is_alive() and runner.daemon
    for i in range(100):
        pgcast.notify(conn, unique_channel, str(i))
    wait_for(lambda: len(seen) == 200)
    # Each event to every handler of its channel, in order, one event at a time.
    assert [(name, e.payload) for name, e in seen] == [
        (name, str(i)) for i in range(100) for name in ("first", "second")
    ]
    assert seen[0][1].pid == conn.info.backend_pid
    assert threads == {"pgcast-runner"}
    runner.stop()
    assert not runner.is_alive()
    assert runner.exception is None


def test_channels_are_routed_to_their_handlers(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str, runners: list[pgcast.Runner]
) -> None:
    other = unique_channel + "_B"
    seen: dict[str, list[str]] = {unique_channel: [], other: []}
    ps.subscribe(unique_channel, lambda e: seen[unique_channel].append(e.payload))
    ps.subscribe(other, lambda e: seen[other].append(e.payload))
    ps.listen(unique_channel + "_no_handler")
    runners.append(ps.run_in_thread())
    for i in range(50):
        pgcast.notify(conn, unique_channel if i % 2 else other, str(i))
        pgcast.notify(conn, unique_channel + "_no_handler", "ignored")
    wait_for(lambda: len(seen[unique_channel]) + len(seen[other]) == 50)
    assert seen[unique_channel] == [str(i) for i in range(1, 50, 2)]
    assert seen[other] == [str(i) for i in range(0, 50, 2)]


def test_async_handlers_in_the_sync_runner(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str, runners: list[pgcast.Runner]
) -> None:
    seen: list[str] = []

    async def slow_async(event: pgcast.Event) -> None:
        await asyncio.sleep(0.001)
        seen.append("async " + event.payload)

    def sync(event: pgcast.Event) -> None:
        seen.append("sync " + event.payload)

    ps.subscribe(unique_channel, slow_async)
    ps.subscribe(unique_channel, sync)
    runners.append(ps.run_in_thread())
    for i in range(20):
        pgcast.notify(conn, unique_channel, str(i))
    wait_for(lambda: len(seen) == 40)
    assert seen == [f"{kind} {i}" for i in range(20) for kind in ("async", "sync")]


def test_failing_handler_goes_to_the_exception_handler(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str, runners: list[pgcast.Runner]
) -> None:
    seen: list[str] = []
    failures: list[tuple[BaseException, pgcast.Event]] = []

    def fragile(event: pgcast.Event) -> None:
        if event.payload == "bad":
            raise RuntimeError("handler broke on " + event.payload)
        seen.append("fragile " + event.payload)

    async def fragile_async(event: pgcast.Event) -> None:
        if event.payload == "bad async":
            raise KeyError(event.payload)
        seen.append("async " + event.payload)

    ps.subscribe(unique_channel, fragile)
    ps.subscribe(unique_channel, fragile_async)
    ps.subscribe(unique_channel, lambda e: seen.append("after " + e.payload))
    ps.set_exception_handler(lambda exc, event: failures.append((exc, event)))
    runners.append(ps.run_in_thread())
    for payload in ("ok", "bad", "bad async", "still ok"):
        pgcast.notify(conn, unique_channel, payload)
    wait_for(lambda: len(seen) == 10)
    assert seen == [
        "fragile ok", "async ok", "after ok",
        "async bad", "after bad",
        "fragile bad async", "after bad async",
        "fragile still ok", "async still ok", "after still ok",
    ]
    assert [(type(exc), event.payload) for exc, event in failures] == [
        (RuntimeError, "bad"), (KeyError, "bad async")
    ]
    assert str(failures[0][0]) == "handler broke on bad"


def test_default_exception_handler_logs_and_delivery_goes_on(
    ps: pgcast.PubSub,
    conn: Conn,
    unique_channel: str,
    runners: list[pgcast.Runner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    def handler(event: pgcast.Event) -> None:
        if event.payload == "bad":
            raise ValueError("boom")
        seen.append(event.payload)

    def broken_exception_handler(exc: BaseException, event: pgcast.Event) -> None:
        raise RuntimeError("the exception handler broke too")

    caplog.set_level(logging.ERROR, logger="pgcast")
    ps.subscribe(unique_channel, handler)
    runners.append(ps.run_in_thread())
    pgcast.notify(conn, unique_channel, "bad")
    pgcast.notify(conn, unique_channel, "1")
    wait_for(lambda: seen == ["1"])
    [record] = [r for r in caplog.records if r.name == "pgcast"]
    assert "handler failed" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)

    caplog.clear()
    ps.set_exception_handler(broken_exception_handler)
    pgcast.notify(conn, unique_channel, "bad")
    pgcast.notify(conn, unique_channel, "2")
    wait_for(lambda: seen == ["1", "2"])
    assert any("exception handler failed" in r.getMessage() for r in caplog.records)

    ps.set_exception_handler(None)  # back to the default
    caplog.clear()
    pgcast.notify(conn, unique_channel, "bad")
    pgcast.notify(conn, unique_channel, "3")
    wait_for(lambda: seen == ["1", "2", "3"])
    assert any("handler failed" in r.getMessage() for r in caplog.records)
    assert runners[0].is_alive()


def test_unsubscribe(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str, runners: list[pgcast.Runner]
) -> None:
    other = unique_channel + "_other"
    seen: list[str] = []
    ps.subscribe(unique_channel, lambda e: seen.append(e.payload))
    ps.subscribe(other, lambda e: seen.append(e.payload))
    runners.append(ps.run_in_thread())
    pgcast.notify(conn, unique_channel, "1")
    wait_for(lambda: seen == ["1"])
    ps.unsubscribe(unique_channel)  # from this thread, while the runner waits
    assert ps.listening_channels() == {other}
    pgcast.notify(conn, unique_channel, "not delivered")
    pgcast.notify(conn, other, "end")
    wait_for(lambda: seen[-1] == "end")
    assert seen == ["1", "end"]


def test_subscribe_while_running(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str, runners: list[pgcast.Runner]
) -> None:
    seen: list[str] = []
    runners.append(ps.run_in_thread())
    time.sleep(0.05)  # the runner is waiting on the socket, with no timeout
    start = time.monotonic()
    ps.subscribe(unique_channel, lambda e: seen.append(e.payload))
    assert time.monotonic() - start < 1.0
    pgcast.notify(conn, unique_channel, "late subscriber")
    wait_for(lambda: seen == ["late subscriber"])


def test_handler_may_notify_and_subscribe(
    ps: pgcast.PubSub, unique_channel: str, runners: list[pgcast.Runner]
) -> None:
    pong = unique_channel + "_pong"
    seen: list[str] = []

    def ping(event: pgcast.Event) -> None:
        ps.subscribe(pong, lambda e: seen.append("pong " + e.payload))
        ps.notify(pong, event.payload)

    ps.subscribe(unique_channel, ping)
    runners.append(ps.run_in_thread())
    ps.notify(unique_channel, "1")
    wait_for(lambda: seen == ["pong 1"])


def test_stop_is_prompt_and_stops_between_events(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str
) -> None:
    seen: list[str] = []
    started = threading.Event()

    def slow(event: pgcast.Event) -> None:
        started.set()
        time.sleep(0.05)
        seen.append(event.payload)

    ps.subscribe(unique_channel, slow)
    pgcast.notify(conn, unique_channel, "0")
    runner = ps.run_in_thread()
    assert started.wait(10)
    for i in range(1, 200):
        pgcast.notify(conn, unique_channel, str(i))
    start = time.monotonic()
    runner.stop(10)
    assert time.monotonic() - start < 2.0  # not 200 slow events
    assert not runner.is_alive()
    handled = len(seen)
    assert handled < 200
    # What was not handled is not lost: iterating again gets it, in order.
    rest: list[str] = []
    for event in ps.events(select_timeout=1, yield_timeouts=True):
        if not isinstance(event, pgcast.Event):
            break
        rest.append(event.payload)
    assert seen + rest == [str(i) for i in range(200)]


def test_stop_while_waiting_idle(ps: pgcast.PubSub, unique_channel: str) -> None:
    ps.subscribe(unique_channel, print)
    runner = ps.run_in_thread(daemon=False)
    assert not runner.daemon
    time.sleep(0.1)
    start = time.monotonic()
    runner.stop(5)
    assert time.monotonic() - start < 1.0
    assert not runner.is_alive()
    runner.stop()  # again: nothing to do


def test_close_ends_the_runner(dsn: str, unique_channel: str) -> None:
    ps = pgcast.connect(dsn)
    ps.subscribe(unique_channel, print)
    runner = ps.run_in_thread()
    time.sleep(0.1)
    ps.close()
    runner.join(5)
    assert not runner.is_alive()
    assert runner.exception is None


def test_run_forever_with_a_stop_event(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str
) -> None:
    seen: list[str] = []
    stop = threading.Event()
    ps.subscribe(unique_channel, lambda e: seen.append(e.payload))
    thread = threading.Thread(target=ps.run_forever, args=(stop,), daemon=True)
    thread.start()
    pgcast.notify(conn, unique_channel, "x")
    wait_for(lambda: seen == ["x"])
    stop.set()
    ps._wake()  # what Runner.stop() does
    thread.join(5)
    assert not thread.is_alive()


def test_handler_must_be_callable(ps: pgcast.PubSub) -> None:
    with pytest.raises(TypeError, match="handler must be callable"):
        ps.subscribe("c", "not callable")  # type: ignore[arg-type]
    assert ps.listening_channels() == frozenset()


# -- asyncio: await run() ------------------------------------------------------------------


def test_async_subscribe_run_and_stop(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def main() -> None:
        seen: list[str] = []

        async def first(event: pgcast.Event) -> None:
            await asyncio.sleep(0)
            seen.append("async " + event.payload)

        def second(event: pgcast.Event) -> None:
            seen.append("sync " + event.payload)

        async with await pgcast.aio.connect(dsn) as aps:
            await aps.subscribe(unique_channel, first)
            await aps.subscribe(unique_channel, second)
            assert aps.listening_channels() == {unique_channel}
            task = asyncio.create_task(aps.run())
            for i in range(50):
                pgcast.notify(conn, unique_channel, str(i))
            await await_for(lambda: len(seen) == 100)
            assert seen == [f"{kind} {i}" for i in range(50) for kind in ("async", "sync")]
            aps.stop()
            await asyncio.wait_for(task, 5)

            # run() again after stop() works.
            task = asyncio.create_task(aps.run())
            pgcast.notify(conn, unique_channel, "again")
            await await_for(lambda: len(seen) == 102)
            aps.stop()
            await asyncio.wait_for(task, 5)

    arun(main())


def test_async_stop_right_after_starting(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.subscribe(unique_channel, print)
            task = asyncio.create_task(aps.run())
            aps.stop()  # before run() had a chance to start
            await asyncio.wait_for(task, 5)

    arun(main())


def test_async_failing_handler_and_exception_handler(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def main() -> None:
        seen: list[str] = []
        failures: list[tuple[type[BaseException], str]] = []

        async def fragile(event: pgcast.Event) -> None:
            if event.payload == "bad":
                raise RuntimeError("boom")
            seen.append(event.payload)

        def fragile_sync(event: pgcast.Event) -> None:
            if event.payload == "bad sync":
                raise LookupError("boom")
            seen.append("sync " + event.payload)

        async with await pgcast.aio.connect(dsn) as aps:
            await aps.subscribe(unique_channel, fragile)
            await aps.subscribe(unique_channel, fragile_sync)
            aps.set_exception_handler(lambda exc, ev: failures.append((type(exc), ev.payload)))
            task = asyncio.create_task(aps.run())
            for payload in ("1", "bad", "bad sync", "2"):
                pgcast.notify(conn, unique_channel, payload)
            await await_for(lambda: len(seen) == 6)
            assert seen == ["1", "sync 1", "sync bad", "bad sync", "2", "sync 2"]
            assert failures == [(RuntimeError, "bad"), (LookupError, "bad sync")]
            assert not task.done()
            aps.stop()
            await asyncio.wait_for(task, 5)

    arun(main())


def test_async_run_cancelled_and_closed(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def main() -> None:
        seen: list[str] = []
        aps = await pgcast.aio.connect(dsn)
        try:
            await aps.subscribe(unique_channel, lambda e: seen.append(e.payload))
            task = asyncio.create_task(aps.run())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
            # Still usable after a cancellation.
            task = asyncio.create_task(aps.run())
            pgcast.notify(conn, unique_channel, "after cancel")
            await await_for(lambda: seen == ["after cancel"])
            await aps.close()  # ends run()
            await asyncio.wait_for(task, 5)
        finally:
            await aps.close()

    arun(main())


def test_async_unsubscribe_while_running(dsn: str, conn: Conn, unique_channel: str) -> None:
    other = unique_channel + "_other"

    async def main() -> None:
        seen: list[str] = []
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.subscribe(unique_channel, lambda e: seen.append(e.payload))
            await aps.subscribe(other, lambda e: seen.append(e.payload))
            task = asyncio.create_task(aps.run())
            pgcast.notify(conn, unique_channel, "1")
            await await_for(lambda: seen == ["1"])
            await aps.unsubscribe(unique_channel)
            assert aps.listening_channels() == {other}
            pgcast.notify(conn, unique_channel, "not delivered")
            pgcast.notify(conn, other, "end")
            await await_for(lambda: seen[-1:] == ["end"])
            assert seen == ["1", "end"]
            aps.stop()
            await asyncio.wait_for(task, 5)

    arun(main())


def test_stop_from_inside_a_handler(ps: pgcast.PubSub, conn: Conn, unique_channel: str) -> None:
    seen: list[str] = []
    runners: list[pgcast.Runner] = []

    def handler(event: pgcast.Event) -> None:
        seen.append(event.payload)
        if event.payload == "stop":
            runners[0].stop()  # from the runner's own thread: no join

    ps.subscribe(unique_channel, handler)
    runners.append(ps.run_in_thread())
    for payload in ("1", "stop", "left pending"):
        pgcast.notify(conn, unique_channel, payload)
    runners[0].join(10)
    assert not runners[0].is_alive()
    assert seen == ["1", "stop"]
    assert runners[0].exception is None


def test_async_stop_from_inside_a_handler(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def main() -> None:
        seen: list[str] = []
        async with await pgcast.aio.connect(dsn) as aps:

            def handler(event: pgcast.Event) -> None:
                seen.append(event.payload)
                if event.payload == "stop":
                    aps.stop()

            await aps.subscribe(unique_channel, handler)
            for payload in ("1", "stop", "left pending"):
                pgcast.notify(conn, unique_channel, payload)
            await asyncio.wait_for(aps.run(), 10)
            assert seen == ["1", "stop"]
            # The event not handled is still there for the next run().
            task = asyncio.create_task(aps.run())
            await await_for(lambda: seen == ["1", "stop", "left pending"])
            aps.stop()
            await asyncio.wait_for(task, 5)

    arun(main())


def test_async_callable_object_is_awaited(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str, runners: list[pgcast.Runner]
) -> None:
    seen: list[str] = []

    class Handler:
        async def __call__(self, event: pgcast.Event) -> None:
            await asyncio.sleep(0)
            seen.append(event.payload)

    ps.subscribe(unique_channel, Handler())
    runners.append(ps.run_in_thread())
    pgcast.notify(conn, unique_channel, "awaited")
    wait_for(lambda: seen == ["awaited"])


def test_unlisten_of_a_channel_drops_its_handlers(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str, runners: list[pgcast.Runner]
) -> None:
    seen: list[str] = []
    ps.subscribe(unique_channel, lambda e: seen.append(e.payload))
    ps.unlisten(unique_channel)
    # Listening again alone does not bring the old handler back.
    ps.listen(unique_channel)
    runners.append(ps.run_in_thread())
    ps.subscribe(unique_channel + "_end", lambda e: seen.append(e.payload))
    pgcast.notify(conn, unique_channel, "no handler")
    pgcast.notify(conn, unique_channel + "_end", "end")
    wait_for(lambda: seen == ["end"])
