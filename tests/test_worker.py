"""pgcast.Worker on notification channels, against real PostgreSQL.

Each test proves a sentence of issue 5 about workers: handlers get batches
(coalescing, with a configurable debounce window and batch size), sync and
async handlers, errors logged with the events and retried by a policy, then
handed to ``on_error``; ``run()`` blocks until ``stop()`` from another thread
or a signal, and a graceful stop finishes the batch in hand. Queue tables
and the SIGTERM/kill tests of ``pgcast worker`` are in test_queue.py.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgcast
from pgcast.worker import Coalescer, Retry, Worker

Conn = psycopg.Connection[tuple[Any, ...]]
WAIT = 30.0


def send(conn: Conn, channel: str, payloads: list[str]) -> None:
    """Notify every payload in one transaction: they arrive together, in order."""
    with conn.transaction():
        for p in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, p))


def wait_until(what: str, check: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    pytest.fail(f"{what}: not within {timeout} s")


@pytest.fixture
def started() -> Iterator[list[pgcast.worker.WorkerThread]]:
    """Workers a test starts (append the thread); stopped afterwards whatever happened."""
    threads: list[pgcast.worker.WorkerThread] = []
    yield threads
    for t in threads:
        if t.is_alive():
            t.stop(WAIT)


def start(worker: Worker, threads: list[pgcast.worker.WorkerThread]) -> None:
    threads.append(worker.run_in_thread())
    assert worker.wait_ready(WAIT), "the worker did not start listening"


# -- pure ------------------------------------------------------------------------


class _R:
    def __init__(self, debounce: float, max_batch: int) -> None:
        self.debounce, self.max_batch = debounce, max_batch


def ev(n: int) -> pgcast.Event:
    return pgcast.Event("c", str(n), 1)


def test_coalescer_windows_open_at_the_first_event_and_cap_batches() -> None:
    slow, small = _R(1.0, 100), _R(5.0, 3)
    c = Coalescer()
    assert c.due_in(0.0) is None and not c
    c.add(slow, ev(1), now=10.0)
    c.add(slow, ev(2), now=10.6)  # joins the open window; does not extend it
    assert c.due_in(10.6) == pytest.approx(0.4)
    assert c.take_due(10.9) == []
    assert c.take_due(11.0) == [(slow, [ev(1), ev(2)])]
    for n in range(7):
        c.add(small, ev(n), now=20.0)
    assert c.due_in(20.0) == 0.0  # full: due at once, long before its window ends
    assert c.take_due(20.0) == [(small, [ev(0), ev(1), ev(2)])]
    assert c.take_due(20.0) == [(small, [ev(3), ev(4), ev(5)])]
    assert c.due_in(20.0) == pytest.approx(5.0)  # the remainder opened a new window
    assert c.take_due(20.0, everything=True) == [(small, [ev(6)])]
    assert not c


def test_retry_policy_delays_and_validation() -> None:
    r = Retry(attempts=5, backoff=pgcast.Backoff(initial=0.5, maximum=3, jitter=False))
    assert [r.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    for bad in ({"attempts": 0}, {"attempts": True}, {"backoff": -1}, {"backoff": "1"},
                {"backoff": None}):
        with pytest.raises((ValueError, TypeError)):
            Retry(**bad)


def test_retry_uses_the_one_backoff_policy() -> None:
    """Retry's delays are a pgcast.Backoff's: full jitter below the cap by
    default; a number is the Backoff's initial delay; a Backoff that would
    end by itself is refused (Retry counts its calls)."""
    default = Retry()
    assert default.policy == pgcast.Backoff(initial=0.5, maximum=30.0)
    assert [default.delay(n, rand=lambda: 0.5) for n in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert default.delay(20, rand=lambda: 0.999) <= 30.0
    short = Retry(attempts=2, backoff=0.01)
    assert short.policy == pgcast.Backoff(initial=0.01, maximum=30.0)
    assert 0 <= short.delay(1) <= 0.01
    with pytest.raises(ValueError, match="max_attempts or max_time"):
        Retry(backoff=pgcast.Backoff(max_attempts=3))
    with pytest.raises(ValueError, match="max_attempts or max_time"):
        Retry(backoff=pgcast.Backoff(max_time=10))


def test_bad_arguments_are_refused_before_running(dsn: str) -> None:
    with pytest.raises(ValueError, match="no handler"):
        Worker(dsn).run()
    with pytest.raises(ValueError, match="debounce"):
        Worker(dsn, debounce=-1)
    with pytest.raises(ValueError, match="max_batch"):
        Worker(dsn, max_batch=0)
    with pytest.raises(TypeError, match=r"reconnect_backoff must be a pgcast\.Backoff"):
        Worker(dsn, reconnect_backoff=5)  # type: ignore[arg-type]
    with pytest.raises(pgcast.InvalidChannelError):
        Worker(dsn).on("c" * 64)
    with pytest.raises(TypeError, match="callable"):
        Worker(dsn).on("c")(42)  # type: ignore[type-var]
    w = Worker("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    w.on("c")(lambda events: None)
    with pytest.raises(pgcast.ConnectError):
        w.run()  # a worker that never connected says so instead of retrying forever


# -- batches -------------------------------------------------------------------------


def test_events_arriving_together_come_as_one_batch_in_order(
    dsn: str, conn: Conn, unique_channel: str, started: list[Any]
) -> None:
    batches: list[list[str]] = []
    worker = Worker(dsn, debounce=0.3)

    @worker.on(unique_channel)
    def handle(events: list[pgcast.Event]) -> None:
        batches.append([e.payload for e in events])

    start(worker, started)
    send(conn, unique_channel, [str(i) for i in range(50)])
    wait_until("a batch", lambda: batches)
    time.sleep(0.5)  # nothing more comes: the 50 were one batch
    assert batches == [[str(i) for i in range(50)]]


def test_debounce_window_coalesces_separate_transactions_and_max_batch_splits(
    dsn: str, conn: Conn, unique_channel: str, started: list[Any]
) -> None:
    windowed: list[list[str]] = []
    capped: list[list[str]] = []
    worker = Worker(dsn)

    @worker.on(unique_channel, debounce=1.0)
    def window(events: list[pgcast.Event]) -> None:
        windowed.append([e.payload for e in events])

    @worker.on(unique_channel, debounce=5.0, max_batch=4)
    def cap(events: list[pgcast.Event]) -> None:
        capped.append([e.payload for e in events])

    start(worker, started)
    for i in range(8):  # eight transactions, well inside one 1 s window
        send(conn, unique_channel, [str(i)])
    wait_until("the window to close", lambda: windowed)
    assert windowed == [[str(i) for i in range(8)]]
    # Two full batches, each at once: not after the 5 s window.
    assert capped == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]


def test_async_handlers_run_on_the_workers_loop(
    dsn: str, conn: Conn, unique_channel: str, started: list[Any]
) -> None:
    import asyncio

    got: list[str] = []
    worker = Worker(dsn, debounce=0)

    @worker.on(unique_channel)
    async def handle(events: list[pgcast.Event]) -> None:
        await asyncio.sleep(0)
        got.extend(e.payload for e in events)

    start(worker, started)
    send(conn, unique_channel, ["a", "b"])
    wait_until("the async handler", lambda: got == ["a", "b"])


# -- errors ----------------------------------------------------------------------------


def test_a_failing_handler_is_retried_with_the_same_batch_and_logged(
    dsn: str, conn: Conn, unique_channel: str, started: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[list[str]] = []
    worker = Worker(dsn, debounce=0, retry=Retry(attempts=3, backoff=0.01))

    @worker.on(unique_channel)
    def flaky(events: list[pgcast.Event]) -> None:
        calls.append([e.payload for e in events])
        if len(calls) < 3:
            raise OSError("cache directory not mounted yet")

    caplog.set_level(logging.ERROR, "pgcast.worker")
    start(worker, started)
    send(conn, unique_channel, ["port 1"])
    wait_until("the third attempt", lambda: len(calls) == 3)
    assert calls == [["port 1"]] * 3
    retried = [r for r in caplog.records if "attempt" in r.getMessage()]
    assert len(retried) == 2
    assert "'port 1'" in retried[0].getMessage()  # the events are in the log
    assert "cache directory not mounted yet" in caplog.text


def test_after_the_last_attempt_the_batch_goes_to_on_error_or_the_log(
    dsn: str, conn: Conn, unique_channel: str, started: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    failed: list[tuple[BaseException, list[Any]]] = []
    hooked = Worker(dsn, debounce=0, retry=Retry(attempts=2, backoff=0.01),
                    on_error=lambda exc, batch: failed.append((exc, batch)))
    logged = Worker(dsn, debounce=0, retry=Retry(attempts=1))

    def broken(events: list[pgcast.Event]) -> None:
        raise RuntimeError("always")

    hooked.on(unique_channel)(broken)
    logged.on(unique_channel)(broken)
    caplog.set_level(logging.ERROR, "pgcast.worker")
    start(hooked, started)
    start(logged, started)
    send(conn, unique_channel, ["x"])
    wait_until("on_error", lambda: failed)
    ((exc, batch),) = failed
    assert isinstance(exc, RuntimeError) and [e.payload for e in batch] == ["x"]
    wait_until("the log", lambda: "failed for good" in caplog.text)
    # Both workers go on working after a failure.
    send(conn, unique_channel, ["y"])
    wait_until("the next batch", lambda: len(failed) == 2)


# -- stopping ---------------------------------------------------------------------------


def test_stop_from_another_thread_finishes_the_batch_in_hand(
    dsn: str, conn: Conn, unique_channel: str, started: list[Any]
) -> None:
    began, finished = threading.Event(), threading.Event()
    worker = Worker(dsn, debounce=0)

    @worker.on(unique_channel)
    def slow(events: list[pgcast.Event]) -> None:
        began.set()
        time.sleep(1.0)
        finished.set()

    start(worker, started)
    send(conn, unique_channel, ["work"])
    assert began.wait(WAIT)
    t0 = time.monotonic()
    started[0].stop(WAIT)
    assert finished.is_set()  # run() returned only after the handler finished
    assert time.monotonic() - t0 < 5
    assert not worker.stopping and not started[0].is_alive()


def test_a_handler_may_stop_the_thread_it_runs_in(
    dsn: str, conn: Conn, unique_channel: str, started: list[Any]
) -> None:
    """``WorkerThread.stop()`` called by a handler (in the worker's own thread)
    asks the worker to stop instead of joining its own thread (RuntimeError:
    the handler failed and the worker went on)."""
    handled: list[str] = []
    failures: list[BaseException] = []
    worker = Worker(dsn, debounce=0, retry=Retry(attempts=1),
                    on_error=lambda exc, events: failures.append(exc))

    @worker.on(unique_channel)
    def last(events: list[pgcast.Event]) -> None:
        handled.extend(e.payload for e in events)
        started[0].stop(WAIT)

    start(worker, started)
    send(conn, unique_channel, ["the last one"])
    started[0].join(WAIT)
    assert not started[0].is_alive(), "the worker went on after its handler stopped it"
    assert handled == ["the last one"] and failures == []
    assert started[0].exception is None


def test_an_idle_worker_stops_at_once_and_delivers_batches_still_in_their_window(
    dsn: str, conn: Conn, unique_channel: str, started: list[Any]
) -> None:
    got: list[str] = []
    worker = Worker(dsn, debounce=60.0)

    @worker.on(unique_channel)
    def handle(events: list[pgcast.Event]) -> None:
        got.extend(e.payload for e in events)

    start(worker, started)
    send(conn, unique_channel, ["received, not yet due"])
    time.sleep(0.3)  # received by the worker; its window has 60 s to go
    t0 = time.monotonic()
    started[0].stop(WAIT)
    assert got == ["received, not yet due"]
    assert time.monotonic() - t0 < 2


def test_a_worker_can_run_again_after_a_stop(
    dsn: str, conn: Conn, unique_channel: str, started: list[Any]
) -> None:
    got: list[str] = []
    worker = Worker(dsn, debounce=0)
    worker.on(unique_channel)(lambda events: got.extend(e.payload for e in events))
    start(worker, started)
    with pytest.raises(RuntimeError, match="register handlers before"):
        worker.on("another")(print)
    with pytest.raises(RuntimeError, match="already running"):
        worker.run()
    started.pop().stop(WAIT)
    start(worker, started)
    send(conn, unique_channel, ["again"])
    wait_until("the restarted worker", lambda: got == ["again"])


SIGNAL_APP = """
import sys, threading, time, pgcast
worker = pgcast.Worker(sys.argv[1], debounce=0)
@worker.on(sys.argv[2])
def slow(events):
    print("begin", [e.payload for e in events], flush=True)
    time.sleep(1.0)
    print("end", flush=True)
def announce():
    if worker.wait_ready(30):
        print("ready", flush=True)
threading.Thread(target=announce, daemon=True).start()
worker.run()  # in the main thread: it handles SIGINT and SIGTERM
print("stopped", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_in_the_main_thread_stops_gracefully(
    dsn: str, conn: Conn, unique_channel: str, signum: int
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_APP, dsn, unique_channel],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"  # listening
        send(conn, unique_channel, ["job"])
        assert proc.stdout.readline() == "begin ['job']\n"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert out == "end\nstopped\n"


def test_cli_worker_refuses_a_bad_target(tmp_path: Any) -> None:
    for target, message in [("nocolon", "MODULE:ATTRIBUTE"),
                            ("no_such_module_x:worker", "cannot import"),
                            ("json:dumps", "not a pgcast.Worker"),
                            ("json:JSONDecoder", "not a pgcast.Worker")]:
        done = subprocess.run([sys.executable, "-m", "pgcast.cli", "worker", target,
                               "--dsn", "postgresql://127.0.0.1:1/x"],
                              capture_output=True, text=True, timeout=WAIT, check=False)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
