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

import selectors
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import _hba
import pgcast
from _eventwait import collect, collect_until
from pgcast.embedded import EmbeddedServer

Conn = psycopg.Connection[tuple[Any, ...]]
password_role = _hba.password_role  # a fixture, shared by test_client/test_aio

#: A bound for "never blocks" / "returns at once", not a benchmark.
IMMEDIATE = 0.05


@pytest.fixture
def ps(dsn: str) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as pubsub:
        yield pubsub


def server_channels(conn: Conn) -> set[str]:
    """The session's LISTENs, less the health check's own probe channel."""
    rows = conn.execute("SELECT pg_listening_channels()")
    return {r[0] for r in rows if not r[0].startswith("pgcast.probe.")}


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


def test_notify_payloads(ps: pgcast.PubSub, unique_channel: str) -> None:
    ps.listen(unique_channel)
    ps.notify(unique_channel)
    ps.notify(unique_channel, "shipped 42")
    ps.notify(unique_channel, {"id": 42, "state": "shipped"})
    ps.notify(unique_channel, [1, "two", None])
    ps.notify(unique_channel, "ünïcödé ✓")
    events = collect(ps, 5)
    assert [e.payload for e in events] == [
        "", "shipped 42", '{"id":42,"state":"shipped"}', '[1,"two",null]', "ünïcödé ✓"
    ]
    assert events[2].json() == {"id": 42, "state": "shipped"}
    assert events[3].json() == [1, "two", None]
    assert all(e.channel == unique_channel and e.pid == ps.backend_pid for e in events)
    channel, payload, pid = events[1]
    assert (channel, payload, pid) == (unique_channel, "shipped 42", ps.backend_pid)


# -- receiving ---------------------------------------------------------------------


def test_get_event_never_blocks(ps: pgcast.PubSub, conn: Conn, unique_channel: str) -> None:
    ps.listen(unique_channel)
    for _ in range(5):
        start = time.monotonic()
        assert ps.get_event() is None
        assert time.monotonic() - start < IMMEDIATE
    pgcast.notify(conn, unique_channel, "1")
    pgcast.notify(conn, unique_channel, "2")
    got: list[pgcast.Event] = []
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        event = ps.get_event()
        if event is None:
            wait_readable(ps, 0.1)
        else:
            assert isinstance(event, pgcast.Event)
            got.append(event)
    assert [e.payload for e in got] == ["1", "2"]
    assert ps.get_event() is None


def wait_readable(ps: pgcast.PubSub, timeout: float) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(ps.connection.fileno(), selectors.EVENT_READ)
        sel.select(timeout)


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


def test_wait_zero_yields_what_is_pending_and_ends(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str
) -> None:
    ps.listen(unique_channel)
    start = time.monotonic()
    assert list(ps.wait(timeout=0)) == []
    assert time.monotonic() - start < IMMEDIATE
    for i in range(3):
        pgcast.notify(conn, unique_channel, str(i))
    wait_readable(ps, 10)
    time.sleep(0.05)  # let all three reach the socket
    assert [e.payload for e in ps.wait(0) if isinstance(e, pgcast.Event)] == ["0", "1", "2"]
    assert list(ps.wait(0)) == []


@pytest.mark.parametrize("how", ["events", "wait"])
def test_breaking_out_loses_nothing(
    ps: pgcast.PubSub, conn: Conn, unique_channel: str, how: str
) -> None:
    ps.listen(unique_channel)
    for i in range(5):
        pgcast.notify(conn, unique_channel, str(i))
    iterator = ps.events(select_timeout=10) if how == "events" else ps.wait(timeout=10)
    for event in iterator:  # and break out of it
        first = event
        break
    assert isinstance(first, pgcast.Event) and first.payload == "0"
    assert [e.payload for e in collect(ps, 4)] == ["1", "2", "3", "4"]


def test_backend_pid_and_ignore_own(ps: pgcast.PubSub, conn: Conn, unique_channel: str) -> None:
    row = ps.connection.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None and ps.backend_pid == row[0]
    ps.listen(unique_channel)
    ps.notify(unique_channel, "mine")
    pgcast.notify(conn, unique_channel, "theirs")
    ps.notify(unique_channel, "mine again")
    pgcast.notify(conn, unique_channel, "theirs again")
    got = []
    for event in ps.events(select_timeout=10, ignore_own=True):
        assert isinstance(event, pgcast.Event)
        got.append(event)
        if len(got) == 2:
            break
    assert [e.payload for e in got] == ["theirs", "theirs again"]
    assert {e.pid for e in got} == {conn.info.backend_pid}


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


def test_channel_names_are_exact(
    ps: pgcast.PubSub, conn: Conn, psql: Callable[..., str]
) -> None:
    ps.listen("Prices")
    pgcast.notify(conn, "Prices", "via pg_notify")
    conn.execute("SELECT pg_notify('Prices', 'via SQL pg_notify')")
    conn.execute("SELECT pg_notify('prices', 'lower case')")
    psql("""NOTIFY Prices, 'unquoted'; NOTIFY "Prices", 'quoted'; NOTIFY "Prices", 'end'""")
    got = collect_until(ps, "end")
    assert [e.payload for e in got] == ["via pg_notify", "via SQL pg_notify", "quoted", "end"]
    assert {e.channel for e in got} == {"Prices"}


INJECTION = 'x"; DROP TABLE users; --'


def test_injection_name_is_just_a_channel(ps: pgcast.PubSub, conn: Conn) -> None:
    # A temporary table of the listener's own session: the one an injected
    # DROP TABLE users would hit, and invisible to other tests.
    ps.connection.execute("CREATE TEMP TABLE users (name text)")
    ps.connection.execute("INSERT INTO users VALUES ('alice')")
    ps.listen(INJECTION)
    assert ps.listening_channels() == {INJECTION}
    assert server_channels(ps.connection) == {INJECTION}
    pgcast.notify(conn, INJECTION, "from another session")
    ps.notify(INJECTION, "from itself")
    got = collect(ps, 2)
    assert [(e.channel, e.payload) for e in got] == [
        (INJECTION, "from another session"), (INJECTION, "from itself")
    ]
    ps.unlisten(INJECTION)
    assert server_channels(ps.connection) == set()
    row = ps.connection.execute("SELECT name FROM users").fetchone()
    assert row == ("alice",)


# -- payload limits ---------------------------------------------------------------------


# -- transactions ------------------------------------------------------------------------


def test_application_transaction_freshports_pattern(
    ps: pgcast.PubSub, dsn: str, unique_channel: str
) -> None:
    table = f"ports_{uuid.uuid4().hex[:8]}"
    ps.listen(unique_channel)
    with psycopg.connect(dsn, connect_timeout=10) as app:  # not autocommit
        app.execute(f"CREATE TABLE {table} (name text)")
        app.commit()
        try:
            app.execute(f"INSERT INTO {table} VALUES ('rolled back')")
            pgcast.notify(app, unique_channel, "rolled back")
            app.rollback()
            app.execute(f"INSERT INTO {table} VALUES ('committed')")
            pgcast.notify(app, unique_channel, {"port": "committed"})
            assert ps.get_event() is None  # not before the commit
            app.commit()
            [event] = collect(ps, 1)
            assert event.json() == {"port": "committed"}
            assert event.pid == app.info.backend_pid
            # The listener sees the data the notification announces.
            rows = ps.connection.execute(f"SELECT name FROM {table}").fetchall()
            assert rows == [("committed",)]
            app.execute(f"SELECT pg_notify('{unique_channel}', 'end')")
            app.commit()
            assert [e.payload for e in collect_until(ps, "end")] == ["end"]
        finally:
            app.rollback()
            app.execute(f"DROP TABLE {table}")
            app.commit()


# -- the seeds' semantics ----------------------------------------------------------------


def test_psql_notify_arrives_with_psql_s_pid(
    ps: pgcast.PubSub, psql: Callable[..., str]
) -> None:
    ps.listen("data")
    out = psql("NOTIFY data, 'green'", "-Atq", "--command=SELECT pg_backend_pid()")
    psql_pid = int(out.strip())
    [event] = collect(ps, 1)
    assert event == ("data", "green", psql_pid)
    assert event.pid != ps.backend_pid


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
