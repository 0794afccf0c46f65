"""The Worker's behaviour, the same in both flavours: written once for
``pgcast.aio.Worker``; tests/test_worker_loop.py, the same tests for the sync
``pgcast.Worker``, is generated from this file by tools/async_to_sync.py
(edit this one, then run the script).

In the asyncio tests the worker runs as a task next to the test body, in the
sync ones in a thread. *conn* is a plain sync psycopg connection in both
flavours: the application that sends and enqueues.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg.conninfo
import pytest

import pgcast
import pgcast.aio
from _eventwait import ajoin, apause, arun, astart
from pgcast._reconnect import RETRY_LOG_EVERY
from pgcast.queue import Job, Queue
from tcp_proxy import TcpProxy

Conn = psycopg.Connection[tuple[Any, ...]]
#: How long anything here may take before the test fails.
WAIT = 15.0


async def eventually(what: str, check: Callable[[], object]) -> None:
    """Wait until *check()* is true; fail loudly after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {WAIT} s")
        await apause(0.02)


def send(conn: Conn, channel: str, payloads: list[str]) -> None:
    """Notify *payloads* on *channel* in one transaction."""
    with conn.transaction():
        for p in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, p))


async def run_until(worker: pgcast.aio.Worker, body: Callable[[], Any]) -> None:
    """Run *worker* next to ``await body()``; stop it after, and check that
    ``run()`` returned (what it raised is raised here)."""
    runner = astart(worker.run)
    try:
        assert await worker.wait_ready(WAIT), "the worker did not start listening"
        await body()
    finally:
        worker.stop()
        await ajoin(runner, WAIT)


def start_until_it_gives_up(worker: pgcast.aio.Worker) -> tuple[Any, list[BaseException]]:
    """Run *worker* alongside the test body: its task, and the list that
    receives the ConnectError with which it gives up reconnecting."""
    errors: list[BaseException] = []

    async def target() -> None:
        try:
            await worker.run()
        except pgcast.ConnectError as exc:
            errors.append(exc)

    return astart(target), errors


def test_worker_repr_and_registration(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        worker = pgcast.aio.Worker(dsn)
        with pytest.raises(ValueError, match="no handler"):
            await worker.run()

        @worker.on(unique_channel)
        async def handle(events: list[pgcast.Event]) -> None:
            pass

        assert unique_channel in repr(worker)
        assert not worker.stopping

    arun(main())


def test_worker_batches_events_in_order_and_awaits_async_handlers(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    """Events sent together come as one batch, in order; a coroutine handler
    is awaited (on the program's loop for the asyncio Worker)."""

    async def main() -> None:
        batches: list[list[str]] = []
        worker = pgcast.aio.Worker(dsn, debounce=0.3)

        @worker.on(unique_channel)
        async def handle(events: list[pgcast.Event]) -> None:
            await apause(0)
            batches.append([e.payload for e in events])

        async def body() -> None:
            send(conn, unique_channel, [str(i) for i in range(50)])
            await eventually("a batch", lambda: batches)

        await run_until(worker, body)
        assert batches == [[str(i) for i in range(50)]]

    arun(main())


def test_worker_retries_then_hands_the_batch_to_on_error(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def main() -> None:
        calls: list[list[str]] = []
        failed: list[tuple[str, list[Any]]] = []
        worker = pgcast.aio.Worker(
            dsn,
            debounce=0,
            retry=pgcast.Retry(attempts=3, backoff=0.01),
            on_error=lambda exc, batch: failed.append((str(exc), list(batch))),
        )

        @worker.on(unique_channel)
        async def handle(events: list[pgcast.Event]) -> None:
            calls.append([e.payload for e in events])
            raise RuntimeError("handler broke")

        async def body() -> None:
            send(conn, unique_channel, ["x"])
            await eventually("on_error", lambda: failed)

        await run_until(worker, body)
        assert calls == [["x"], ["x"], ["x"]]
        assert failed[0][0] == "handler broke"
        assert [e.payload for e in failed[0][1]] == ["x"]

    arun(main())


def test_worker_drains_a_queue_and_keeps_failing_jobs_as_dead_letters(
    dsn: str, conn: Conn
) -> None:
    """Jobs enqueued before the start and while running are handled and
    deleted; the one that fails alone is kept as a dead letter."""
    queue = Queue("w" + uuid.uuid4().hex[:12])
    queue.install(conn)
    try:
        queue.enqueue_many(conn, [{"n": i} for i in range(5)])

        async def main() -> None:
            seen: list[Any] = []
            worker = pgcast.aio.Worker(dsn, retry=pgcast.Retry(attempts=1))

            @worker.on_queue(queue, batch_size=3)
            async def handle(jobs: list[Job]) -> None:
                numbers = [j.payload["n"] for j in jobs]
                if 6 in numbers:
                    raise ValueError("bad job")
                seen.extend(numbers)

            async def body() -> None:
                await eventually("the backlog", lambda: len(seen) == 5)
                queue.enqueue_many(conn, [{"n": 5}, {"n": 6}, {"n": 7}])
                await eventually("the new jobs", lambda: len(seen) == 7)
                await eventually("the dead letter", lambda: len(queue.failed(conn)) == 1)

            await run_until(worker, body)
            assert sorted(seen) == [0, 1, 2, 3, 4, 5, 7]

        arun(main())
        assert queue.pending(conn) == 0
        [(job, error)] = queue.failed(conn)
        assert job.payload == {"n": 6}
        assert error == "ValueError: bad job"
    finally:
        queue.uninstall(conn)


def test_worker_stop_delivers_batches_still_in_their_window(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    """A stop while a batch waits for its (long) window delivers it at once,
    then run() returns."""

    async def main() -> None:
        batches: list[list[str]] = []
        worker = pgcast.aio.Worker(dsn, debounce=60)

        @worker.on(unique_channel)
        def handle(events: list[pgcast.Event]) -> None:
            batches.append([e.payload for e in events])

        async def body() -> None:
            send(conn, unique_channel, ["a", "b"])
            # Received (the PubSub's side) but not delivered: the window is long.
            await apause(0.5)
            assert batches == []

        await run_until(worker, body)
        assert batches == [["a", "b"]]
        assert not worker.stopping

    arun(main())


def test_worker_reconnects_by_its_backoff_and_gives_up_when_it_ends(
    dsn: str, server: Any, unique_channel: str
) -> None:
    """With the server gone, the worker retries as its ``reconnect_backoff``
    says and, that policy having an end, stops with a ConnectError naming it."""

    async def main() -> None:
        worker = pgcast.aio.Worker(
            dsn, reconnect_backoff=pgcast.Backoff(initial=0.01, maximum=0.05, max_attempts=3))

        @worker.on(unique_channel)
        async def handle(events: list[pgcast.Event]) -> None:
            pass

        runner, errors = start_until_it_gives_up(worker)
        assert await worker.wait_ready(WAIT)
        server.stop()
        await ajoin(runner, timeout=WAIT * 2)
        assert errors, "the worker did not give up"
        assert "gave up reconnecting after 3 attempt(s) (reconnect_backoff)" in str(errors[0])

    arun(main())


@pytest.mark.parametrize("initial", [0.05, 0.0], ids=["backoff", "no-delay"])
def test_worker_stop_during_an_outage_returns_at_once(dsn: str, initial: float) -> None:
    """A stop while the database is down ends run() at once, gracefully.
    It used to wait until the PubSub's own reconnect gave up (never, with the
    default Backoff: a SIGTERM hung the worker for the whole outage); with
    no delay between attempts the asyncio one froze the event loop."""
    backoff = pgcast.Backoff(initial=initial, maximum=initial * 4, max_time=6.0)

    async def main() -> None:
        with TcpProxy.for_dsn(dsn) as proxy:
            worker = pgcast.aio.Worker(proxy.dsn(dsn), reconnect_backoff=backoff)

            @worker.on(f"w_{uuid.uuid4().hex[:12]}")
            async def handle(events: list[pgcast.Event]) -> None:
                pass

            outcome: list[object] = []

            async def target() -> None:
                try:
                    await worker.run()
                    outcome.append("returned")
                except pgcast.PgcastError as exc:
                    outcome.append(exc)

            runner = astart(target)
            assert await worker.wait_ready(WAIT), "the worker did not start listening"
            proxy.refuse()  # the database is down: every attempt is refused
            proxy.cut()
            await apause(0.5)  # the worker retries meanwhile
            started = time.monotonic()
            worker.stop()
            await ajoin(runner, WAIT)
            took = time.monotonic() - started
            assert outcome == ["returned"], outcome
            assert took < 2.0, f"run() returned {took:.1f} s after stop()"

    arun(main())


def test_worker_notification_routes_go_on_after_a_termination(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    """The worker's listening connection ended by the server: the worker
    reconnects, LISTENs again, and what is sent after reaches the handler."""
    name = f"w_{uuid.uuid4().hex[:12]}"

    async def main() -> None:
        got: list[str] = []
        worker = pgcast.aio.Worker(dsn, debounce=0, name=name)

        @worker.on(unique_channel)
        async def handle(events: list[pgcast.Event]) -> None:
            got.extend([e.payload for e in events])

        async def body() -> None:
            send(conn, unique_channel, ["before"])
            await eventually("the first event handled", lambda: got == ["before"])
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s", (name,)).fetchone()
            assert killed == (1,)
            deadline = time.monotonic() + WAIT
            i = 0
            while "after" not in " ".join(got):  # sent until the new LISTEN hears it
                assert time.monotonic() < deadline, f"nothing after the termination: {got}"
                i += 1
                send(conn, unique_channel, [f"after {i}"])
                await apause(0.1)

        await run_until(worker, body)

    arun(main())


def test_worker_that_gives_up_reconnecting_still_delivers_what_it_received(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    """Notifications received and waiting for their window when the worker
    gives up reconnecting (ConnectError out of run()) reach the handler
    first; they used to vanish with the worker, no handler, no on_error."""

    async def main() -> None:
        with TcpProxy.for_dsn(dsn) as proxy:
            batches: list[list[str]] = []
            worker = pgcast.aio.Worker(
                proxy.dsn(dsn), debounce=60,
                reconnect_backoff=pgcast.Backoff(initial=0.01, maximum=0.05, max_attempts=2))

            @worker.on(unique_channel)
            def handle(events: list[pgcast.Event]) -> None:
                batches.append([e.payload for e in events])

            runner, errors = start_until_it_gives_up(worker)
            assert await worker.wait_ready(WAIT), "the worker did not start listening"
            send(conn, unique_channel, ["a", "b"])
            await apause(0.5)  # received, waiting for its 60 s window
            assert batches == []
            proxy.refuse()
            proxy.cut()
            await ajoin(runner, WAIT)
            assert errors, "the worker did not give up"
            assert batches == [["a", "b"]]

    arun(main())


def test_worker_stop_from_another_thread_wakes_it_safely(dsn: str, unique_channel: str) -> None:
    """stop() from a thread that is not the worker's: the asyncio Worker's
    wait was ended by completing the event loop's future from that thread
    (not thread safe: asyncio's debug mode raises 'Non-thread-safe operation'
    in the stopping thread); it now goes through call_soon_threadsafe."""

    async def main() -> None:
        if True:  # ASYNC
            import asyncio

            asyncio.get_running_loop().set_debug(True)  # checks the thread of each call
        worker = pgcast.aio.Worker(dsn)

        @worker.on(unique_channel)
        async def handle(events: list[pgcast.Event]) -> None:
            pass

        runner = astart(worker.run)
        assert await worker.wait_ready(WAIT), "the worker did not start listening"
        await apause(0.3)  # idle: waiting on its socket
        errors: list[BaseException] = []

        def stop() -> None:
            try:
                worker.stop()
            except BaseException as exc:  # what the stopping thread met
                errors.append(exc)

        stopper = threading.Thread(target=stop)
        stopper.start()
        stopper.join(WAIT)
        assert not stopper.is_alive(), "stop() did not return"
        await ajoin(runner, WAIT)
        assert errors == []
        assert not worker.stopping

    arun(main())


KEEPALIVE_KEYS = ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                  "tcp_user_timeout")


def keepalive_settings(conn: Any) -> dict[str, str]:
    """libpq's keepalive settings of *conn* (a psycopg connection), as opened."""
    return {o.keyword.decode(): (o.val or b"").decode() for o in conn.pgconn.info
            if o.keyword.decode() in KEEPALIVE_KEYS}


def test_worker_queue_connection_has_the_pubsubs_keepalives(dsn: str, conn: Conn) -> None:
    """The connection that drains the queue tables had no TCP keepalives nor
    tcp_user_timeout: a claim or a delete sent into a dead network waited for
    the kernel (about 15 minutes on Linux), the worker with it. It now has
    those of the worker's PubSub (the health check's); the DSN's own win."""
    queue = Queue("k" + uuid.uuid4().hex[:12])
    queue.install(conn)

    async def main(worker_dsn: str, want_timeout: str) -> None:
        worker = pgcast.aio.Worker(worker_dsn)

        @worker.on_queue(queue)
        async def handle(jobs: list[Job]) -> None:
            pass

        async def body() -> None:
            assert worker._work is not None and worker._pubsub is not None
            settings = keepalive_settings(worker._work)
            assert settings == keepalive_settings(worker._pubsub.connection)
            assert settings["keepalives"] == "1"
            assert settings["tcp_user_timeout"] == want_timeout

        await run_until(worker, body)
        assert worker._work is None  # closed with the session

    try:
        arun(main(dsn, "60000"))
        arun(main(psycopg.conninfo.make_conninfo(dsn, tcp_user_timeout=5000), "5000"))
    finally:
        queue.uninstall(conn)


def test_worker_statement_timeout_on_a_queue_keeps_the_session_and_retries(
    dsn: str, conn: Conn, unique_channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server cancels the claim (statement_timeout, the queue table
    locked by someone else): the worker said it 'lost its connection' and
    restarted its whole session, LISTEN connection included, again and again
    (notifications sent meanwhile were lost). Now the batch's transaction is
    rolled back, the error says what the server did, the queue is retried
    after a backoff, and the session (its LISTEN) goes on."""
    queue = Queue("s" + uuid.uuid4().hex[:12])
    queue.install(conn)
    queue.enqueue_many(conn, [1, 2])
    worker_dsn = psycopg.conninfo.make_conninfo(dsn, options="-c statement_timeout=200")
    locker = psycopg.connect(dsn)
    try:
        async def main() -> None:
            jobs_seen: list[Any] = []
            events: list[str] = []
            worker = pgcast.aio.Worker(worker_dsn, debounce=0,
                                       retry=pgcast.Retry(attempts=1, backoff=0.05))

            @worker.on_queue(queue)
            async def handle(jobs: list[Job]) -> None:
                jobs_seen.extend([j.payload for j in jobs])

            @worker.on(unique_channel)
            async def note(batch: list[pgcast.Event]) -> None:
                events.extend([e.payload for e in batch])

            async def body() -> None:
                await eventually("the backlog", lambda: jobs_seen == [1, 2])
                assert worker._pubsub is not None
                pid = worker._pubsub.backend_pid
                # Another transaction queues a job and holds the table.
                queue.enqueue_many(locker, [3])
                locker.execute(f"LOCK TABLE pgcast.{queue.table} IN EXCLUSIVE MODE")
                conn.execute("SELECT pg_notify(%s, '')", (queue.channel,))  # a wake-up
                await eventually("a cancelled claim", lambda: [
                    r for r in caplog.records if "statement timeout" in r.getMessage()])
                send(conn, unique_channel, ["while blocked"])
                await eventually("the event", lambda: events == ["while blocked"])
                locker.commit()
                await eventually("the job after the lock", lambda: jobs_seen == [1, 2, 3])
                assert worker._pubsub is not None and worker._pubsub.backend_pid == pid

            await run_until(worker, body)

        with caplog.at_level("WARNING", logger="pgcast"):
            arun(main())
        messages = [r.getMessage() for r in caplog.records if r.name == "pgcast.worker"]
        assert not [m for m in messages if "lost its connection" in m], messages
        cancelled = [m for m in messages if "statement timeout" in m]
        assert "rolled back" in cancelled[0] and "retrying" in cancelled[0], cancelled[0]
        assert queue.pending(conn) == 0
    finally:
        locker.close()
        queue.uninstall(conn)


def test_worker_idle_in_transaction_timeout_during_a_handler_is_survived(
    dsn: str, conn: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that runs longer than idle_in_transaction_session_timeout:
    the server ends the queue connection, and the worker's run() died of
    psycopg's IdleInTransactionSessionTimeout (not an OperationalError).
    Now the error names the setting, the jobs (rolled back, none lost) run
    again on a new connection, and the worker goes on."""
    queue = Queue("i" + uuid.uuid4().hex[:12])
    queue.install(conn)
    queue.enqueue_many(conn, [1, 2])
    worker_dsn = psycopg.conninfo.make_conninfo(
        dsn, options="-c idle_in_transaction_session_timeout=300")
    try:
        async def main() -> None:
            calls: list[list[Any]] = []
            worker = pgcast.aio.Worker(
                worker_dsn, reconnect_backoff=pgcast.Backoff(initial=0.05, maximum=0.2))

            @worker.on_queue(queue)
            async def handle(jobs: list[Job]) -> None:
                calls.append([j.payload for j in jobs])
                if len(calls) == 1:
                    await apause(1.0)  # longer than the server lets a transaction idle

            async def body() -> None:
                await eventually("the second call", lambda: len(calls) == 2)
                await eventually("the jobs done", lambda: queue.pending(conn) == 0)

            await run_until(worker, body)
            assert calls == [[1, 2], [1, 2]]

        with caplog.at_level("WARNING", logger="pgcast"):
            arun(main())
        messages = [r.getMessage() for r in caplog.records if r.name == "pgcast.worker"]
        assert [m for m in messages if "idle_in_transaction_session_timeout" in m
                and "2 jobs" in m and "rolled back" in m], messages
    finally:
        queue.uninstall(conn)


def test_worker_reconnect_with_no_delay_does_not_flood_the_log(
    dsn: str, unique_channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Backoff(initial=0) against a refusing server: the worker logged a
    warning per attempt (hundreds a second). Now the loss, then a summary at
    most every RETRY_LOG_EVERY seconds; the count is in the final error."""
    backoff = pgcast.Backoff(initial=0, maximum=0, max_time=1.0)

    async def main() -> None:
        with TcpProxy.for_dsn(dsn) as proxy:
            worker = pgcast.aio.Worker(proxy.dsn(dsn), reconnect_backoff=backoff)

            @worker.on(unique_channel)
            async def handle(events: list[pgcast.Event]) -> None:
                pass

            runner, errors = start_until_it_gives_up(worker)
            assert await worker.wait_ready(WAIT), "the worker did not start listening"
            proxy.refuse()
            proxy.cut()
            started = time.monotonic()
            await ajoin(runner, WAIT)
            took = time.monotonic() - started
            assert errors, "the worker did not give up"
            found = re.search(r"after (\d+) attempt", str(errors[0]))
            assert found, str(errors[0])
            attempts = int(found.group(1))
            assert attempts >= 20, f"only {attempts} attempts: the flood was not tested"
            records = [r for r in caplog.records if r.name == "pgcast.worker"]
            assert 1 <= len(records) <= 2 + took / RETRY_LOG_EVERY, [
                r.getMessage() for r in records[:5]]

    with caplog.at_level("WARNING", logger="pgcast"):
        arun(main())


if True:  # ASYNC

    def test_worker_cancelled_hands_what_it_received_to_on_error(
        dsn: str, conn: Conn, unique_channel: str
    ) -> None:
        """The asyncio Worker's task cancelled (an application shutting down
        its tasks) while a batch waits for its window: the batch vanished,
        no handler, no on_error, no log. It now goes to on_error, saying so."""
        import asyncio

        async def main() -> None:
            failed: list[tuple[BaseException, list[Any]]] = []
            worker = pgcast.aio.Worker(
                dsn, debounce=60, on_error=lambda exc, batch: failed.append((exc, batch)))

            @worker.on(unique_channel)
            async def handle(events: list[pgcast.Event]) -> None:
                pass

            runner = asyncio.get_running_loop().create_task(worker.run())
            assert await worker.wait_ready(WAIT), "the worker did not start listening"
            send(conn, unique_channel, ["a", "b"])
            await eventually("received", lambda: bool(worker._coalescer))
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(runner, WAIT)
            [(exc, batch)] = failed
            assert [e.payload for e in batch] == ["a", "b"]
            assert "CancelledError ended run()" in str(exc)
            assert "received and not handled" in str(exc)

        arun(main())
