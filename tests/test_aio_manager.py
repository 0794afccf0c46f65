"""The asyncio NotificationManager (:mod:`pgcast.manager._manager_async`) against real PostgreSQL.

The same sentences as test_manager.py, for ``pgcast.aio.NotificationManager``
and ``async for``, plus what only the event loop can get wrong: a reader that
fires while the user's loop body awaits must not make the loop spin.

Each test body runs in a fresh event loop under :func:`_eventwait.arun`,
which fails it (rather than hanging) after 60 s; waits inside are bounded
more tightly, and ``timeout=None`` managers are guarded by a watchdog
notification as in the sync tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import select
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgcast
import pgcast.aio
from _capacity import spare_connections
from _eventwait import arun
from pgcast.aio import AsyncPubSub, NotificationManager
from pgcast.embedded import EmbeddedServer

Conn = psycopg.Connection[tuple[Any, ...]]
Value = tuple[AsyncPubSub, list[pgcast.Event]] | None
Opener = Callable[..., Awaitable[AsyncPubSub]]

ARRIVAL = 10.0
WATCHDOG = 15.0


@contextlib.asynccontextmanager
async def pubsubs(dsn: str) -> AsyncIterator[Opener]:
    """``await open_(*channels, dsn=...)``: listening AsyncPubSubs, closed at the end."""
    opened: list[AsyncPubSub] = []

    async def open_(*channels: str, dsn: str = dsn, **kwargs: Any) -> AsyncPubSub:
        aps = await pgcast.aio.connect(dsn, **kwargs)
        opened.append(aps)
        if channels:
            await aps.listen(*channels)
        return aps

    try:
        yield open_
    finally:
        for aps in opened:
            await aps.close()


def channel() -> str:
    return f"anm_{uuid.uuid4().hex[:12]}"


def notify(conn: Conn, channel: str, payload: str = "") -> None:
    conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def settle(*pubsubs: AsyncPubSub) -> None:
    """Wait until notifications sent to each AsyncPubSub reached its socket."""
    for aps in pubsubs:
        ready, _, _ = select.select([aps.fileno()], [], [], ARRIVAL)
        assert ready, f"nothing arrived on {aps!r} within {ARRIVAL} s"
    time.sleep(0.05)


async def take(nm: NotificationManager, count: int, timeout: float = ARRIVAL) -> list[Value]:
    """Iterate *nm* (timeout > 0) until *count* events came; every value yielded."""
    t = nm.gettimeout()
    assert t is not None and t > 0, "take() needs idle events to check its deadline"
    got: list[Value] = []
    n = 0
    deadline = time.monotonic() + timeout
    async for x in nm:
        got.append(x)
        if x is not None:
            n += len(x[1])
            if n >= count:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"got {n} of {count} events within {timeout} s: {got[-3:]}")


async def alist(nm: NotificationManager) -> list[Value]:
    return [x async for x in nm]


def events_of(values: list[Value]) -> list[tuple[AsyncPubSub, str, str]]:
    return [(x[0], e.channel, e.payload) for x in values if x is not None for e in x[1]]


@contextlib.contextmanager
def watchdog(dsn: str, channel: str, after: float = WATCHDOG) -> Iterator[None]:
    """Send ``'watchdog'`` on *channel* after *after* seconds, unless done by then."""

    def fire() -> None:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
            notify(c, channel, "watchdog")

    timer = threading.Timer(after, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# -- yielding events -------------------------------------------------------------


def test_events_on_several_connections(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(3)]
        async with pubsubs(dsn) as open_:
            a, b, c = [await open_(ch) for ch in chans]
            d = await open_(chans[0], chans[2])
            async with NotificationManager(a, b, c, d, timeout=0.2) as nm:
                for i, ch in enumerate(chans):
                    notify(conn, ch, f"p{i}")
                got = events_of(await take(nm, 5))
            assert sorted((aps.backend_pid, ch, p) for aps, ch, p in got) == sorted(
                [
                    (a.backend_pid, chans[0], "p0"),
                    (b.backend_pid, chans[1], "p1"),
                    (c.backend_pid, chans[2], "p2"),
                    (d.backend_pid, chans[0], "p0"),
                    (d.backend_pid, chans[2], "p2"),
                ]
            )

    arun(body())


def test_a_value_is_the_connection_and_all_its_events(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            aps = await open_(ch)
            with conn.transaction():
                for i in range(5):
                    notify(conn, ch, str(i))
                notify(conn, ch)
            settle(aps)
            async with NotificationManager(aps, timeout=0.2) as nm:
                assert aiter(nm) is nm
                x = await anext(nm)
            assert x is not None and x[0] is aps
            assert [e.payload for e in x[1]] == ["0", "1", "2", "3", "4", ""]
            for chan, payload, pid in x[1]:
                assert (chan, pid) == (ch, conn.info.backend_pid) and isinstance(payload, str)

    arun(body())


def test_events_already_received_are_yielded_first(dsn: str) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            aps = await open_(ch)
            await aps.notify(ch, "before")
            async with NotificationManager(aps, timeout=5) as nm:
                with watchdog(dsn, ch):
                    x = await anext(nm)
                    assert x is not None and [e.payload for e in x[1]] == ["before"]
                    await aps.notify(ch, "inside the loop")
                    x = await anext(nm)
            assert x is not None and [e.payload for e in x[1]] == ["inside the loop"]

    arun(body())


def test_a_notify_while_the_manager_waits_on_the_connection(dsn: str) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            aps = await open_(ch)

            async def later() -> None:
                await asyncio.sleep(0.2)
                await aps.notify(ch, "from a task")

            async with NotificationManager(aps) as nm:
                with watchdog(dsn, ch):
                    task = asyncio.create_task(later())
                    x = await anext(nm)
                    await task
            assert x is not None and [e.payload for e in x[1]] == ["from a task"]

    arun(body())


# -- timeouts ----------------------------------------------------------------------


def test_settimeout_and_gettimeout(dsn: str) -> None:
    async def body() -> None:
        nm = NotificationManager()
        assert nm.gettimeout() is None
        nm.settimeout(2)
        assert nm.gettimeout() == 2
        nm.settimeout(0)
        assert nm.gettimeout() == 0
        nm.settimeout(None)
        with pytest.raises(ValueError, match="got -1"):
            nm.settimeout(-1)
        with pytest.raises(TypeError, match="timeout must be a number of seconds or None"):
            nm.settimeout("1")  # type: ignore[arg-type]
        assert nm.gettimeout() is None
        assert NotificationManager(timeout=0.5).gettimeout() == 0.5
        with pytest.raises(ValueError, match="got -2"):
            NotificationManager(timeout=-2)
        await nm.close()

    arun(body())


def test_timeout_none_never_idles(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            aps = await open_(ch)
            timer = threading.Timer(1.0, notify, (conn, ch, "after a second"))
            async with NotificationManager(aps, timeout=None) as nm:
                with watchdog(dsn, ch):
                    start = time.monotonic()
                    timer.start()
                    x = await anext(nm)
                    elapsed = time.monotonic() - start
            timer.join(ARRIVAL)
            assert x is not None and [e.payload for e in x[1]] == ["after a second"]
            assert elapsed >= 0.9

    arun(body())


def test_timeout_yields_idle_events_about_every_timeout(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            aps = await open_(ch)
            async with NotificationManager(aps, timeout=0.2) as nm:
                stamps = [time.monotonic()]
                async for x in nm:
                    assert x is None
                    stamps.append(time.monotonic())
                    if len(stamps) == 6:
                        break
                gaps = [b - a for a, b in itertools.pairwise(stamps)]
                assert all(g >= 0.19 for g in gaps), gaps
                assert sum(gaps) < 5, gaps
                notify(conn, ch, "x")
                assert await anext(nm) is not None
                after_event = time.monotonic()
                assert await anext(nm) is None
                assert time.monotonic() - after_event >= 0.19

    arun(body())


def test_timeout_zero_polls_every_connection_once_and_ends(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(3)]
        async with pubsubs(dsn) as open_:
            pss = [await open_(ch) for ch in chans]
            quiet = await open_(channel())
            async with NotificationManager(*pss, quiet, timeout=0) as nm:
                assert await alist(nm) == []
                for ch in chans:
                    for i in range(2):
                        notify(conn, ch, str(i))
                settle(*pss)
                got = await alist(nm)
                assert None not in got
                assert sorted(
                    (x[0].backend_pid, [e.payload for e in x[1]]) for x in got if x
                ) == sorted((aps.backend_pid, ["0", "1"]) for aps in pss)
                assert await alist(nm) == []
                for aps in [*pss, quiet]:
                    assert await aps.get_event() is None
                notify(conn, chans[1], "again")
                settle(pss[1])
                again = await alist(nm)
            assert events_of(again) == [(pss[1], chans[1], "again")]

    arun(body())


# -- nothing held, nothing lost ------------------------------------------------------


def test_breaking_out_at_an_idle_event_loses_nothing(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(2)]
        async with pubsubs(dsn) as open_:
            a, b = [await open_(ch) for ch in chans]
            nm = NotificationManager(a, b, timeout=0.3)
            for i in range(3):
                notify(conn, chans[0], f"a{i}")
                notify(conn, chans[1], f"b{i}")
            got: list[Value] = []
            async for x in nm:
                if x is None:
                    break
                got.append(x)
            assert sorted(p for _, _, p in events_of(got)) == [
                "a0", "a1", "a2", "b0", "b1", "b2"
            ]
            await nm.close()
            notify(conn, chans[0], "later")
            settle(a)
            assert [e.payload async for e in a.wait(0) if e] == ["later"]
            assert await b.get_event() is None

    arun(body())


def test_breaking_out_while_handling_events_leaves_the_rest(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(3)]
        async with pubsubs(dsn) as open_:
            pss = [await open_(ch) for ch in chans]
            for ch in chans:
                notify(conn, ch, ch)
            settle(*pss)
            async with NotificationManager(*pss, timeout=0.2) as nm:
                first = await anext(nm)
                assert first is not None
                rest = [aps for aps in pss if aps is not first[0]]
                nm.settimeout(0)
                second = await alist(nm)
            assert sorted(x[0].backend_pid for x in second if x) == sorted(
                aps.backend_pid for aps in rest
            )
            assert sorted(p for _, _, p in events_of([first, *second])) == sorted(chans)

    arun(body())


def test_a_reader_does_not_spin_while_the_loop_body_awaits(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(2)]
        async with pubsubs(dsn) as open_:
            a, b = [await open_(ch) for ch in chans]
            nm = NotificationManager(a, b, timeout=0.2)
            calls: list[AsyncPubSub] = []
            readable = nm._waiter._readable

            def counting(aps: AsyncPubSub) -> None:
                calls.append(aps)
                readable(aps)

            nm._waiter._readable = counting  # type: ignore[method-assign]
            async with nm:
                notify(conn, chans[0], "a0")
                got = await take(nm, 1)
                notify(conn, chans[1], "b0")  # b's socket becomes readable...
                settle(b)
                await asyncio.sleep(0.3)  # ... while the loop body is busy
                assert calls.count(b) == 1  # fired once, then paused
                got += await take(nm, 1)
            assert sorted(p for _, _, p in events_of(got)) == ["a0", "b0"]

    arun(body())


def test_a_manager_dropped_without_close_is_collected_quietly(dsn: str) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            aps = await open_(ch)
            nm = NotificationManager(aps, timeout=0.1)
            assert await anext(nm) is None
            del nm
            gc.collect()
            await aps.notify(ch, "still works")
            assert [e.payload async for e in aps.wait(0) if e] == ["still works"]

    arun(body())


def test_close_stops_watching_and_leaves_the_pubsubs_usable(dsn: str) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            aps = await open_(ch)
            nm = NotificationManager(aps, timeout=0.1)
            assert await anext(nm) is None
            await nm.close()
            await nm.close()
            with pytest.raises(pgcast.ClosedError, match="NotificationManager is closed"):
                await anext(nm)
            assert aps.wake_callback is None
            loop = asyncio.get_running_loop()
            assert not loop.remove_reader(aps.fileno())  # no reader left behind
            await aps.notify(ch, "mine")
            assert [e.payload async for e in aps.wait(0) if e] == ["mine"]

    arun(body())


# -- the connections set ------------------------------------------------------------


def test_connections_is_a_set_changed_inside_the_loop(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(3)]
        async with pubsubs(dsn) as open_:
            a, b, c = [await open_(ch) for ch in chans]
            nm = NotificationManager(a, timeout=0.2)
            assert isinstance(nm.connections, set) and nm.connections == {a}
            notify(conn, chans[1], "sent to b before it was added")
            added = removed = False
            payloads: list[str] = []
            async with nm:
                async for x in nm:
                    if x is None:
                        if not added:
                            nm.connections.add(b)
                            nm.connections |= {c}
                            notify(conn, chans[2], "c0")
                            notify(conn, chans[0], "a0")
                            added = True
                        elif removed:
                            break
                        continue
                    aps, events = x
                    payloads += [e.payload for e in events]
                    if aps is a and not removed:
                        nm.connections.remove(a)
                        notify(conn, chans[0], "a1, not delivered")
                        notify(conn, chans[1], "b1")
                        removed = True
                    assert len(payloads) < 10
            assert sorted(payloads) == ["a0", "b1", "c0", "sent to b before it was added"]
            settle(a)
            assert [e.payload async for e in a.wait(0) if e] == ["a1, not delivered"]

    arun(body())


def test_clearing_the_set_ends_the_iteration(dsn: str) -> None:
    async def body() -> None:
        async with pubsubs(dsn) as open_:
            nm = NotificationManager(await open_(), await open_(), timeout=0.05)
            count = 0
            async for x in nm:
                assert x is None
                count += 1
                if count == 2:
                    nm.connections.clear()
                assert count < 10
            assert count == 2
            await nm.close()

    arun(body())


def test_a_connection_added_while_the_manager_waits_wakes_it(dsn: str) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(2)]
        async with pubsubs(dsn) as open_:
            a, b = [await open_(ch) for ch in chans]
            await b.notify(chans[1], "waiting in b's inbox")
            async with NotificationManager(a) as nm:

                async def add_later() -> None:
                    await asyncio.sleep(0.2)
                    nm.connections.add(b)

                with watchdog(dsn, chans[0]):
                    task = asyncio.create_task(add_later())
                    x = await anext(nm)
                    await task
            assert x is not None and x[0] is b
            assert [e.payload for e in x[1]] == ["waiting in b's inbox"]

    arun(body())


def test_no_connections_means_no_iteration() -> None:
    async def body() -> None:
        async with NotificationManager() as nm:
            assert await alist(nm) == []
            nm.settimeout(1)
            assert await alist(nm) == []

    arun(body())


# -- dead connections ------------------------------------------------------------------


def test_a_terminated_backend_moves_to_garbage(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(2)]
        async with pubsubs(dsn) as open_:
            a, b = [await open_(ch) for ch in chans]
            notify(conn, chans[0], "before the end")
            settle(a)
            async with NotificationManager(a, b, timeout=0.1) as nm:
                conn.execute("SELECT pg_terminate_backend(%s)", (a.backend_pid,))
                got: list[Value] = []
                deadline = time.monotonic() + ARRIVAL
                while a not in nm.garbage:
                    got.append(await anext(nm))
                    assert time.monotonic() < deadline, "the dead connection was not noticed"
                assert nm.connections == {b}
                assert "before the end" in [p for _, _, p in events_of(got)]
                notify(conn, chans[1], "b lives on")
                assert events_of(await take(nm, 1)) == [(b, chans[1], "b lives on")]

    arun(body())


def test_a_closed_connection_moves_to_garbage(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(3)]
        async with pubsubs(dsn) as open_:
            a, b, c = [await open_(ch) for ch in chans]
            async with NotificationManager(a, b, c, timeout=5) as nm:
                notify(conn, chans[0], "a0")
                x = await anext(nm)
                assert x is not None and x[0] is a
                await a.close()  # closed inside the loop
                notify(conn, chans[1], "b0")
                got: list[Value] = []
                deadline = time.monotonic() + ARRIVAL
                while a not in nm.garbage or not got:
                    got.append(await anext(nm))
                    assert time.monotonic() < deadline, f"a not in garbage, or no b0: {got}"
                assert events_of(got) == [(b, chans[1], "b0")]

                async def close_later() -> None:
                    await asyncio.sleep(0.2)
                    await b.close()
                    await asyncio.sleep(0.1)
                    await c.close()

                task = asyncio.create_task(close_later())
                start = time.monotonic()
                rest = await alist(nm)  # ends with the last connection, before 5 s
                assert time.monotonic() - start < 4.5
                await task
            assert rest == []
            assert nm.garbage == {a, b, c} and nm.connections == set()

    arun(body())


def test_events_received_before_a_close_are_still_delivered(dsn: str) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            a, b = await open_(ch), await open_(channel())
            async with NotificationManager(a, b, timeout=0.2) as nm:
                assert await anext(nm) is None
                await a.notify(ch, "last words")
                await a.close()
                got = await until(nm, lambda _: a in nm.garbage, "the closed one was not dropped")
            assert events_of(got) == [(a, ch, "last words")]

    arun(body())


def test_a_closed_connection_added_goes_to_garbage(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            good = await open_(ch)
            dead = await open_()
            await dead.close()
            async with NotificationManager(dead, good, timeout=0.2) as nm:
                notify(conn, ch, "fine")
                assert events_of(await take(nm, 1)) == [(good, ch, "fine")]
                assert nm.garbage == {dead} and nm.connections == {good}

    arun(body())


def test_the_seed_s_garbage_recovery(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            aps = await open_(ch)
            other = await open_(channel())
            async with NotificationManager(aps, other, timeout=0.1) as nm:
                conn.execute("SELECT pg_terminate_backend(%s)", (aps.backend_pid,))
                i = 0
                async for x in nm:
                    if x is None and nm.garbage:
                        recovered = [await open_(*old.listening_channels()) for old in nm.garbage]
                        nm.connections.update(recovered)
                        nm.garbage.clear()
                        break
                    i += 1
                    assert i < 100
                (fresh,) = nm.connections - {other}
                assert fresh is not aps and not nm.garbage
                notify(conn, ch, "after recovery")
                assert events_of(await take(nm, 1)) == [(fresh, ch, "after recovery")]

    arun(body())


def test_iteration_ends_when_every_connection_died(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        async with pubsubs(dsn) as open_:
            pss = [await open_(channel()) for _ in range(3)]
            async with NotificationManager(*pss, timeout=5) as nm:
                for aps in pss:
                    conn.execute("SELECT pg_terminate_backend(%s)", (aps.backend_pid,))
                start = time.monotonic()
                assert await alist(nm) == []
                assert time.monotonic() - start < 4.5
            assert nm.garbage == set(pss)

    arun(body())


# -- databases and servers ---------------------------------------------------------------


def test_connections_to_different_databases(dsn: str, conn: Conn) -> None:
    dbname = f"pgcast_anm_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE DATABASE "{dbname}"')
    other_dsn = make_conninfo(dsn, dbname=dbname)

    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            here = await open_(ch)
            there = await open_(ch, dsn=other_dsn)
            async with NotificationManager(here, there, timeout=0.2) as nm:
                notify(conn, ch, "here")
                with psycopg.connect(other_dsn, autocommit=True) as other:
                    notify(other, ch, "there")
                got = events_of(await take(nm, 2))
            assert sorted((aps is here, p) for aps, _, p in got) == [
                (False, "there"),
                (True, "here"),
            ]

    try:
        arun(body())
    finally:
        conn.execute(f'DROP DATABASE "{dbname}" WITH (FORCE)')


def test_two_servers_and_a_stopped_server_moves_to_garbage(dsn: str, conn: Conn) -> None:
    with EmbeddedServer() as second:

        async def body() -> None:
            ch = channel()
            async with pubsubs(dsn) as open_:
                here = await open_(ch)
                there = await open_(ch, dsn=second.dsn)
                async with NotificationManager(here, there, timeout=0.2) as nm:
                    notify(conn, ch, "from the first server")
                    with psycopg.connect(second.dsn, autocommit=True) as other:
                        notify(other, ch, "from the second server")
                    got = events_of(await take(nm, 2))
                    assert sorted((aps is here, p) for aps, _, p in got) == [
                        (False, "from the second server"),
                        (True, "from the first server"),
                    ]
                    second.stop()  # blocks the loop while it stops: fine here
                    deadline = time.monotonic() + ARRIVAL
                    while there not in nm.garbage:
                        assert await anext(nm) is None
                        assert time.monotonic() < deadline, "the stopped server was not noticed"
                    assert nm.connections == {here}
                    notify(conn, ch, "still here")
                    assert events_of(await take(nm, 1)) == [(here, ch, "still here")]

        arun(body())


# -- reconnect=True ----------------------------------------------------------------------

FAST = pgcast.Backoff(initial=0.05, maximum=0.2)


async def until(
    nm: NotificationManager, done: Callable[[list[Value]], bool], what: str
) -> list[Value]:
    """Iterate *nm* (timeout > 0) until done(values so far); every value yielded."""
    got: list[Value] = []
    deadline = time.monotonic() + ARRIVAL
    while not done(got):
        got.append(await anext(nm))
        assert time.monotonic() < deadline, f"{what} within {ARRIVAL} s; got {got[-3:]}"
    return got


def markers(values: list[Value], aps: AsyncPubSub) -> list[pgcast.Reconnected]:
    return [e for x in values if x and x[0] is aps for e in x[1]
            if isinstance(e, pgcast.Reconnected)]


def test_reconnect_option_reconnects_instead_of_garbage(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(2)]
        async with pubsubs(dsn) as open_:
            a, b = [await open_(ch) for ch in chans]
            old_pid = a.backend_pid
            async with NotificationManager(a, b, timeout=0.1, reconnect=True) as nm:
                conn.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
                await until(nm, lambda got: bool(markers(got, a)), "no marker for a")
                assert nm.connections == {a, b} and not nm.garbage
                assert a.backend_pid != old_pid
                notify(conn, chans[0], "on the new connection")
                notify(conn, chans[1], "b")
                assert sorted(events_of(await take(nm, 2)), key=str) == sorted(
                    [(a, chans[0], "on the new connection"), (b, chans[1], "b")], key=str
                )

    arun(body())


@pytest.mark.slow
def test_reconnect_option_waits_for_a_server_to_come_back(dsn: str, conn: Conn) -> None:
    with EmbeddedServer() as second:

        async def body() -> None:
            ch = channel()
            async with pubsubs(dsn) as open_:
                here = await open_(ch)
                there = await open_(ch, dsn=second.dsn, reconnect_backoff=FAST)
                async with NotificationManager(here, there, timeout=0.1, reconnect=True) as nm:
                    second.stop()
                    await asyncio.sleep(0.3)
                    notify(conn, ch, "meanwhile")  # the others keep delivering
                    assert events_of(await take(nm, 1)) == [(here, ch, "meanwhile")]
                    assert there in nm.connections and not nm.garbage
                    await asyncio.to_thread(second.start)
                    await until(nm, lambda got: bool(markers(got, there)), "no marker")
                    with psycopg.connect(second.dsn, autocommit=True) as other:
                        notify(other, ch, "back")
                    assert events_of(await take(nm, 1)) == [(there, ch, "back")]

        arun(body())


def test_reconnect_option_gives_up_into_garbage(dsn: str, conn: Conn) -> None:
    with EmbeddedServer() as second:

        async def body() -> None:
            ch = channel()
            backoff = pgcast.Backoff(initial=0.05, maximum=0.1, max_attempts=3)
            async with pubsubs(dsn) as open_:
                here = await open_(ch)
                there = await open_(ch, dsn=second.dsn, reconnect_backoff=backoff)
                async with NotificationManager(here, there, timeout=0.1, reconnect=True) as nm:
                    second.stop()
                    await until(nm, lambda _: there in nm.garbage, "no giving up")
                    assert nm.connections == {here}
                    notify(conn, ch, "still here")
                    assert events_of(await take(nm, 1)) == [(here, ch, "still here")]

        arun(body())


def test_reconnect_option_a_closed_connection_still_goes_to_garbage(dsn: str) -> None:
    async def body() -> None:
        async with pubsubs(dsn) as open_:
            a, b = [await open_(channel()) for _ in range(2)]
            async with NotificationManager(a, b, timeout=0.1, reconnect=True) as nm:
                assert await anext(nm) is None
                await a.close()
                await until(nm, lambda _: a in nm.garbage, "the closed one was not dropped")
                assert nm.connections == {b}

    arun(body())


def test_closing_the_manager_cancels_its_reconnects(dsn: str) -> None:
    with EmbeddedServer() as second:

        async def body() -> None:
            async with pubsubs(dsn) as open_:
                here = await open_(channel())
                there = await open_(channel(), dsn=second.dsn, reconnect_backoff=FAST)
                nm = NotificationManager(here, there, timeout=0.1, reconnect=True)
                second.stop()
                await until(nm, lambda _: bool(nm._reconnects), "no reconnect started")
                await nm.close()  # returns, with no task left behind
                assert not nm._reconnects

        arun(body())


# -- scale ------------------------------------------------------------------------------


def test_a_hundred_idle_connections_and_one_active(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        async with pubsubs(dsn) as open_:
            n = spare_connections(conn, 100)  # fewer on a small max_connections
            idle = [await open_(channel()) for _ in range(n)]
            ch = channel()
            active = await open_(ch)
            async with NotificationManager(*idle, active, timeout=0.5) as nm:
                for i in range(20):
                    notify(conn, ch, str(i))
                    assert events_of(await take(nm, 1)) == [(active, ch, str(i))]
                assert len(nm.connections) == n + 1 and not nm.garbage
                assert len(nm._core.fds) == n + 1

    arun(body())


def test_waiting_on_idle_connections_burns_no_cpu(dsn: str) -> None:
    async def body() -> None:
        async with pubsubs(dsn) as open_:
            idle = [await open_(channel()) for _ in range(50)]
            async with NotificationManager(*idle, timeout=1.0) as nm:
                cpu = time.process_time()
                assert await anext(nm) is None
                used = time.process_time() - cpu
            assert used < 0.2, f"{used:.3f} s of CPU for 1 s of waiting: polling?"

    arun(body())


# -- the twins of test_manager.py's iteration and connection-set tests ----------------


def test_the_manager_is_its_own_iterator(dsn: str) -> None:
    async def body() -> None:
        async with pubsubs(dsn) as open_, NotificationManager(await open_()) as nm:
            assert aiter(nm) is nm

    arun(body())


def test_settimeout_while_iterating_takes_effect(dsn: str) -> None:
    async def body() -> None:
        async with pubsubs(dsn) as open_, \
                NotificationManager(await open_(channel()), timeout=0.1) as nm:
            assert await anext(nm) is None
            nm.settimeout(0.4)
            start = time.monotonic()
            assert await anext(nm) is None
            assert time.monotonic() - start >= 0.3

    arun(body())


def test_timeout_set_to_zero_inside_the_loop_ends_after_a_poll(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            aps = await open_(ch)
            values: list[Value] = []
            async with NotificationManager(aps, timeout=0.1) as nm:
                async for x in nm:
                    values.append(x)
                    if x is None:
                        notify(conn, ch, "pending")
                        settle(aps)
                        nm.settimeout(0)
                    assert len(values) < 10
            assert values[0] is None
            assert [(x[0], [e.payload for e in x[1]]) for x in values[1:] if x] == [
                (aps, ["pending"])]

    arun(body())


def test_replacing_the_set(dsn: str, conn: Conn) -> None:
    async def body() -> None:
        chans = [channel() for _ in range(2)]
        async with pubsubs(dsn) as open_:
            a, b = [await open_(ch) for ch in chans]
            async with NotificationManager(a, timeout=0.2) as nm:
                nm.connections = {b}
                assert isinstance(nm.connections, set) and nm.connections == {b}
                notify(conn, chans[0], "to a")
                notify(conn, chans[1], "to b")
                got = events_of(await take(nm, 1))
                assert got == [(b, chans[1], "to b")]
                assert a.wake_callback is None

    arun(body())


def test_reusing_the_descriptor_of_a_closed_connection(dsn: str, conn: Conn) -> None:
    # When a managed connection is closed, the system may give its socket's
    # number to the next connection opened; that one must be watched (the
    # event loop's reader for the old socket must not stand for the new one).
    async def body() -> None:
        ch = channel()
        async with pubsubs(dsn) as open_:
            old = await open_()
            async with NotificationManager(old, timeout=0.1) as nm:
                assert await anext(nm) is None
                fd = old.fileno()
                await old.close()
                for _ in range(5):  # the number goes to one of the next sockets opened
                    new = await open_(ch)
                    if new.fileno() == fd:
                        break
                assert new.fileno() == fd, "the descriptor was not reused: nothing to test"
                nm.connections.add(new)
                notify(conn, ch, "on the new one")
                assert events_of(await take(nm, 1)) == [(new, ch, "on the new one")]
                assert nm.garbage == {old}

    arun(body())
