"""Bounded waits for events, shared by the client test modules.

Every helper here fails the test loudly after its timeout instead of hanging,
and waits through the public iteration API (``events``), so the helpers also
exercise what they wait with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
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
