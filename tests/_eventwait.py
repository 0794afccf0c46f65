"""Bounded waits for events, shared by the client test modules.

Every helper here fails the test loudly after its timeout instead of hanging,
and waits through the public iteration API (``events``), so the helpers also
exercise what they wait with.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

import pgcast

T = TypeVar("T")

#: How long a test waits for something that should arrive at once on loopback.
ARRIVAL_TIMEOUT = 10.0


def collect(ps: pgcast.PubSub, n: int, timeout: float = ARRIVAL_TIMEOUT) -> list[pgcast.Event]:
    """The next *n* events of *ps*, or fail after *timeout* seconds."""
    got: list[pgcast.Event] = []
    if n == 0:
        return got
    deadline = time.monotonic() + timeout
    for event in ps.events(select_timeout=0.05, yield_timeouts=True):
        if event is not None:
            assert isinstance(event, pgcast.Event), f"not an event: {event!r}"
            got.append(event)
            if len(got) == n:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"received {len(got)} of {n} events within {timeout} s: last {got[-3:]}")


def collect_until(
    ps: pgcast.PubSub, sentinel: str, timeout: float = ARRIVAL_TIMEOUT
) -> list[pgcast.Event]:
    """Every event up to and including the first whose payload is *sentinel*.

    To show that something is *not* delivered, send it, then a sentinel from
    the same session: a notification that were delivered would come first.
    """
    got: list[pgcast.Event] = []
    deadline = time.monotonic() + timeout
    for event in ps.events(select_timeout=0.05, yield_timeouts=True):
        if event is not None:
            assert isinstance(event, pgcast.Event), f"not an event: {event!r}"
            got.append(event)
            if event.payload == sentinel:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"sentinel {sentinel!r} not received within {timeout} s; got {got[-3:]}")


async def acollect(
    aps: pgcast.AsyncPubSub, n: int, timeout: float = ARRIVAL_TIMEOUT
) -> list[pgcast.Event]:
    """The next *n* events of *aps*, or fail after *timeout* seconds."""
    got: list[pgcast.Event] = []
    if n == 0:
        return got
    deadline = time.monotonic() + timeout
    async for event in aps.events(select_timeout=0.05, yield_timeouts=True):
        if event is not None:
            assert isinstance(event, pgcast.Event), f"not an event: {event!r}"
            got.append(event)
            if len(got) == n:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"received {len(got)} of {n} events within {timeout} s: last {got[-3:]}")


async def acollect_until(
    aps: pgcast.AsyncPubSub, sentinel: str, timeout: float = ARRIVAL_TIMEOUT
) -> list[pgcast.Event]:
    """The asyncio twin of :func:`collect_until`."""
    got: list[pgcast.Event] = []
    deadline = time.monotonic() + timeout
    async for event in aps.events(select_timeout=0.05, yield_timeouts=True):
        if event is not None:
            assert isinstance(event, pgcast.Event), f"not an event: {event!r}"
            got.append(event)
            if event.payload == sentinel:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"sentinel {sentinel!r} not received within {timeout} s; got {got[-3:]}")


def wait_readable(ps: pgcast.PubSub | pgcast.AsyncPubSub, timeout: float) -> None:
    """Block until the PubSub's socket has something to read (or *timeout*):
    what was sent to it has arrived, not yet read. The same in both flavours."""
    with selectors.DefaultSelector() as sel:
        sel.register(ps.connection.fileno(), selectors.EVENT_READ)
        sel.select(timeout)


def arun(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run *coro* in a fresh event loop; fail (not hang) after *timeout* s."""

    async def bounded() -> T:
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await coro
        except TimeoutError:
            if scope.expired():
                pytest.fail(f"asyncio test body did not finish within {timeout} s")
            raise  # a TimeoutError of the test's own

    return asyncio.run(bounded())


def run_sync(result: T, timeout: float = 60.0) -> T:
    """What :func:`arun` becomes in a test generated for the sync flavour
    (tools/async_to_sync.py): the body has already run; its result."""
    return result


# -- running something alongside the test body ------------------------------
# In the asyncio tests a task, in the generated sync tests a thread: the same
# test then races the other flavour's concurrency (tools/async_to_sync.py
# renames astart/ajoin/apause to start_thread/join_thread/pause).


def astart(target: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """Run *target* as a task alongside the test body."""

    async def run() -> None:
        await target()

    return asyncio.get_running_loop().create_task(run())


async def ajoin(task: asyncio.Task[None], timeout: float = ARRIVAL_TIMEOUT) -> None:
    """Wait for *task* to end; fail (not hang) after *timeout* s."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        pytest.fail(f"the task did not end within {timeout} s")
    task.result()


async def apause(seconds: float) -> None:
    """Let the other tasks run for *seconds*."""
    await asyncio.sleep(seconds)


def start_thread(target: Callable[[], None]) -> threading.Thread:
    """Run *target* in a daemon thread alongside the test body."""
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def join_thread(thread: threading.Thread, timeout: float = ARRIVAL_TIMEOUT) -> None:
    """Wait for *thread* to end; fail (not hang) after *timeout* s."""
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"the thread did not end within {timeout} s")


def pause(seconds: float) -> None:
    """Let the other threads run for *seconds*."""
    time.sleep(seconds)
