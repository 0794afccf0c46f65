"""Queue tables (:mod:`pgcast.queue`) and the workers that drain them.

Each test proves a sentence of issue 5: jobs are enqueued in the user's
transaction; NOTIFY only wakes the workers; rows are claimed with ``FOR UPDATE
SKIP LOCKED`` so two workers share the work and process each row exactly
once; a worker that starts late drains the backlog; a crash or SIGTERM loses
nothing; a job that keeps failing is kept as a dead letter, not lost and not
retried forever.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import pgcast
import pgcast.aio
from _eventwait import collect, collect_until
from pgcast.queue import Job, Queue

Conn = psycopg.Connection[tuple[Any, ...]]
TESTS = pathlib.Path(__file__).parent
WAIT = 60.0


@pytest.fixture
def queue(conn: Conn) -> Iterator[Queue]:
    q = Queue(f"test_{uuid.uuid4().hex[:12]}")
    q.install(conn)
    yield q
    q.uninstall(conn)


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll *check* (a database count, a log file) until true; fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {timeout} s")


def ids_in_table(conn: Conn, q: Queue) -> list[int]:
    return [r[0] for r in conn.execute(
        psycopg.sql.SQL("SELECT id FROM {} ORDER BY id").format(
            psycopg.sql.Identifier(q.schema, q.table)))]


# -- the table -------------------------------------------------------------------


def test_names_are_checked_and_derived() -> None:
    q = Queue("ports_cache_clearing")
    assert (q.schema, q.table, q.channel) == (
        "pgcast", "queue_ports_cache_clearing", "pgcast_queue_ports_cache_clearing")
    assert len(Queue("a" * 48).channel.encode()) <= pgcast.MAX_CHANNEL_BYTES
    for bad in ("", "A", "1st", "x-y", "a" * 49, 'x"; DROP TABLE y; --'):
        with pytest.raises(pgcast.QueueError, match="queue name"):
            Queue(bad)
    assert Queue("x") == Queue("x") and Queue("x") != Queue("x", schema="other")


def test_enqueue_joins_the_callers_transaction(conn: Conn, queue: Queue) -> None:
    queue.install(conn)  # idempotent
    with pytest.raises(RuntimeError), conn.transaction():
        queue.enqueue(conn, {"port": "www/nginx"})
        raise RuntimeError("roll back")
    assert queue.pending(conn) == 0
    with conn.transaction():
        first = queue.enqueue(conn, {"port": "www/nginx"})
        more = queue.enqueue_many(conn, [1, "two", None, {"big": "x" * 100_000}])
    assert more == sorted(more) and first < more[0]
    assert queue.pending(conn) == 5
    with conn.transaction():
        jobs = queue.claim(conn, 10)
    assert [j.payload for j in jobs[:4]] == [{"port": "www/nginx"}, 1, "two", None]
    assert len(jobs[4].payload["big"]) == 100_000  # jobs never travel through NOTIFY
    with pytest.raises(pgcast.QueueError, match="JSON"):
        queue.enqueue(conn, {"nan": float("nan")})
    with pytest.raises(pgcast.QueueError, match="JSON"):
        queue.enqueue(conn, object())


def test_any_insert_wakes_workers_once_per_transaction(
    dsn: str, conn: Conn, queue: Queue
) -> None:
    with pgcast.connect(dsn) as ps:
        ps.listen(queue.channel)
        with conn.transaction():
            queue.enqueue_many(conn, range(100))
            queue.enqueue(conn, "one more")
        # Plain SQL, as a trigger on the application's table would do it.
        conn.execute(psycopg.sql.SQL("INSERT INTO {} (payload) VALUES ('{{\"sql\": 1}}')").format(
            psycopg.sql.Identifier(queue.schema, queue.table)))
        assert [e.payload for e in collect(ps, 2)] == ["", ""]
        conn.execute("SELECT pg_notify(%s, 'sentinel')", (queue.channel,))
        assert [e.payload for e in collect_until(ps, "sentinel")] == ["sentinel"]
    assert queue.pending(conn) == 102


def test_claims_skip_rows_locked_by_another_transaction(
    dsn: str, conn: Conn, queue: Queue
) -> None:
    queue.enqueue_many(conn, range(10))
    with psycopg.connect(dsn, autocommit=True) as other:
        with conn.transaction(), other.transaction():
            mine = queue.claim(conn, 6)
            theirs = queue.claim(other, 6)
            assert len(mine) == 6 and len(theirs) == 4
            assert not {j.id for j in mine} & {j.id for j in theirs}
            queue.complete(other, theirs)
        assert queue.pending(conn) == 6  # `mine` were not completed: still queued


def test_install_when_installed_waits_for_no_lock(dsn: str, conn: Conn, queue: Queue) -> None:
    queue.enqueue(conn, "busy")
    with psycopg.connect(dsn, autocommit=True) as other, other.transaction():
        queue.complete(other, queue.claim(other, 1))  # a worker mid-batch, not committed
        conn.execute("SET lock_timeout = '500ms'")
        try:
            queue.install(conn)  # would wait for `other` if it re-created the trigger
            assert queue.installed(conn)
        finally:
            conn.execute("RESET lock_timeout")


# -- workers -----------------------------------------------------------------------


def test_two_workers_process_each_of_2000_rows_exactly_once(
    dsn: str, conn: Conn, queue: Queue
) -> None:
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()
    workers = []
    for name in ("a", "b"):
        worker = pgcast.Worker(dsn)

        @worker.on_queue(queue, batch_size=20)
        def handle(jobs: list[Job], name: str = name) -> None:
            time.sleep(0.002)  # some work, so the other worker gets its turn
            with lock:
                seen.extend((name, j.id) for j in jobs)

        workers.append(worker)
    expected = queue.enqueue_many(conn, range(500))  # a backlog...
    threads = [w.run_in_thread() for w in workers]
    try:
        for w in workers:
            assert w.wait_ready(WAIT)
        for start in range(500, 2000, 100):  # ...and jobs arriving while they run
            expected += queue.enqueue_many(conn, range(start, start + 100))
        wait_for("all 2000 jobs processed", lambda: queue.pending(conn) == 0)
    finally:
        for t in threads:
            t.stop()
    ids = sorted(i for _, i in seen)
    assert ids == sorted(expected)  # every row, none twice
    assert {name for name, _ in seen} == {"a", "b"}  # and the work was shared


def test_a_worker_started_after_rows_were_queued_processes_them(
    dsn: str, conn: Conn, queue: Queue
) -> None:
    expected = queue.enqueue_many(conn, [{"n": i} for i in range(50)])
    got: list[int] = []
    worker = pgcast.Worker(dsn)

    @worker.on_queue(queue.name, batch_size=7)
    async def handle(jobs: list[Job]) -> None:  # async handlers work too
        got.extend(j.id for j in jobs)

    thread = worker.run_in_thread()
    try:
        assert worker.wait_ready(WAIT)  # ready means: the backlog is drained
        assert got == expected and queue.pending(conn) == 0
    finally:
        thread.stop()


def test_a_failing_job_becomes_a_dead_letter_and_the_rest_of_its_batch_completes(
    dsn: str, conn: Conn, queue: Queue
) -> None:
    ids = queue.enqueue_many(conn, ["ok", "poison", "ok"])
    calls: list[list[Any]] = []
    failures: list[tuple[BaseException, list[Any]]] = []
    worker = pgcast.Worker(dsn, retry=pgcast.Retry(attempts=2, backoff=0.01),
                           on_error=lambda exc, batch: failures.append((exc, batch)))

    @worker.on_queue(queue, batch_size=10)
    def handle(jobs: list[Job]) -> None:
        calls.append([j.payload for j in jobs])
        if any(j.payload == "poison" for j in jobs):
            raise ValueError("cannot digest poison")

    thread = worker.run_in_thread()
    try:
        assert worker.wait_ready(WAIT)
    finally:
        thread.stop()
    # Twice as a batch (the retry policy), then each job alone, once.
    assert calls == [["ok", "poison", "ok"]] * 2 + [["ok"], ["poison"], ["ok"]]
    assert queue.pending(conn) == 0
    ((job, error),) = queue.failed(conn)
    assert job.id == ids[1] and job.attempts == 2 and "cannot digest poison" in error
    ((exc, batch),) = failures
    assert isinstance(exc, ValueError) and [j.id for j in batch] == [ids[1]]

    assert queue.retry_failed(conn) == 1  # back in line, for a fixed handler
    assert queue.failed(conn) == [] and queue.pending(conn) == 1


def test_a_worker_reconnects_and_drains_what_was_queued_meanwhile(
    dsn: str, conn: Conn, queue: Queue
) -> None:
    got: list[int] = []
    worker = pgcast.Worker(dsn, name=queue.name)

    @worker.on_queue(queue)
    def handle(jobs: list[Job]) -> None:
        got.extend(j.id for j in jobs)

    thread = worker.run_in_thread()
    try:
        assert worker.wait_ready(WAIT)
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s", (queue.name,),
        ).fetchone()
        assert killed == (2,)  # the listening and the working connection
        expected = queue.enqueue_many(conn, range(5))
        wait_for("jobs drained after the reconnect", lambda: sorted(got) == expected)
    finally:
        thread.stop()


# -- processes: crash and SIGTERM ------------------------------------------------------


def start_worker_process(dsn: str, q: Queue, log: pathlib.Path, slow: float,
                         batch: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PGCAST_TEST_QUEUE=q.name, PGCAST_TEST_LOG=str(log),
               PGCAST_TEST_SLOW=str(slow), PGCAST_TEST_BATCH=str(batch))
    return subprocess.Popen(
        [sys.executable, "-m", "pgcast.cli", "worker", "_queue_worker_app:worker", "--dsn", dsn],
        cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill *proc* if it still runs, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=WAIT)


def log_lines(log: pathlib.Path) -> list[tuple[str, list[int]]]:
    if not log.exists():
        return []
    return [(word, json.loads(ids)) for word, ids in
            (line.split(" ", 1) for line in log.read_text().splitlines())]


def test_sigterm_during_a_batch_finishes_it_and_leaves_the_rest_queued(
    dsn: str, conn: Conn, queue: Queue, tmp_path: pathlib.Path
) -> None:
    expected = queue.enqueue_many(conn, range(50))
    log = tmp_path / "batches.log"
    proc = start_worker_process(dsn, queue, log, slow=1.5, batch=10)
    try:
        wait_for("the first batch to start", lambda: bool(log_lines(log)))
        proc.send_signal(signal.SIGTERM)  # in the middle of the slow handler
        _, stderr = proc.communicate(timeout=WAIT)
    finally:
        reap(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    lines = log_lines(log)
    started = [ids for word, ids in lines if word == "start"]
    done = [ids for word, ids in lines if word == "done"]
    assert started == done == [expected[:10]]  # the batch in hand finished, no new one began
    assert ids_in_table(conn, queue) == expected[10:]  # done is deleted, the rest waits


def test_a_killed_worker_leaves_its_batch_for_another_worker(
    dsn: str, conn: Conn, queue: Queue, tmp_path: pathlib.Path
) -> None:
    expected = queue.enqueue_many(conn, range(30))
    log = tmp_path / "batches.log"
    proc = start_worker_process(dsn, queue, log, slow=30, batch=10)
    try:
        wait_for("the first batch to start", lambda: bool(log_lines(log)))
        proc.kill()  # a crash in the middle of the batch
        proc.communicate(timeout=WAIT)
    finally:
        reap(proc)
    assert log_lines(log) == [("start", expected[:10])]
    got: list[int] = []
    # Polling often: the dead backend may hold its row locks for a moment.
    worker = pgcast.Worker(dsn, poll_interval=0.5)

    @worker.on_queue(queue, batch_size=10)
    def handle(jobs: list[Job]) -> None:
        got.extend(j.id for j in jobs)

    thread = worker.run_in_thread()
    try:
        # The dead backend's locks go when the server notices; then all is drained.
        wait_for("every job processed by the second worker", lambda: sorted(got) == expected)
    finally:
        thread.stop()
    assert queue.pending(conn) == 0


# -- asyncio: a worker cancelled mid-job --------------------------------------------


def test_an_async_worker_cancelled_mid_job_leaves_the_job_queued(
    dsn: str, conn: Conn, queue: Queue
) -> None:
    # Cancelling the task that runs the worker (a shutdown) while a handler
    # works: the claim rolls back, the job stays queued (not a dead letter,
    # not gone) for the next worker.
    started = threading.Event()

    async def main() -> None:
        worker = pgcast.aio.Worker(dsn)

        @worker.on_queue(queue)
        async def handle(jobs: list[Job]) -> None:
            started.set()
            await asyncio.sleep(WAIT)

        task = asyncio.create_task(worker.run())
        assert await worker.wait_ready(WAIT)
        queue.enqueue(conn, {"n": 1})
        async with asyncio.timeout(WAIT):
            while not started.is_set():
                await asyncio.sleep(0.02)
        task.cancel()
        async with asyncio.timeout(WAIT):
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert queue.pending(conn) == 1
    assert queue.failed(conn) == []
