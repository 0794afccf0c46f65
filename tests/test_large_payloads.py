"""Payloads of any size through :meth:`pgcast.PubSub.notify` (issue 4, point 5).

What NOTIFY can carry (under 8000 bytes of UTF-8) goes as a plain
notification; from 8000 bytes on, the payload is stored in the log and the
receiving PubSub fetches it before handing the event out, on every way of
receiving: ``events()``, ``wait()``, ``get_event()``, handlers, the
NotificationManager, and the asyncio twins. The boundary is tested in bytes
with multibyte text; 100 kB and 10 MB payloads arrive intact.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgcast
import pgcast.aio
from _eventwait import acollect, arun, collect
from pgcast.durable import install_schema

Conn = psycopg.Connection[tuple[Any, ...]]

# Each pair: the largest text NOTIFY carries (7999 bytes) and the smallest it
# does not (8000 bytes), written with 1-, 2-, 3- and 4-byte characters.
BOUNDARY = [
    ("a" * 7999, "a" * 8000),
    ("é" * 3999 + "a", "é" * 4000),
    ("€" * 2666 + "a", "€" * 2666 + "é"),
    ("\N{GRINNING FACE}" * 1999 + "abc", "\N{GRINNING FACE}" * 2000),
]


@pytest.fixture(autouse=True)
def schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        install_schema(c)


@pytest.fixture
def pub(dsn: str) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as ps:
        yield ps


@pytest.fixture
def sub(dsn: str, unique_channel: str) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        yield ps


@pytest.mark.parametrize(("fits", "too_big"), BOUNDARY, ids=["1-byte", "2-byte", "3-byte",
                                                              "4-byte"])
def test_the_boundary_in_utf8_bytes(
    pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str, fits: str, too_big: str
) -> None:
    assert len(fits.encode()) == 7999 and len(too_big.encode()) == 8000
    assert pub.notify(unique_channel, fits) is None  # a plain NOTIFY
    logged = pub.notify(unique_channel, too_big)  # through the log
    assert isinstance(logged, int)
    plain, large = collect(sub, 2)
    assert type(plain) is pgcast.Event and plain.payload == fits
    assert type(large) is pgcast.DurableEvent and large.payload == too_big
    assert large.id == logged and large.pid == pub.backend_pid


def test_raw_notify_keeps_notify_s_limit(conn: Conn, unique_channel: str) -> None:
    with pytest.raises(pgcast.PayloadTooLargeError, match="8000 bytes"):
        pgcast.notify(conn, unique_channel, "é" * 4000)


@pytest.mark.parametrize("size", [100_000, 10_000_000], ids=["100kB", "10MB"])
def test_large_payloads_arrive_intact(
    pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str, size: int
) -> None:
    # Numbered chunks with multibyte text: a lost, repeated or reordered
    # piece anywhere would show.
    text = "".join(f"{i:08d}ü✓ " for i in range(size // 14 + 1))
    assert len(text.encode()) >= size
    pub.notify(unique_channel, text)
    pub.notify(unique_channel, "after")
    big, after = collect(sub, 2, timeout=60)
    assert big.payload == text and after.payload == "after"


def test_large_json_payload(pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str) -> None:
    value = {"rows": [{"id": i, "name": f"row {i}"} for i in range(2000)]}
    pub.notify(unique_channel, value)
    (event,) = collect(sub, 1)
    assert event.json() == value


def test_a_payload_that_looks_like_a_reference_is_not_mistaken(
    pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str
) -> None:
    tricky = ["\x1epgcast:1", "\x1epgcast:1:x", "\x1e"]
    for text in tricky:
        pub.notify(unique_channel, text)
    assert [e.payload for e in collect(sub, 3)] == tricky


def test_notify_many_mixes_sizes_in_order(
    pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str
) -> None:
    payloads = ["small", "x" * 9000, "small again", "é" * 4000, "", "end"]
    pub.notify_many([(unique_channel, p) for p in payloads])
    got = collect(sub, len(payloads))
    assert [e.payload for e in got] == payloads
    assert [type(e) is pgcast.DurableEvent for e in got] == [
        False, True, False, True, False, False]


def test_large_payload_in_a_transaction(
    pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str
) -> None:
    with pytest.raises(RuntimeError), pub.transaction():
        pub.notify(unique_channel, "r" * 20_000)
        raise RuntimeError("roll back")
    with pub.transaction():
        pub.notify(unique_channel, "c" * 20_000)
        pub.notify(unique_channel, "end")
    assert [e.payload[:1] for e in collect(sub, 2)] == ["c", "e"]


def test_every_way_of_receiving_fetches_the_payload(
    dsn: str, pub: pgcast.PubSub, unique_channel: str
) -> None:
    big = "z" * 50_000
    # get_event()
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        pub.notify(unique_channel, big)
        deadline = time.monotonic() + 10
        event = None
        while event is None and time.monotonic() < deadline:
            event = ps.get_event()
            time.sleep(0.01)
        assert isinstance(event, pgcast.Event) and event.payload == big
    # wait()
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        pub.notify(unique_channel, big)
        for item in ps.wait(10):
            assert item is not None, "nothing within 10 s"
            assert isinstance(item, pgcast.Event) and item.payload == big
            break
    # handlers, from run_in_thread()
    with pgcast.connect(dsn) as ps:
        got: list[str] = []
        done = threading.Event()

        def handler(event: pgcast.Event) -> None:
            got.append(event.payload)
            done.set()

        ps.subscribe(unique_channel, handler)
        runner = ps.run_in_thread()
        pub.notify(unique_channel, big)
        assert done.wait(10), "the handler was not called within 10 s"
        runner.stop()
        assert got == [big]


def test_the_notification_manager_fetches_the_payload(
    dsn: str, pub: pgcast.PubSub, unique_channel: str
) -> None:
    with pgcast.connect(dsn) as a, pgcast.connect(dsn) as b:
        a.listen(unique_channel)
        b.listen(unique_channel)
        pub.notify(unique_channel, "m" * 30_000)
        pub.notify(unique_channel, "end")
        seen: dict[int, list[str]] = {a.backend_pid: [], b.backend_pid: []}
        deadline = time.monotonic() + 10
        with pgcast.NotificationManager(a, b, timeout=0.1) as nm:
            for item in nm:
                if item is not None:
                    ps, events = item
                    seen[ps.backend_pid] += [e.payload for e in events]
                if all(len(v) == 2 for v in seen.values()) or time.monotonic() > deadline:
                    break
        assert seen == {a.backend_pid: ["m" * 30_000, "end"],
                        b.backend_pid: ["m" * 30_000, "end"]}


# -- asyncio ------------------------------------------------------------------------------


def test_async_boundary_and_large_payloads(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as apub, \
                await pgcast.aio.connect(dsn) as asub:
            await asub.listen(unique_channel)
            payloads = [p for pair in BOUNDARY for p in pair] + ["x" * 1_000_000]
            for p in payloads:
                await apub.notify(unique_channel, p)
            got = await acollect(asub, len(payloads), timeout=30)
            assert [e.payload for e in got] == payloads
            assert [type(e) is pgcast.DurableEvent for e in got] == [False, True] * 4 + [True]
            await apub.notify_many([(unique_channel, "y" * 9000), (unique_channel, "end")])
            assert [e.payload[:1] for e in await acollect(asub, 2)] == ["y", "e"]
            await apub.notify(unique_channel, "w" * 10_000)
            event = None
            for _ in range(500):
                event = await asub.get_event()
                if event is not None:
                    break
                await asyncio.sleep(0.01)
            assert isinstance(event, pgcast.Event) and event.payload == "w" * 10_000

    arun(main())


def test_async_notification_manager_fetches_the_payload(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as apub, \
                await pgcast.aio.connect(dsn) as asub:
            await asub.listen(unique_channel)
            await apub.notify(unique_channel, "q" * 12_000)
            got: list[str] = []
            async with pgcast.aio.NotificationManager(asub, timeout=0.1) as nm:
                async for item in nm:
                    if item is not None:
                        got += [e.payload for e in item[1]]
                    if got:
                        break
            assert got == ["q" * 12_000]

    arun(main())
