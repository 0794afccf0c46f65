# Generated from tests/test_aio_reconnect.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
"""Reconnect against real PostgreSQL, the same in both flavours: written once
for asyncio; tests/test_reconnect.py, the same tests for the sync flavour, is
generated from this file by tools/async_to_sync.py (edit this one, then run
the script).

Backend terminations, server restarts, notify during an outage,
reconnect=False, hooks and callbacks. Tests that stop or restart a server
use a dedicated one (``own_server``), so the session's server is never
disturbed. *conn* is a plain sync psycopg connection in both flavours: the
"other session" that ends backends and sends.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import psycopg
import pytest

import pgcast
import pgcast.aio
from _eventwait import join_thread, pause, run_sync, start_thread
from _faults import (
    FAST,
    RECONNECT_TIMEOUT,
    dedicated_server,
    failing_coroutine_callback,
    markers,
    payloads,
    terminate,
    until,
)
from pgcast._reconnect import RETRY_LOG_EVERY
from pgcast.embedded import EmbeddedServer
from tcp_proxy import TcpProxy

Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture(scope="module")
def own_server(pg_server: EmbeddedServer | None) -> Iterator[EmbeddedServer]:
    if pg_server is None:
        pytest.skip("PGCAST_TEST_DSN is set: restart tests need an embedded server")
    with dedicated_server() as srv:
        yield srv


@pytest.fixture
def running(own_server: EmbeddedServer) -> EmbeddedServer:
    """The dedicated server, running at the start of the test (and after)."""
    if not own_server.is_running:
        own_server.start()
    return own_server


def until_true(condition: Callable[[], bool], what: str) -> None:
    """Let the other task (or thread) run until *condition* holds; fail after
    RECONNECT_TIMEOUT seconds."""
    deadline = time.monotonic() + RECONNECT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {RECONNECT_TIMEOUT} s")
        pause(0.02)


def test_terminated_backend_gives_a_marker_then_events_flow_again(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    before = datetime.now(UTC)

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0) as ps:
            ps.listen(unique_channel)
            old_pid = ps.backend_pid
            terminate(conn, old_pid)
            got = until(ps, pgcast.Reconnected)
            assert payloads(got) == []
            marker = got[-1]
            assert isinstance(marker, pgcast.Reconnected)
            assert before <= marker.lost_at <= marker.restored_at <= datetime.now(UTC)
            assert marker.downtime.total_seconds() >= 0
            assert marker.attempts >= 1
            assert "lost" in marker.error
            assert ps.backend_pid != old_pid
            assert ps.generation == 1
            assert ps.listening_channels() == {unique_channel}
            assert not ps.closed
            # The marker means every channel is LISTENed again: this arrives.
            conn.execute("SELECT pg_notify(%s, 'after')", (unique_channel,))
            assert payloads(until(ps, "after")) == ["after"]

    run_sync(body())


def test_a_marker_after_every_one_of_five_terminations(
    dsn: str, conn: Conn, unique_channel: str
) -> None:

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0) as ps:
            ps.listen(unique_channel, unique_channel + "_b")
            pids = {ps.backend_pid}
            for round_ in range(5):
                terminate(conn, ps.backend_pid)
                got = until(ps, pgcast.Reconnected)
                assert len(markers(got)) == 1, got
                pids.add(ps.backend_pid)
                conn.execute("SELECT pg_notify(%s, %s)", (unique_channel + "_b", f"r{round_}"))
                assert payloads(until(ps, f"r{round_}")) == [f"r{round_}"]
            assert len(pids) == 6
            assert ps.generation == 5

    run_sync(body())


def test_events_read_before_the_loss_are_kept(dsn: str, conn: Conn, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0) as ps:
            ps.listen(unique_channel)
            conn.execute("SELECT pg_notify(%s, 'before')", (unique_channel,))
            assert payloads(until(ps, "before")) == ["before"]
            conn.execute("SELECT pg_notify(%s, 'pending')", (unique_channel,))
            deadline = time.monotonic() + RECONNECT_TIMEOUT
            while not ps._core.inbox and time.monotonic() < deadline:
                ps._fill(0.05)  # read it into the inbox without handing it out
            assert ps._core.inbox, "the notification did not arrive"
            terminate(conn, ps.backend_pid)
            got = until(ps, pgcast.Reconnected)
            assert payloads(got) == ["pending"]

    run_sync(body())


def test_get_event_reconnects_and_returns_the_marker(
    dsn: str, conn: Conn, unique_channel: str
) -> None:

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0) as ps:
            ps.listen(unique_channel)
            terminate(conn, ps.backend_pid)
            deadline = time.monotonic() + RECONNECT_TIMEOUT
            item = None
            while item is None and time.monotonic() < deadline:
                item = ps.get_event()
                pause(0.02)  # polling is what get_event() is for
            assert isinstance(item, pgcast.Reconnected), item
            assert ps.generation == 1

    run_sync(body())


def test_reconnect_false_raises_connection_lost(dsn: str, conn: Conn, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn, reconnect=False, health_check_interval=0) as ps:
            ps.listen(unique_channel)
            terminate(conn, ps.backend_pid)
            deadline = time.monotonic() + RECONNECT_TIMEOUT
            with pytest.raises(pgcast.ConnectionLostError, match="connection to PostgreSQL lost"):
                for _ in ps.events(select_timeout=0.05, yield_timeouts=True):
                    assert time.monotonic() < deadline, "the loss was not noticed"
            assert ps.closed
            with pytest.raises(pgcast.ConnectionLostError):
                ps.get_event()
            with pytest.raises(pgcast.ConnectionLostError):
                ps.notify(unique_channel, "x")

    run_sync(body())


def test_the_marker_and_the_error_say_why_the_server_ended_the_session(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    """A server that ends an idle session says why in a FATAL message, which
    libpq hands over as a notice: the marker and the error carry it, not
    only libpq's "server closed the connection unexpectedly"."""
    why = "terminating connection due to administrator command (57P01)"

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0) as ps:
            ps.listen(unique_channel)
            terminate(conn, ps.backend_pid)
            marker = until(ps, pgcast.Reconnected)[-1]
            assert isinstance(marker, pgcast.Reconnected)
            assert marker.error.endswith(f"the server ended it: FATAL: {why}"), marker.error
            # The next loss has its own reason: none is carried over.
            ps.reconnect()
            marker = until(ps, pgcast.Reconnected)[-1]
            assert isinstance(marker, pgcast.Reconnected)
            assert "FATAL" not in marker.error, marker.error
        with pgcast.connect(dsn, reconnect=False, health_check_interval=0) as ps:
            ps.listen(unique_channel)
            terminate(conn, ps.backend_pid)
            deadline = time.monotonic() + RECONNECT_TIMEOUT
            with pytest.raises(pgcast.ConnectionLostError, match=re.escape(why)):
                for _ in ps.events(select_timeout=0.05, yield_timeouts=True):
                    assert time.monotonic() < deadline, "the loss was not noticed"

    run_sync(body())


def test_reconnect_false_get_event_raises(dsn: str, conn: Conn, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn, reconnect=False, health_check_interval=0) as ps:
            ps.listen(unique_channel)
            terminate(conn, ps.backend_pid)
            deadline = time.monotonic() + RECONNECT_TIMEOUT
            with pytest.raises(pgcast.ConnectionLostError):
                while time.monotonic() < deadline:
                    ps.get_event()
                    pause(0.02)

    run_sync(body())


def test_notify_after_a_termination_reconnects_and_sends(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    # Nobody iterates: the notifying caller notices the loss and reconnects.

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0) as ps:
            ps.listen(unique_channel)
            terminate(conn, ps.backend_pid)
            pause(0.2)  # let the server's goodbye reach the socket
            ps.notify(unique_channel, "sent-after-loss")
            got = until(ps, "sent-after-loss")
            assert len(markers(got)) == 1
            assert got.index(markers(got)[0]) < len(got) - 1  # the marker comes first

    run_sync(body())


def test_on_reconnect_runs_after_relisten_and_before_the_marker(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    calls: list[pgcast.Reconnected] = []
    listening_at_call: list[bool] = []
    pubsubs: list[pgcast.PubSub] = []

    def on_reconnect(marker: pgcast.Reconnected) -> None:
        calls.append(marker)
        # The channel is LISTENed again already: this notification is received.
        conn.execute("SELECT pg_notify(%s, 'from-callback')", (unique_channel,))
        listening_at_call.append(unique_channel in pubsubs[0].listening_channels())

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0, on_reconnect=on_reconnect) as ps:
            pubsubs.append(ps)
            ps.listen(unique_channel)
            terminate(conn, ps.backend_pid)
            got = until(ps, pgcast.Reconnected)
            assert calls == markers(got)
            assert listening_at_call == [True]
            if "from-callback" not in payloads(got):
                got += until(ps, "from-callback")
            assert "from-callback" in payloads(got)

    run_sync(body())


def test_on_reconnect_may_be_a_coroutine_function_and_may_fail(
    dsn: str, conn: Conn, unique_channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    on_reconnect = failing_coroutine_callback(seen)  # a coroutine function in both flavours

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0, on_reconnect=on_reconnect) as ps:
            ps.listen(unique_channel)
            terminate(conn, ps.backend_pid)
            until(ps, pgcast.Reconnected)  # still delivered

    run_sync(body())
    assert seen == ["async"]
    assert "on_reconnect failed" in caplog.text


def test_reconnect_hooks_run_before_the_marker(dsn: str, conn: Conn, unique_channel: str) -> None:
    order: list[str] = []

    def on_reconnect(marker: pgcast.Reconnected) -> None:
        pause(0)
        order.append("on_reconnect")

    def hook(ps: pgcast.PubSub) -> None:
        # Hooks may run commands on the new connection (durable replay does).
        usage = ps.queue_usage()
        assert 0.0 <= usage <= 1.0
        order.append(f"hook:{len(ps._core.inbox)}")
        ps._core.inbox.append(pgcast.Event(unique_channel, "replayed", 0))

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0, on_reconnect=on_reconnect) as ps:
            ps.listen(unique_channel)
            ps.add_reconnect_hook(hook)
            with pytest.raises(TypeError):
                ps.add_reconnect_hook("not callable")  # type: ignore[arg-type]
            terminate(conn, ps.backend_pid)
            got = until(ps, pgcast.Reconnected)
            assert order == ["hook:0", "on_reconnect"]
            assert payloads(got) == ["replayed"]  # appended by the hook: before the marker

    run_sync(body())


def test_explicit_reconnect(dsn: str, conn: Conn, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn, reconnect=False, health_check_interval=0) as ps:
            ps.listen(unique_channel)
            old = ps.backend_pid
            marker = ps.reconnect()
            assert marker.error == "reconnect() was called"
            assert ps.backend_pid != old
            assert ps.get_event() == marker
            conn.execute("SELECT pg_notify(%s, 'x')", (unique_channel,))
            assert payloads(until(ps, "x")) == ["x"]
        with pytest.raises(pgcast.ClosedError):
            ps.reconnect()

    run_sync(body())


def test_ignore_own_keeps_ignoring_after_a_reconnect(
    dsn: str, conn: Conn, unique_channel: str
) -> None:

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0) as ps:
            ps.listen(unique_channel)
            terminate(conn, ps.backend_pid)
            until(ps, pgcast.Reconnected)
            ps.notify(unique_channel, "mine")
            conn.execute("SELECT pg_notify(%s, 'theirs')", (unique_channel,))
            got = []
            deadline = time.monotonic() + RECONNECT_TIMEOUT
            for item in ps.events(select_timeout=0.05, yield_timeouts=True, ignore_own=True):
                if item is not None:
                    got.append(item)
                    break
                assert time.monotonic() < deadline
            assert payloads(got) == ["theirs"]

    run_sync(body())


def test_runner_handlers_survive_a_termination(dsn: str, conn: Conn, unique_channel: str) -> None:
    received: list[str] = []
    reconnected: list[pgcast.Reconnected] = []

    def handler(event: pgcast.Event) -> None:
        received.append(event.payload)

    def body() -> None:
        with pgcast.connect(dsn, health_check_interval=0, on_reconnect=reconnected.append) as ps:
            ps.subscribe(unique_channel, handler)
            runner = ps.run_in_thread()
            stop = runner.stop
            try:
                terminate(conn, ps.backend_pid)
                until_true(lambda: bool(reconnected), "no reconnect")
                conn.execute("SELECT pg_notify(%s, 'after')", (unique_channel,))
                until_true(lambda: "after" in received, f"not delivered: {received}")
            finally:
                stop()
            assert runner.exception is None
            assert received == ["after"]

    run_sync(body())


def test_bad_arguments_are_refused(dsn: str) -> None:

    def body() -> None:
        with pytest.raises(TypeError, match="reconnect must be True or False"):
            pgcast.connect(dsn, reconnect="yes")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="reconnect_backoff must be a pgcast\\.Backoff"):
            pgcast.connect(dsn, reconnect_backoff=3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="health_check_interval must be >= 0"):
            pgcast.connect(dsn, health_check_interval=-1)
        with pytest.raises(ValueError, match="notify_timeout must be >= 0"):
            pgcast.connect(dsn, notify_timeout=-1)
        with pytest.raises(TypeError, match="on_reconnect must be callable"):
            pgcast.connect(dsn, on_reconnect=42)  # type: ignore[arg-type]

    run_sync(body())


# -- server restarts (a dedicated server) --------------------------------------
# The server is stopped and started by blocking calls, in asyncio too: nothing
# else needs the event loop meanwhile; a delayed start runs in a timer thread.


@pytest.mark.slow
def test_server_restart_gives_a_marker(running: EmbeddedServer, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(running.dsn, health_check_interval=0, reconnect_backoff=FAST) as ps:
            ps.listen(unique_channel)
            running.restart()
            got = until(ps, pgcast.Reconnected)
            assert len(markers(got)) == 1
            with psycopg.connect(running.dsn, autocommit=True) as c:
                c.execute("SELECT pg_notify(%s, 'back')", (unique_channel,))
            assert payloads(until(ps, "back")) == ["back"]

    run_sync(body(), timeout=110)


@pytest.mark.slow
def test_listener_waits_out_a_stopped_server(running: EmbeddedServer, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(running.dsn, health_check_interval=0, reconnect_backoff=FAST) as ps:
            ps.listen(unique_channel)
            running.stop()
            starter = threading.Timer(1.5, running.start)
            starter.start()
            try:
                got = until(ps, pgcast.Reconnected, timeout=60)
            finally:
                starter.join(60)
            marker = markers(got)[0]
            assert marker.attempts > 1  # the first attempts found no server
            assert marker.downtime.total_seconds() >= 1.0

    run_sync(body(), timeout=110)


@pytest.mark.slow
def test_notify_during_an_outage_waits_and_succeeds(
    running: EmbeddedServer, unique_channel: str
) -> None:

    def body() -> None:
        with pgcast.connect(
            running.dsn, health_check_interval=0, reconnect_backoff=FAST, notify_timeout=60
        ) as ps:
            ps.listen(unique_channel)
            running.stop()
            starter = threading.Timer(1.5, running.start)
            starter.start()
            try:
                started = time.monotonic()
                ps.notify(unique_channel, "waited")  # waits until the server is back
                assert time.monotonic() - started >= 1.0
            finally:
                starter.join(60)
            got = until(ps, "waited")
            assert len(markers(got)) == 1  # re-LISTENed before sending: received

    run_sync(body(), timeout=110)


@pytest.mark.slow
def test_notify_during_an_outage_fails_clearly_after_the_timeout(
    running: EmbeddedServer, unique_channel: str
) -> None:

    def body() -> None:
        with pgcast.connect(
            running.dsn, health_check_interval=0, reconnect_backoff=FAST, notify_timeout=1.0
        ) as ps:
            ps.listen(unique_channel)
            running.stop()
            try:
                with pytest.raises(pgcast.NotSentError, match="notify_timeout=1 s") as info:
                    ps.notify(unique_channel, "lost?")
                assert "not sent" in str(info.value)
                assert isinstance(info.value, pgcast.ConnectionLostError)
            finally:
                running.start()
            ps.notify(unique_channel, "later")  # usable again once the server is back
            got = until(ps, "later")
            assert "lost?" not in payloads(got)

    run_sync(body(), timeout=110)


@pytest.mark.slow
def test_notify_from_another_thread_while_the_listener_reconnects(
    running: EmbeddedServer, unique_channel: str
) -> None:
    """In asyncio, from another task: the notifying caller waits for the
    reconnect the iterating one is doing."""

    def body() -> None:
        with pgcast.connect(
            running.dsn, health_check_interval=0, reconnect_backoff=FAST, notify_timeout=60
        ) as ps:
            ps.listen(unique_channel)

            def publish() -> None:
                pause(0.5)
                ps.notify(unique_channel, "from-thread")

            running.stop()
            publisher = start_thread(publish)
            starter = threading.Timer(1.5, running.start)
            starter.start()
            try:
                got = until(ps, "from-thread", timeout=60)
            finally:
                join_thread(publisher, 60)
                starter.join(60)
            assert len(markers(got)) == 1

    run_sync(body(), timeout=110)


@pytest.mark.slow
def test_close_ends_iteration_while_reconnecting(
    running: EmbeddedServer, unique_channel: str
) -> None:

    def body() -> None:
        ps = pgcast.connect(running.dsn, health_check_interval=0, reconnect_backoff=FAST)
        ps.listen(unique_channel)
        ended: list[bool] = []

        def iterate() -> None:
            for _ in ps.events(select_timeout=0.05):
                pass
            ended.append(True)

        running.stop()
        try:
            iterating = start_thread(iterate)
            pause(1.0)  # the iterating side is retrying against a stopped server
            assert not ended
            ps.close()
            join_thread(iterating, 10)  # ended, and without an error
            assert ended == [True]
        finally:
            running.start()

    run_sync(body(), timeout=110)


#: No delay between attempts: a refusing server is retried at once, for 4 s.
NO_DELAY = pgcast.Backoff(initial=0, maximum=0, max_time=4.0)


def test_close_ends_a_reconnect_with_no_delay_between_attempts(
    dsn: str, unique_channel: str
) -> None:
    # With Backoff(initial=0) the plan never sleeps: the asyncio reconnect
    # never gave the event loop a turn (a refused connection fails without
    # one), so close() could not run, nor anything else, until the backoff
    # gave up (ConnectionLostError out of the iteration).

    def body() -> None:
        with TcpProxy.for_dsn(dsn) as proxy:
            ps = pgcast.connect(proxy.dsn(dsn), health_check_interval=0, reconnect_backoff=NO_DELAY)
            ps.listen(unique_channel)
            outcome: list[object] = []

            def iterate() -> None:
                try:
                    for _ in ps.events(select_timeout=0.05):
                        pass
                    outcome.append("ended")
                except pgcast.PgcastError as exc:
                    outcome.append(exc)

            proxy.refuse()  # every attempt is refused at once now
            proxy.cut()
            iterating = start_thread(iterate)
            pause(0.5)  # the iterating side retries meanwhile
            started = time.monotonic()
            ps.close()
            join_thread(iterating, 10)
            took = time.monotonic() - started
            assert outcome == ["ended"], outcome
            assert took < 2.0, f"the iteration ended {took:.1f} s after close()"

    run_sync(body(), timeout=60)


def test_a_reconnect_with_no_delay_does_not_flood_the_log(
    dsn: str, unique_channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Backoff(initial=0) against a server that refuses: one warning per
    # attempt, hundreds a second. Now the first failure, then a summary at
    # most every RETRY_LOG_EVERY seconds, and the count in the final error.
    backoff = pgcast.Backoff(initial=0, maximum=0, max_time=1.0)

    def body() -> None:
        with TcpProxy.for_dsn(dsn) as proxy:
            ps = pgcast.connect(proxy.dsn(dsn), health_check_interval=0, reconnect_backoff=backoff)
            ps.listen(unique_channel)
            proxy.refuse()
            proxy.cut()
            started = time.monotonic()
            with pytest.raises(pgcast.ConnectionLostError) as info:
                for _ in ps.events(select_timeout=0.05):
                    pass
            took = time.monotonic() - started
            ps.close()
            found = re.search("(\\d+) attempt\\(s\\)", str(info.value))
            assert found, str(info.value)
            attempts = int(found.group(1))
            assert attempts >= 20, f"only {attempts} attempts: the flood was not tested"
            failed = [r for r in caplog.records if "reconnect attempt" in r.getMessage()]
            assert 1 <= len(failed) <= 2 + took / RETRY_LOG_EVERY, [
                r.getMessage() for r in failed[:5]
            ]

    with caplog.at_level("WARNING", logger="pgcast"):
        run_sync(body(), timeout=60)
