"""pgcast.Publisher and AsyncPublisher against a real PostgreSQL, and their
pure core (pgcast.publisher._batcher) on its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import _faults
import pgcast
from _eventwait import collect_until
from pgcast.embedded import EmbeddedServer
from pgcast.publisher._batcher import Batcher
from tcp_proxy import TcpProxy

WAIT = 10.0  # seconds anything that should happen on loopback may take


def collect(ps: pgcast.PubSub, n: int, timeout: float = WAIT) -> list[pgcast.Event]:
    """The next *n* events of *ps*, or fail after *timeout* seconds."""
    got: list[pgcast.Event] = []
    deadline = time.monotonic() + timeout
    for event in ps.events(select_timeout=0.05, yield_timeouts=True):
        if event is not None:
            got.append(event)
            if len(got) == n:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"received {len(got)} of {n} notifications within {timeout} s")


def nothing_more(ps: pgcast.PubSub, wait: float = 0.3) -> None:
    """Fail if an event arrives within *wait* seconds."""
    extra = list(ps.wait(0))
    deadline = time.monotonic() + wait
    while not extra and time.monotonic() < deadline:
        time.sleep(0.05)
        extra = list(ps.wait(0))
    assert extra == []


@pytest.fixture
def proxy(dsn: str) -> Iterator[TcpProxy]:
    """A loopback proxy to the server, to fail a connection on cue."""
    with TcpProxy.for_dsn(dsn) as p:
        yield p


@pytest.fixture
def listener(dsn: str, unique_channel: str) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        yield ps


def swallow(proxy: TcpProxy) -> int:
    """Swallow what the connections open through *proxy* send from now on;
    returns the count to give :func:`cut_when_sent`."""
    before = proxy.swallowed
    assert proxy.blackhole() == 1
    return before


async def acut_when_sent(proxy: TcpProxy, before: int, *, cut: bool = True) -> None:
    """Wait until a batch was sent into the swallowed connection, then reset
    it (unless not *cut*): that batch fails in flight (whether it committed
    is unknown, so it is reported, not retried)."""
    deadline = time.monotonic() + WAIT
    while proxy.swallowed == before:
        assert time.monotonic() < deadline, "no batch was sent"
        await asyncio.sleep(0.01)
    if cut:
        proxy.cut()


def cut_when_sent(proxy: TcpProxy, before: int, *, cut: bool = True) -> None:
    """:func:`acut_when_sent` for the sync tests."""
    asyncio.run(acut_when_sent(proxy, before, cut=cut))


# -- the pure core -------------------------------------------------------------


def make_batcher(**kw: int | float) -> Batcher[object]:
    options: dict[str, int | float] = {"interval": 0.01, "max_batch": 3, "max_pending": 5}
    options.update(kw)
    return Batcher(object, **options)  # type: ignore[arg-type]


def test_batcher_fills_batches_in_order_and_bounds_pending() -> None:
    b = make_batcher()
    assert b.due_in(0.0) is None
    wakes = []
    handles = []
    for i in range(5):
        assert b.has_room()
        batch, wake = b.add("c", str(i), now=100.0)
        wakes.append(wake)
        handles.append(batch.handle)
    assert not b.has_room()
    # The first message opens a batch, the third fills it, the fourth opens another.
    assert wakes == [True, False, True, True, False]
    assert handles[0] is handles[2] and handles[3] is not handles[2]
    assert b.due_in(100.0) == 0.0  # the head is full: due now
    first = b.take()
    assert first.messages() == [("c", "0"), ("c", "1"), ("c", "2")]
    assert b.has_room() and b.pending == 2
    # Not full: due interval after its first message, sooner after a flush mark.
    assert b.due_in(100.004) == pytest.approx(0.006)
    assert b.flush_mark() == 2
    assert b.due_in(100.004) == 0.0


def test_batcher_closing_makes_everything_due() -> None:
    b = make_batcher(interval=60)
    b.add("c", "x", now=0.0)
    assert b.due_in(0.0) == 60.0
    b.closing = True
    assert b.due_in(0.0) == 0.0


def test_batcher_reports_failures_once_with_every_message() -> None:
    b = make_batcher()
    for i in range(4):
        b.add("c", str(i), now=0.0)
    one, two = b.take(), b.take()
    assert b.outcome(one, None) is None
    b.finish(one)
    error = b.outcome(two, OSError("boom"))
    assert isinstance(error, pgcast.PublishError)
    assert error.messages == [("c", "3")] and isinstance(error.__cause__, OSError)
    b.finish(two)
    assert b.completed == 2
    b.add("d", "4", now=0.0)
    [(_, failed)] = b.fail_queued(RuntimeError("gone"))
    assert failed.messages == [("d", "4")]
    combined = b.take_failure()
    assert combined is not None
    assert combined.messages == [("c", "3"), ("d", "4")]
    assert "2 Publisher transactions failed" in str(combined)
    assert isinstance(combined.__cause__, OSError)
    assert b.take_failure() is None


@pytest.mark.parametrize(
    ("option", "value"),
    [("interval", -1), ("max_batch", 0), ("max_pending", 1.5), ("max_batch", True)],
)
def test_batcher_refuses_bad_options(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        make_batcher(**{option: value})  # type: ignore[arg-type]


# -- the sync Publisher --------------------------------------------------------


def test_many_threads_few_transactions_nothing_lost(
    dsn: str, listener: pgcast.PubSub, unique_channel: str
) -> None:
    threads, per_thread = 8, 250
    handles: set[concurrent.futures.Future[None]] = set()
    lock = threading.Lock()
    with pgcast.Publisher(dsn, interval=0.005) as pub:
        barrier = threading.Barrier(threads)

        def work(t: int) -> None:
            barrier.wait(WAIT)
            mine = [pub.publish(unique_channel, f"{t}:{i}") for i in range(per_thread)]
            with lock:
                handles.update(mine)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(WAIT)
            assert not w.is_alive()
        pub.flush(timeout=WAIT)
        for h in handles:
            assert h.done() and h.result(0) is None
    got = collect(listener, threads * per_thread)
    payloads = [e.payload for e in got]
    assert sorted(payloads) == sorted(f"{t}:{i}" for t in range(threads) for i in range(per_thread))
    # One thread's notifications arrive in the order it published them.
    for t in range(threads):
        mine = [int(p.split(":")[1]) for p in payloads if p.startswith(f"{t}:")]
        assert mine == list(range(per_thread))
    # Each handle is one transaction: far fewer than one per notification.
    assert len(handles) <= threads * per_thread // 10
    nothing_more(listener)


def test_batch_goes_out_after_interval_without_flush(
    dsn: str, listener: pgcast.PubSub, unique_channel: str
) -> None:
    with pgcast.Publisher(dsn, interval=0.02) as pub:
        handle = pub.publish(unique_channel, {"id": 1})
        handle.result(WAIT)
        [event] = collect(listener, 1)
        assert event.json() == {"id": 1}


def test_identical_messages_in_one_batch_coalesce(
    dsn: str, listener: pgcast.PubSub, unique_channel: str
) -> None:
    with pgcast.Publisher(dsn, interval=60) as pub:
        for _ in range(5):
            pub.publish(unique_channel, "same")
        pub.publish(unique_channel, "end")
        pub.flush(WAIT)
    assert [e.payload for e in collect(listener, 2)] == ["same", "end"]
    nothing_more(listener)


def test_bad_messages_raise_in_the_caller_and_queue_nothing(
    dsn: str, listener: pgcast.PubSub, unique_channel: str
) -> None:
    with pgcast.Publisher(dsn, interval=60) as pub:
        with pytest.raises(pgcast.PayloadTooLargeError, match="8000"):
            pub.publish(unique_channel, "x" * 8000)
        with pytest.raises(pgcast.InvalidChannelError, match="63"):
            pub.publish("c" * 64, "x")
        assert pub.pending == 0
        pub.publish(unique_channel, "ok")
        pub.flush(WAIT)
    assert [e.payload for e in collect(listener, 1)] == ["ok"]


def test_full_buffer_raises_after_timeout_and_blocks_until_room(
    dsn: str, listener: pgcast.PubSub, unique_channel: str
) -> None:
    with pgcast.Publisher(dsn, interval=60, max_batch=1000, max_pending=3) as pub:
        for i in range(3):
            pub.publish(unique_channel, str(i))
        with pytest.raises(pgcast.PublisherFullError, match=r"3 unsent .*max_pending"):
            pub.publish(unique_channel, "now", timeout=0)
        start = time.monotonic()
        with pytest.raises(pgcast.PublisherFullError) as info:
            pub.publish(unique_channel, "later", timeout=0.2)
        assert info.value.limit == 3 and 0.2 <= time.monotonic() - start < WAIT

        # A publisher blocked on a full buffer goes on once a flush makes room.
        result: list[object] = []
        blocked = threading.Thread(
            target=lambda: result.append(pub.publish(unique_channel, "3", timeout=WAIT))
        )
        blocked.start()
        time.sleep(0.1)
        assert blocked.is_alive() and not result
        pub.flush(WAIT)
        blocked.join(WAIT)
        assert not blocked.is_alive() and len(result) == 1
    assert [e.payload for e in collect(listener, 4)] == ["0", "1", "2", "3"]


def test_close_sends_the_queue_then_refuses(
    dsn: str, listener: pgcast.PubSub, unique_channel: str
) -> None:
    pub = pgcast.Publisher(dsn, interval=60)
    handle = pub.publish(unique_channel, "queued")
    assert not handle.done()
    pub.close(timeout=WAIT)
    assert handle.result(0) is None
    assert pub.closed and "closed" in repr(pub)
    pub.close()  # idempotent
    with pytest.raises(pgcast.ClosedError):
        pub.publish(unique_channel, "late")
    assert [e.payload for e in collect(listener, 1)] == ["queued"]


def test_failed_transaction_is_reported_then_the_next_batch_reconnects(
    dsn: str, listener: pgcast.PubSub, unique_channel: str
) -> None:
    with TcpProxy.for_dsn(dsn) as proxy, \
            pgcast.Publisher(proxy.dsn(dsn), interval=0.005) as pub:
        pub.publish(unique_channel, "before")
        pub.flush(WAIT)
        before = swallow(proxy)
        lost = pub.publish(unique_channel, "lost")
        cut_when_sent(proxy, before)
        with pytest.raises(pgcast.PublishError) as info:
            pub.flush(WAIT)
        assert info.value.messages == [(unique_channel, "lost")]
        assert isinstance(info.value.__cause__, pgcast.ConnectionLostError)
        # Lost in flight: the commit may have happened; the error says so.
        assert "may or may not have been sent" in str(info.value)
        with pytest.raises(pgcast.PublishError):
            lost.result(0)
        # Reported once; the next batch goes out on a new connection.
        pub.publish(unique_channel, "after")
        pub.flush(WAIT)
    assert [e.payload for e in collect(listener, 2)] == ["before", "after"]


def test_unreachable_server_is_a_connect_error() -> None:
    with pytest.raises(pgcast.ConnectError, match="cannot connect") as raised:
        pgcast.Publisher("postgresql://postgres@127.0.0.1:1/postgres", connect_timeout=2)
    # what to do, as pgcast.connect() says it
    assert "check the host and port in the DSN" in str(raised.value)


def test_bad_options_are_refused(dsn: str) -> None:
    with pytest.raises(ValueError, match="max_pending"):
        pgcast.Publisher(dsn, max_pending=0)
    with pytest.raises(ValueError, match="timeout"):
        pgcast.Publisher(dsn, timeout=-1)


# -- AsyncPublisher --------------------------------------------------------------


def test_async_many_tasks_nothing_lost(
    dsn: str, listener: pgcast.PubSub, unique_channel: str
) -> None:
    tasks, per_task = 10, 100

    async def main() -> set[asyncio.Future[None]]:
        async with await pgcast.AsyncPublisher.connect(dsn, interval=0.005) as pub:

            async def work(t: int) -> list[asyncio.Future[None]]:
                out = []
                for i in range(per_task):
                    out.append(pub.publish_nowait(unique_channel, f"{t}:{i}"))
                    if i % 10 == 0:
                        await asyncio.sleep(0)
                return out

            async with asyncio.timeout(WAIT):
                results = await asyncio.gather(*(work(t) for t in range(tasks)))
                await pub.flush()
            handles = {h for r in results for h in r}
            for h in handles:
                assert h.done() and h.result() is None
            return handles

    handles = asyncio.run(main())
    got = collect(listener, tasks * per_task)
    payloads = [e.payload for e in got]
    for t in range(tasks):
        assert [p for p in payloads if p.startswith(f"{t}:")] == [
            f"{t}:{i}" for i in range(per_task)
        ]
    assert len(handles) <= tasks * per_task // 10
    nothing_more(listener)


def test_async_full_buffer_close_and_failure(
    dsn: str, listener: pgcast.PubSub, unique_channel: str, proxy: TcpProxy
) -> None:
    async def main() -> None:
        pub = await pgcast.AsyncPublisher.connect(proxy.dsn(dsn), interval=60, max_pending=2)
        async with asyncio.timeout(WAIT):
            pub.publish_nowait(unique_channel, "0")
            pub.publish_nowait(unique_channel, "1")
            with pytest.raises(pgcast.PublisherFullError, match="2 unsent"):
                await pub.publish(unique_channel, "2", timeout=0.1)
            with pytest.raises(pgcast.PublisherFullError, match="2 unsent"):
                pub.publish_nowait(unique_channel, "2")
            blocked = asyncio.create_task(pub.publish(unique_channel, "2", timeout=WAIT))
            await asyncio.sleep(0.05)
            assert not blocked.done()
            await pub.flush()
            await asyncio.sleep(0.05)  # room came free: "2" is queued
            assert not blocked.done()  # one await: it returns at the commit
            await pub.flush()
            assert await blocked is None
            before = swallow(proxy)
            lost = pub.publish_nowait(unique_channel, "lost")
            closing = asyncio.create_task(pub.close())
            await acut_when_sent(proxy, before)
            with pytest.raises(pgcast.PublishError) as info:
                await closing
            assert info.value.messages == [(unique_channel, "lost")]
            assert "may or may not have been sent" in str(info.value)
            with pytest.raises(pgcast.PublishError):
                await lost
            assert pub.closed
            with pytest.raises(pgcast.ClosedError):
                await pub.publish(unique_channel, "late")

    asyncio.run(main())
    assert [e.payload for e in collect(listener, 3)] == ["0", "1", "2"]
    nothing_more(listener)


def test_async_publish_is_one_await_that_ends_at_commit(
    dsn: str, listener: pgcast.PubSub, unique_channel: str, proxy: TcpProxy
) -> None:
    async def main() -> None:
        async with await pgcast.AsyncPublisher.connect(proxy.dsn(dsn), interval=0.005) as pub:
            async with asyncio.timeout(WAIT):
                assert await pub.publish(unique_channel, "committed") is None
                # Sent already: the listener gets it with no flush.
                assert [e.payload for e in collect(listener, 1)] == ["committed"]
                # A failed transaction raises at that same await.
                before = swallow(proxy)
                publishing = asyncio.create_task(pub.publish(unique_channel, "lost"))
                await acut_when_sent(proxy, before)
                with pytest.raises(pgcast.PublishError):
                    await publishing
                with pytest.raises(pgcast.PublishError):
                    await pub.flush()  # reported there too, once
                # A caller cancelled while waiting does not cancel the batch
                # the other callers wait on.
                waiting = [
                    asyncio.create_task(pub.publish(unique_channel, f"shared {i}"))
                    for i in range(3)
                ]
                await asyncio.sleep(0)
                waiting[0].cancel()
                results = await asyncio.gather(*waiting, return_exceptions=True)
                assert isinstance(results[0], asyncio.CancelledError)
                assert results[1:] == [None, None]

    asyncio.run(main())
    got = sorted(e.payload for e in collect(listener, 3))
    assert got == ["shared 0", "shared 1", "shared 2"]
    nothing_more(listener)


def test_an_unexpected_error_in_the_sender_fails_the_batch_not_loses_it(
    dsn: str, listener: pgcast.PubSub, unique_channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the statement builder raises once, as a bug would.
    import pgcast.publisher._publisher as publisher_module

    real = publisher_module.notify_many_params
    calls = [0]

    def broken_once(channels: list[str], payloads: list[str]) -> tuple[str, object]:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("injected fault")
        return real(channels, payloads)

    monkeypatch.setattr(publisher_module, "notify_many_params", broken_once)
    with pgcast.Publisher(dsn, interval=60) as pub:
        handle = pub.publish(unique_channel, "hit by the fault")
        with pytest.raises(pgcast.PublishError) as info:
            pub.flush(WAIT)
        assert info.value.messages == [(unique_channel, "hit by the fault")]
        with pytest.raises(pgcast.PublishError):
            handle.result(0)
        pub.publish(unique_channel, "after")  # the sender lives on
        pub.flush(WAIT)
    assert [e.payload for e in collect(listener, 1)] == ["after"]


# -- a connection the server ended while the publisher was idle -----------------


def end_idle_publisher(conn: psycopg.Connection[tuple[object, ...]], app: str) -> None:
    """End the publisher's backend (named *app*) and wait until it is gone, so
    that its FATAL message and EOF are on the publisher's socket."""
    row = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = %s", (app,),
    ).fetchone()
    assert row == (1,)
    deadline = time.monotonic() + WAIT
    while conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
    ).fetchone() != (0,):
        assert time.monotonic() < deadline, "the publisher's backend did not end"
        time.sleep(0.02)


def test_a_connection_ended_while_idle_loses_no_message(
    dsn: str, conn: psycopg.Connection[tuple[object, ...]], listener: pgcast.PubSub,
    unique_channel: str,
) -> None:
    # The first batch after the server ended the idle connection (an admin's
    # pg_terminate_backend, idle_session_timeout, a failover) used to fail
    # with PublishError though nothing of it had reached the server: the
    # ending is on the socket before the batch is sent, so it goes on a new
    # connection instead.
    app = f"pgcast_pub_{uuid.uuid4().hex[:8]}"
    with pgcast.Publisher(dsn, interval=0.005, application_name=app) as pub:
        pub.publish(unique_channel, "before").result(WAIT)
        end_idle_publisher(conn, app)
        assert pub.publish(unique_channel, "kept").result(WAIT) is None
        pub.flush(WAIT)
    assert [e.payload for e in collect(listener, 2)] == ["before", "kept"]


def test_async_a_connection_ended_while_idle_loses_no_message(
    dsn: str, conn: psycopg.Connection[tuple[object, ...]], listener: pgcast.PubSub,
    unique_channel: str,
) -> None:
    app = f"pgcast_apub_{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with await pgcast.AsyncPublisher.connect(
            dsn, interval=0.005, application_name=app
        ) as pub:
            async with asyncio.timeout(WAIT):
                await pub.publish(unique_channel, "before")
                end_idle_publisher(conn, app)
                assert await pub.publish(unique_channel, "kept") is None
                await pub.flush()

    asyncio.run(main())
    assert [e.payload for e in collect(listener, 2)] == ["before", "kept"]


# -- close() that times out ------------------------------------------------------


def test_close_that_times_out_fails_what_was_not_sent(
    dsn: str, listener: pgcast.PubSub, unique_channel: str, proxy: TcpProxy
) -> None:
    # The sender is stuck on a batch (a server that does not answer); close()
    # gives up after its timeout. The notifications still queued behind it
    # used to keep their handles pending for ever, nobody told: they now
    # fail with PublishError (and are in the next close()'s report).
    pub = pgcast.Publisher(proxy.dsn(dsn), interval=0.005, max_batch=1)
    try:
        before = swallow(proxy)
        stuck = pub.publish(unique_channel, "stuck")
        cut_when_sent(proxy, before, cut=False)
        queued = pub.publish(unique_channel, "queued")
        with pytest.raises(TimeoutError):
            pub.close(timeout=0.3)
        with pytest.raises(pgcast.PublishError) as info:
            queued.result(WAIT)
        assert info.value.messages == [(unique_channel, "queued")]
        assert isinstance(info.value.__cause__, pgcast.ClosedError)
        assert not stuck.done()  # in flight: whether it commits is the server's
    finally:
        proxy.cut()
        with pytest.raises(pgcast.PublishError) as report:
            pub.close(timeout=WAIT)
    assert sorted(report.value.messages) == [(unique_channel, "queued"), (unique_channel, "stuck")]
    with pytest.raises(pgcast.PublishError):
        stuck.result(0)


def test_async_close_that_times_out_fails_what_was_not_sent(
    dsn: str, listener: pgcast.PubSub, unique_channel: str, proxy: TcpProxy
) -> None:
    async def main() -> None:
        pub = await pgcast.AsyncPublisher.connect(proxy.dsn(dsn), interval=0.005, max_batch=1)
        try:
            before = swallow(proxy)
            stuck = pub.publish_nowait(unique_channel, "stuck")
            await acut_when_sent(proxy, before, cut=False)
            queued = pub.publish_nowait(unique_channel, "queued")
            with pytest.raises(TimeoutError):
                await pub.close(timeout=0.3)
            with pytest.raises(pgcast.PublishError) as info:
                await asyncio.wait_for(asyncio.shield(queued), WAIT)
            assert info.value.messages == [(unique_channel, "queued")]
            assert not stuck.done()
        finally:
            proxy.cut()
            with pytest.raises(pgcast.PublishError) as report:
                await pub.close(timeout=WAIT)
        expected = [(unique_channel, "queued"), (unique_channel, "stuck")]
        assert sorted(report.value.messages) == expected

    asyncio.run(main())


# -- the server's notification queue full ------------------------------------------

small_queue_server = _faults.small_queue_server  # a fixture


def test_a_full_notification_queue_fails_the_batch_clearly_and_the_publisher_goes_on(
    small_queue_server: EmbeddedServer, unique_channel: str
) -> None:
    # The batch was refused (54000): none of it was sent, and the error says
    # so; it used to say the connection was lost and the commit unknown.
    dsn = small_queue_server.dsn
    with pgcast.Publisher(dsn, interval=0.005) as pub:
        holder = _faults.fill_notify_queue(dsn)
        try:
            with pytest.raises(pgcast.PublishError) as info:
                pub.publish(unique_channel, "refused").result(WAIT)
            assert "none of its notifications was sent" in str(info.value)
            assert "too many notifications in the NOTIFY queue" in str(info.value)
            assert not isinstance(info.value.__cause__, pgcast.ConnectionLostError)
            with pytest.raises(pgcast.PublishError):
                pub.flush(WAIT)  # reported there too
        finally:
            holder.close()


def test_async_a_full_notification_queue_fails_the_batch_clearly(
    small_queue_server: EmbeddedServer, unique_channel: str
) -> None:
    dsn = small_queue_server.dsn

    async def main() -> None:
        async with await pgcast.AsyncPublisher.connect(dsn, interval=0.005) as pub:
            holder = _faults.fill_notify_queue(dsn)
            try:
                with pytest.raises(pgcast.PublishError) as info:
                    await asyncio.wait_for(pub.publish(unique_channel, "refused"), WAIT)
                assert "none of its notifications was sent" in str(info.value)
                assert "too many notifications in the NOTIFY queue" in str(info.value)
                with pytest.raises(pgcast.PublishError):
                    await pub.flush(WAIT)
            finally:
                holder.close()

    asyncio.run(main())


# -- a dead network ----------------------------------------------------------------


def conn_options(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> dict[str, str]:
    wanted = {b"keepalives", b"keepalives_idle", b"tcp_user_timeout"}
    return {o.keyword.decode(): (o.val or b"").decode() for o in conn.pgconn.info
            if o.keyword in wanted}


def test_the_publishers_connection_gives_up_on_a_dead_network_within_a_minute(
    dsn: str,
) -> None:
    # Without TCP keepalives and tcp_user_timeout, a batch sent into a dead
    # network waited for the kernel's retransmissions (about 15 minutes on
    # Linux), its publish() with it. The PubSub's defaults now; the DSN's win.
    with pgcast.Publisher(dsn) as pub:
        assert pub._conn is not None
        assert conn_options(pub._conn) == {
            "keepalives": "1", "keepalives_idle": "30", "tcp_user_timeout": "60000"}
    with pgcast.Publisher(dsn, tcp_user_timeout=5000) as pub:
        assert pub._conn is not None
        assert conn_options(pub._conn)["tcp_user_timeout"] == "5000"

    async def main() -> None:
        async with await pgcast.AsyncPublisher.connect(dsn) as apub:
            assert apub._conn is not None
            assert conn_options(apub._conn)["tcp_user_timeout"] == "60000"

    asyncio.run(main())


# -- a publish that cannot complete ------------------------------------------------


def test_async_publish_that_cannot_commit_ends_at_its_timeout_naming_it(
    dsn: str, listener: pgcast.PubSub, unique_channel: str, proxy: TcpProxy
) -> None:
    # The transaction carrying it is stuck (a network that swallows
    # everything): `await publish()` used to wait for it for ever (its
    # timeout only bounded the wait for room), where the sync publish()
    # returns within its timeout. The await now ends at the timeout (the
    # call's, else the publisher's), naming it and saying the notification
    # is not withdrawn; its fate is reported when the batch ends.
    async def main() -> None:
        pub = await pgcast.AsyncPublisher.connect(proxy.dsn(dsn), interval=0.005, timeout=0.5)
        try:
            async with asyncio.timeout(WAIT):
                before = swallow(proxy)
                with pytest.raises(TimeoutError) as info:
                    await pub.publish(unique_channel, "stuck")  # the publisher's 0.5 s
                message = str(info.value)
                assert "did not commit within 0.5 s" in message
                assert "timeout" in message and "may still be sent" in message
                with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
                    await pub.publish(unique_channel, "behind it", timeout=0.2)
                await acut_when_sent(proxy, before)
                # Told, not lost: the batch's fate comes with the next flush.
                with pytest.raises(pgcast.PublishError) as report:
                    await pub.flush()
                assert (unique_channel, "stuck") in report.value.messages
                assert await pub.publish(unique_channel, "after") is None
        finally:
            with contextlib.suppress(pgcast.PublishError):
                await pub.close(timeout=WAIT)

    asyncio.run(main())
    assert "after" in [e.payload for e in collect_until(listener, "after")]


@pytest.mark.parametrize("bad", [-1, "5", True])
def test_publish_refuses_a_bad_timeout_even_with_room(
    dsn: str, unique_channel: str, bad: object
) -> None:
    # A per-call timeout was only looked at once the buffer was full: a bad
    # one passed unnoticed until then (and -1 then raised 'full' at once).
    with pgcast.Publisher(dsn, interval=0.005) as pub:
        with pytest.raises((TypeError, ValueError), match="timeout"):
            pub.publish(unique_channel, "x", timeout=bad)  # type: ignore[arg-type]
        assert pub.pending == 0

    async def main() -> None:
        async with await pgcast.AsyncPublisher.connect(dsn, interval=0.005) as apub:
            with pytest.raises((TypeError, ValueError), match="timeout"):
                await apub.publish(unique_channel, "x", timeout=bad)  # type: ignore[arg-type]
            assert apub.pending == 0

    asyncio.run(main())


# -- several batches failing ---------------------------------------------------------


def fates(message: str) -> str:
    """What a failure's message says about its batch."""
    if "may or may not have been sent" in message:
        return "unknown"
    if "none of its notifications was sent" in message:
        return "not sent"
    return "?"


def test_several_failed_batches_fail_in_order_each_saying_its_fate(
    dsn: str, unique_channel: str, proxy: TcpProxy
) -> None:
    # One batch lost in flight (the commit unknown), two behind it refused a
    # connection (not sent): their handles fail in submission order, each
    # saying its fate, and flush()'s report lists them in that order. It
    # said "3 notifications were not sent", the one that may have been
    # sent among them.
    with pgcast.Publisher(proxy.dsn(dsn), interval=0.005, max_batch=1, connect_timeout=2) as pub:
        pub.publish(unique_channel, "warm").result(WAIT)
        order: list[str] = []
        before = swallow(proxy)
        handles = []
        for name in ("in flight", "refused 1", "refused 2"):
            handle = pub.publish(unique_channel, name)
            handle.add_done_callback(lambda _, name=name: order.append(name))  # type: ignore[misc]
            handles.append(handle)
        cut_when_sent(proxy, before, cut=False)
        proxy.refuse()
        proxy.cut()
        got = []
        for handle in handles:
            with pytest.raises(pgcast.PublishError) as info:
                handle.result(WAIT)
            got.append(fates(str(info.value)))
        assert got == ["unknown", "not sent", "not sent"]
        assert order == ["in flight", "refused 1", "refused 2"]
        with pytest.raises(pgcast.PublishError) as report:
            pub.flush(WAIT)
        assert [p for _, p in report.value.messages] == ["in flight", "refused 1", "refused 2"]
        summary = str(report.value)
        assert "3 notifications were not sent" not in summary
        assert "1 may or may not have been sent" in summary
        assert "2 were not sent" in summary


def test_close_that_times_out_reports_the_batches_in_submission_order(
    dsn: str, unique_channel: str, proxy: TcpProxy
) -> None:
    # The batch stuck in flight was reported after those queued behind it
    # (close() fails those first): the report's messages were out of the
    # order they were published in.
    pub = pgcast.Publisher(proxy.dsn(dsn), interval=0.005, max_batch=1)
    try:
        before = swallow(proxy)
        pub.publish(unique_channel, "stuck")
        cut_when_sent(proxy, before, cut=False)
        pub.publish(unique_channel, "queued 1")
        pub.publish(unique_channel, "queued 2")
        with pytest.raises(TimeoutError):
            pub.close(timeout=0.3)
    finally:
        proxy.cut()
        with pytest.raises(pgcast.PublishError) as report:
            pub.close(timeout=WAIT)
    assert [p for _, p in report.value.messages] == ["stuck", "queued 1", "queued 2"]
    assert "1 may or may not have been sent" in str(report.value)


def test_async_sender_cancelled_mid_send_fails_the_batch_in_flight(
    dsn: str, unique_channel: str, proxy: TcpProxy
) -> None:
    # The sender task cancelled (an event loop shutting its tasks down) while
    # a batch was in flight: the batches queued failed, but the one in
    # flight, already taken, kept its handle pending for ever and was in no
    # report. It now fails too, its fate unknown.
    async def main() -> None:
        pub = await pgcast.AsyncPublisher.connect(proxy.dsn(dsn), interval=0.005, max_batch=1)
        try:
            before = swallow(proxy)
            in_flight = pub.publish_nowait(unique_channel, "in flight")
            await acut_when_sent(proxy, before, cut=False)
            queued = pub.publish_nowait(unique_channel, "queued")
            pub._sender.cancel()
            for handle in (in_flight, queued):
                with pytest.raises(pgcast.PublishError):
                    await asyncio.wait_for(asyncio.shield(handle), WAIT)
            with pytest.raises(pgcast.PublishError) as info:
                await pub.flush(WAIT)
            assert [p for _, p in info.value.messages] == ["in flight", "queued"]
            assert "1 may or may not have been sent" in str(info.value)
        finally:
            proxy.cut()
            with contextlib.suppress(pgcast.PgcastError, asyncio.CancelledError):
                await pub.close(timeout=WAIT)

    asyncio.run(main())
