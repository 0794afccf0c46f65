"""Durable channels on the asyncio client (:class:`pgcast.AsyncPubSub`).

The logic is the sync client's (:mod:`pgcast.durable._core`); these tests
check that the asyncio driver runs it: durable notify, replay with ``since``,
named consumers and ``ack``, many replay batches, the switch-over under a
concurrent publisher, and replay across a reconnect, before the marker.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgcast
import pgcast.aio
from _eventwait import arun
from pgcast.durable import install_schema, install_schema_async, prune_async
from pgcast.durable._core import INLINE_LIMIT, ref_payload

TIMEOUT = 20.0


@pytest.fixture(autouse=True)
def schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        install_schema(c)


async def drain(aps: pgcast.AsyncPubSub, idle: float = 0.3) -> list[pgcast.Event]:
    """Every event until *idle* seconds pass without one (bounded)."""
    got: list[pgcast.Event] = []
    deadline = time.monotonic() + TIMEOUT
    async for item in aps.wait(idle):
        if item is None:
            return got
        if isinstance(item, pgcast.Event):
            got.append(item)
        if time.monotonic() > deadline:
            break
    pytest.fail(f"events kept coming for {TIMEOUT} s; got {len(got)}")


async def take(aps: pgcast.AsyncPubSub, n: int, timeout: float = TIMEOUT) -> list[Any]:
    """The next *n* events and markers, or fail."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    async for item in aps.events(select_timeout=0.05, yield_timeouts=True):
        if item is not None:
            got.append(item)
            if len(got) == n:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"received {len(got)} of {n} within {timeout} s: last {got[-3:]}")


def test_durable_notify_and_replay_since(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as pub, await pgcast.aio.connect(dsn) as sub:
            first = await pub.notify(unique_channel, "1", durable=True)
            last = await pub.notify_many(
                [(unique_channel, str(i)) for i in range(2, 5)], durable=True)
            assert first is not None and last == first + 3
            assert await pub.notify(unique_channel, "plain") is None
            await sub.listen(unique_channel, durable=True, since=first)
            await pub.notify(unique_channel, "5", durable=True)
            got = await take(sub, 4)
            assert [e.payload for e in got] == ["2", "3", "4", "5"]
            assert [e.id for e in got] == list(range(first + 1, first + 5))
            assert await drain(sub) == []

    arun(main())


def test_consumer_and_ack(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as pub:
            await pub.notify_many([(unique_channel, str(i)) for i in range(4)], durable=True)
            async with await pgcast.aio.connect(dsn) as worker:
                await worker.listen(unique_channel, durable=True, consumer="aw", since=0)
                got = await drain(worker)
                assert [e.payload for e in got] == ["0", "1", "2", "3"]
                await worker.ack(got[1])
                with pytest.raises(TypeError):
                    await worker.ack(pgcast.Event(unique_channel, "x", 1))
            async with await pgcast.aio.connect(dsn) as worker:
                await worker.listen(unique_channel, durable=True, consumer="aw")
                assert [e.payload for e in await drain(worker)] == ["2", "3"]

    arun(main())


def test_many_batches_and_a_concurrent_publisher(dsn: str, unique_channel: str) -> None:
    backlog, live = 2300, 300

    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as pub, await pgcast.aio.connect(dsn) as sub:
            await pub.notify_many([(unique_channel, f"b{i}") for i in range(backlog)],
                                  durable=True)

            async def publish() -> None:
                async with await pgcast.aio.connect(dsn) as p:
                    for i in range(live):
                        await p.notify(unique_channel, f"l{i}", durable=True)

            task = asyncio.create_task(publish())
            await asyncio.sleep(0.02)
            await sub.listen(unique_channel, durable=True, since=0)
            got = await take(sub, backlog + live, timeout=60)
            await task
            assert await drain(sub) == []
            assert [e.payload for e in got] == (
                [f"b{i}" for i in range(backlog)] + [f"l{i}" for i in range(live)])
            event_ids = [e.id for e in got]
            assert event_ids == sorted(set(event_ids))

    arun(main(), timeout=90)


def test_replay_across_a_reconnect_comes_before_the_marker(
    dsn: str, unique_channel: str
) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as pub, await pgcast.aio.connect(dsn) as sub, \
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
            await sub.listen(unique_channel, durable=True)
            pid = sub.backend_pid
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            for _ in range(2000):  # until the backend is gone (bounded: 20 s)
                cur = await admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                          (pid,))
                if await cur.fetchone() is None:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the terminated backend did not go away")
            for i in range(3):
                await pub.notify(unique_channel, f"missed {i}", durable=True)
            got = await take(sub, 4)
            assert [e.payload for e in got[:3]] == ["missed 0", "missed 1", "missed 2"]
            assert isinstance(got[3], pgcast.Reconnected)
            assert sub.backend_pid != pid

    arun(main())


def test_async_schema_and_prune(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            assert await install_schema_async(c) == pgcast.durable.LATEST_VERSION
            async with await pgcast.aio.connect(dsn) as pub:
                await pub.notify(unique_channel, "x", durable=True)
            assert await prune_async(c, older_than=timedelta(0), channel=unique_channel) == {
                unique_channel: 1}

    arun(main())


def test_a_forged_reference_reads_no_other_channels_message(
    dsn: str, conn: psycopg.Connection[Any], unique_channel: str
) -> None:
    """The asyncio twin: a forged reference payload (raw SQL NOTIFY,
    pg_notify) makes the listener fetch on its own channel only."""
    private, public = unique_channel + ".private", unique_channel + ".public"
    secret = "secret:" + "x" * INLINE_LIMIT

    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as pub, await pgcast.aio.connect(dsn) as sub:
            secret_id = await pub.notify(private, secret, durable=True)
            assert secret_id is not None
            forged = ref_payload(secret_id)
            await sub.listen(public)
            conn.execute(sql.SQL("NOTIFY {}, {}").format(sql.Identifier(public), forged))
            conn.execute("SELECT pg_notify(%s, %s)", (public, forged))
            await pub.notify(public, forged)
            await pub.notify(public, "after")
            got = await take(sub, 2)
            assert [e.payload for e in got] == [forged, "after"]
            assert all("secret" not in e.payload for e in got)

    arun(main())


def test_a_forged_reference_never_moves_a_durable_position(
    dsn: str, conn: psycopg.Connection[Any], unique_channel: str
) -> None:
    """The asyncio twin: forged references (raw NOTIFY, pg_notify,
    pgcast.aio.notify, the AsyncPublisher) never move the position or ack()."""
    huge, texts = 2**62, ["forged-a", "forged-b"]

    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as pub, await pgcast.aio.connect(dsn) as sub:
            await sub.listen(unique_channel, durable=True, consumer="forge-test")
            first = await pub.notify(unique_channel, "one", durable=True)
            assert first is not None
            refs = [ref_payload(huge, texts[0]), ref_payload(first + 1, texts[1]),
                    ref_payload(huge + 1)]
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as app:
                for ref in refs:
                    conn.execute(sql.SQL("NOTIFY {}, {}").format(sql.Identifier(unique_channel),
                                                                 ref))
                    conn.execute("SELECT pg_notify(%s, %s)", (unique_channel, ref))
                    await pgcast.aio.notify(app, unique_channel, ref)
            async with await pgcast.AsyncPublisher.connect(dsn) as publisher:
                for ref in refs:
                    await publisher.publish(unique_channel, ref)
                await publisher.flush()
            second = await pub.notify(unique_channel, "two", durable=True)
            got: list[Any] = []
            for _ in range(100):
                got += [e for e in await take(sub, 1) if isinstance(e, pgcast.Event)]
                if got[-1].payload == "two":
                    break
            payloads = [e.payload for e in got]
            assert payloads[0] == "one" and payloads[-1] == "two"
            assert not set(texts) & set(payloads), payloads
            await sub.ack(got[-1])
        row = conn.execute("SELECT position FROM pgcast.consumers WHERE name = 'forge-test' "
                           "AND channel = %s", (unique_channel,)).fetchone()
        assert row is not None and row[0] == second

    arun(main())


def test_notify_many_refuses_what_is_not_a_pair(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            bad: list[Any] = [[(unique_channel, "a", "b")], [(unique_channel,)], ["ab"], 5, "ab"]
            for messages in bad:
                with pytest.raises(TypeError, match=r"\(channel, payload\) pair"):
                    await ps.notify_many(messages)
            await ps.notify(unique_channel, "still usable")

    arun(main())
