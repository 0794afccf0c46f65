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
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import _hba
import pgcast
import pgcast.aio
from _eventwait import arun
from pgcast.embedded import EmbeddedServer

Conn = psycopg.Connection[tuple[Any, ...]]
password_role = _hba.password_role  # a fixture, shared by test_client/test_aio
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


# -- receiving ---------------------------------------------------------------------------


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


# -- transactions and the seeds' semantics ---------------------------------------------------


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
