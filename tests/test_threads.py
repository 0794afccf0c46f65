"""Thread safety of the sync PubSub: one thread iterating events while other
threads notify, listen and unlisten through the same PubSub.

The iterating thread waits with ``select_timeout=30``: psycopg's own
``notifies()`` holds the connection lock while it waits, so a design built on
it would make every ``notify`` from another thread wait up to 30 s. Here
``notify`` must not wait for the iterating thread at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

import pgcast

Conn = psycopg.Connection[tuple[Any, ...]]
#: The iterating thread's select timeout: far longer than any of these tests.
LONG_SELECT = 30.0


@dataclass
class Iterating:
    """A thread iterating ``ps.events(select_timeout=30)`` into a list."""

    ps: pgcast.PubSub
    expected: int
    events: list[pgcast.Event] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    waiting: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True, name="iterating")
        self.thread.start()
        assert self.waiting.wait(10), "the iterating thread did not start"
        time.sleep(0.05)  # now blocked in select() inside events()

    def _run(self) -> None:
        try:
            self.waiting.set()
            for event in self.ps.events(select_timeout=LONG_SELECT, yield_timeouts=True):
                if not isinstance(event, pgcast.Event):
                    raise AssertionError(f"no event within {LONG_SELECT} s: {event!r}")
                self.events.append(event)
                if len(self.events) >= self.expected:
                    break
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.done.set()

    def join(self, timeout: float = 20.0) -> list[pgcast.Event]:
        if not self.done.wait(timeout):
            pytest.fail(f"got {len(self.events)} of {self.expected} events in {timeout} s")
        assert self.errors == []
        return self.events


@pytest.fixture
def ps(dsn: str) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as pubsub:
        yield pubsub


def test_notify_never_waits_for_the_iterating_thread(
    ps: pgcast.PubSub, unique_channel: str
) -> None:
    ps.listen(unique_channel)
    pid = ps.backend_pid
    reader = Iterating(ps, 50)
    reader.start()
    start = time.monotonic()
    for i in range(50):
        ps.notify(unique_channel, str(i))
        assert ps.backend_pid == pid
    elapsed = time.monotonic() - start
    events = reader.join()
    # A bound far above the real figure, far below even one select_timeout.
    assert elapsed < 1.0, f"50 notifies took {elapsed:.3f} s"
    assert [e.payload for e in events] == [str(i) for i in range(50)]
    assert {e.pid for e in events} == {pid}
    assert ps.backend_pid == pid


def test_notify_from_another_thread_while_main_iterates(
    ps: pgcast.PubSub, unique_channel: str
) -> None:
    # The same, the other way round: the thread running the test iterates.
    ps.listen(unique_channel)
    durations: list[float] = []

    def publish() -> None:
        time.sleep(0.05)
        for i in range(50):
            t = time.monotonic()
            ps.notify(unique_channel, str(i))
            durations.append(time.monotonic() - t)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    got: list[str] = []
    for event in ps.events(select_timeout=LONG_SELECT, yield_timeouts=True):
        assert isinstance(event, pgcast.Event), f"no event within {LONG_SELECT} s"
        got.append(event.payload)
        if len(got) == 50:
            break
    thread.join(10)
    assert got == [str(i) for i in range(50)]
    assert sum(durations) < 1.0 and max(durations) < 0.5


def test_many_threads_notify_while_one_iterates(ps: pgcast.PubSub, unique_channel: str) -> None:
    ps.listen(unique_channel)
    writers, each = 4, 100
    reader = Iterating(ps, writers * each)
    reader.start()
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def publish(w: int) -> None:
        try:
            barrier.wait(10)
            for i in range(0, each, 2):
                ps.notify(unique_channel, f"{w}:{i}")
                ps.notify_many([(unique_channel, f"{w}:{i + 1}")])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(w,), daemon=True) for w in range(writers)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    elapsed = time.monotonic() - start
    events = reader.join()
    assert errors == []
    assert elapsed < 10
    # Every message arrived, and each thread's in the order it sent them.
    for w in range(writers):
        mine = [e.payload for e in events if e.payload.startswith(f"{w}:")]
        assert mine == [f"{w}:{i}" for i in range(each)]
    assert {e.pid for e in events} == {ps.backend_pid}


def test_listen_and_unlisten_from_another_thread(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str
) -> None:
    first, second = unique_channel + "_1", unique_channel + "_2"
    ps.listen(first)
    reader = Iterating(ps, 3)
    reader.start()
    start = time.monotonic()
    ps.listen(second)  # the iterating thread is waiting on the socket
    assert time.monotonic() - start < 1.0
    pgcast.notify(conn, second, "new channel")
    start = time.monotonic()
    ps.unlisten(first)
    assert time.monotonic() - start < 1.0
    pgcast.notify(conn, first, "not delivered")
    pgcast.notify(conn, second, "still here")
    ps.notify(second, "own")
    events = reader.join()
    assert [(e.channel, e.payload) for e in events] == [
        (second, "new channel"), (second, "still here"), (second, "own")
    ]


def test_events_arriving_with_another_thread_s_query_wake_the_iterator(
    ps: pgcast.PubSub, dsn: str, unique_channel: str
) -> None:
    # Notifications that reach the socket while another thread's query runs
    # are read by that query; the iterating thread must still hand them out
    # promptly, though its own socket wait sees nothing new.
    ps.listen(unique_channel)
    reader = Iterating(ps, 20)
    reader.start()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as other:
        for i in range(20):
            other.execute("SELECT pg_notify(%s, %s)", (unique_channel, str(i)))
            ps.notify(unique_channel + "_unlistened", "x")  # a query on ps
    start = time.monotonic()
    events = reader.join(timeout=LONG_SELECT - 10)
    assert time.monotonic() - start < 5
    assert [e.payload for e in events] == [str(i) for i in range(20)]


def test_runner_thread_and_publishing_threads(ps: pgcast.PubSub, unique_channel: str) -> None:
    seen: list[str] = []
    done = threading.Event()

    def handler(event: pgcast.Event) -> None:
        seen.append(event.payload)
        if len(seen) == 100:
            done.set()

    ps.subscribe(unique_channel, handler)
    runner = ps.run_in_thread()
    try:
        threads = [
            threading.Thread(
                target=lambda w=w: [ps.notify(unique_channel, f"{w}:{i}") for i in range(25)],
                daemon=True,
            )
            for w in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert done.wait(20), f"{len(seen)} of 100 delivered"
    finally:
        runner.stop(10)
    for w in range(4):
        assert [p for p in seen if p.startswith(f"{w}:")] == [f"{w}:{i}" for i in range(25)]


def test_close_from_another_thread_while_notifying(dsn: str, unique_channel: str) -> None:
    ps = pgcast.connect(dsn)
    outcomes: list[str] = []

    def publish() -> None:
        try:
            for i in range(10_000):
                ps.notify(unique_channel, str(i))
            outcomes.append("finished")
        except pgcast.PgcastError as exc:
            outcomes.append(type(exc).__name__)

    thread = threading.Thread(target=publish, daemon=True)
    try:
        thread.start()
        time.sleep(0.1)
    finally:
        ps.close()
    thread.join(10)
    assert not thread.is_alive()
    # A clean pgcast error (or it had finished), never a hang or a crash.
    assert outcomes in (["finished"], ["ClosedError"])
