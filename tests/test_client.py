"""The synchronous PubSub (:mod:`pgcast.client`) against real PostgreSQL.

Each test proves one sentence of the foundation's contract (issue 2): the API
calls, the seeds' LISTEN/NOTIFY semantics, exact channel names, payload
limits, transactions, batch publishing and connection errors. The callback
interface is in test_callbacks.py, threads in test_threads.py, the asyncio
twin in test_aio.py.

To show that something is *not* delivered, a test sends it and then a
sentinel from the same session, and checks everything received up to the
sentinel: PostgreSQL delivers one session's notifications in order.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import _hba
import pgcast
from pgcast.embedded import EmbeddedServer

Conn = psycopg.Connection[tuple[Any, ...]]
password_role = _hba.password_role  # a fixture, shared by test_client/test_aio

#: A bound for "never blocks" / "returns at once", not a benchmark.
@pytest.fixture
def ps(dsn: str) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as pubsub:
        yield pubsub


# -- connect -------------------------------------------------------------------














# -- connect errors: a pgcast error with the server's message, never a hang ----


def test_server_that_never_answers_times_out() -> None:
    # A socket that accepts TCP connections but never speaks: without
    # connect_timeout, libpq would wait for the server's reply forever.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        port = mute.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(pgcast.ConnectError, match="timeout"):
            pgcast.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=1)
        assert time.monotonic() - start < 10


def test_wrong_password_raises_connect_error(
    server: EmbeddedServer, password_role: tuple[str, str]
) -> None:
    role, password = password_role
    base = f"127.0.0.1:{server.port}/postgres"
    with pytest.raises(
        pgcast.ConnectError, match=f'password authentication failed for user "{role}"'
    ):
        pgcast.connect(f"postgresql://{role}:wrong@{base}")
    with pgcast.connect(f"postgresql://{role}:{password}@{base}") as ps:
        assert ps.backend_pid > 0


# -- listen / unlisten / listening_channels ------------------------------------


# -- notify ----------------------------------------------------------------------


# -- receiving ---------------------------------------------------------------------


def test_events_without_yield_timeouts_only_yields_events(
    ps: pgcast.PubSub, dsn: str, unique_channel: str
) -> None:
    ps.listen(unique_channel)
    sender = threading.Timer(0.4, lambda: send(dsn, unique_channel, "late"))
    sender.start()
    try:
        first = next(iter(ps.events(select_timeout=0.05)))
    finally:
        sender.join(10)
    assert isinstance(first, pgcast.Event) and first.payload == "late"


def send(dsn: str, channel: str, *payloads: str) -> None:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
        for payload in payloads:
            pgcast.notify(c, channel, payload)


# -- close ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "use",
    [
        lambda ps: ps.listen("x"),
        lambda ps: ps.unlisten("x"),
        lambda ps: ps.unlisten(),
        lambda ps: ps.notify("x", "p"),
        lambda ps: ps.notify_many([("x", "p")]),
        lambda ps: ps.get_event(),
        lambda ps: next(iter(ps.events())),
        lambda ps: next(iter(ps.wait(0))),
        lambda ps: ps.transaction().__enter__(),
        lambda ps: ps.run_in_thread(),
        lambda ps: ps.subscribe("x", print),
    ],
)
def test_using_a_closed_pubsub_raises_closed_error(
    dsn: str, use: Callable[[pgcast.PubSub], object]
) -> None:
    ps = pgcast.connect(dsn)
    ps.close()
    with pytest.raises(pgcast.ClosedError, match="closed"):
        use(ps)


# -- waking on the socket ----------------------------------------------------------


def test_receiving_wakes_on_the_socket(dsn: str, unique_channel: str) -> None:
    # select_timeout=30: an event can only arrive promptly if the wait ends
    # on the socket becoming readable, not on a timer.
    rounds = 50
    ready = threading.Event()
    sent_at: list[float] = []
    latencies: list[float] = []

    def sender() -> None:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
            for i in range(rounds):
                if not ready.wait(10):
                    return
                ready.clear()
                time.sleep(0.002)  # let the listener block in select()
                sent_at.append(time.perf_counter())
                pgcast.notify(c, unique_channel, str(i))

    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        ready.set()
        for event in ps.events(select_timeout=30, yield_timeouts=True):
            assert isinstance(event, pgcast.Event), "no event within 30 s"
            latencies.append(time.perf_counter() - sent_at[int(event.payload)])
            if len(latencies) == rounds:
                break
            ready.set()
        thread.join(10)
    assert statistics.median(latencies) < 0.020, sorted(latencies)


# -- channel names are exact ---------------------------------------------------------


# -- payload limits ---------------------------------------------------------------------


# -- transactions ------------------------------------------------------------------------


# -- the seeds' semantics ----------------------------------------------------------------


# -- notify_many --------------------------------------------------------------------------


# -- helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("delay_ms", [0, 1, 2, 5, 10, 20, 50])
def test_close_while_notifying_raises_closed_error(
    dsn: str, unique_channel: str, delay_ms: int
) -> None:
    """close() from another thread while notify() runs: every notify after the
    close started raises ClosedError, never a psycopg or a database error
    made up from the torn connection (the race hammered at several delays)."""
    ps = pgcast.connect(dsn)
    outcomes: list[str] = []

    def publish() -> None:
        try:
            for i in range(5_000):
                ps.notify(unique_channel, str(i))
            outcomes.append("finished")
        except pgcast.PgcastError as exc:
            outcomes.append(type(exc).__name__)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    time.sleep(delay_ms / 1000)
    ps.close()
    thread.join(10)
    assert not thread.is_alive(), "notify() did not end within 10 s of close()"
    assert outcomes in (["finished"], ["ClosedError"])
