# Generated from tests/test_aio_manager.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
"""The NotificationManager against real PostgreSQL, the same in both
flavours: written once for asyncio (:mod:`pgcast.manager._manager_async`);
tests/test_manager.py, the same tests for the sync flavour
(:mod:`pgcast.manager._manager`), is generated from this file by
tools/async_to_sync.py (edit this one, then run the script).

Each test proves a sentence of issue 3 or of the py-postgresql seeds'
"Notification Management" sections. The pure policy
(:mod:`pgcast.manager._policy`) is exercised through both flavours. What runs
next to the body (a notify, a close, a change of the set while the manager
waits) is a task in asyncio and a thread in the generated sync tests. One
test is of the event loop alone and is left out of the sync file: a reader
that fires while the user's loop body awaits must not make the loop spin.

Each test body runs under :func:`_eventwait.arun`, which fails it (rather
than hanging) after 60 s. Waits inside are bounded more tightly: managers
under test mostly run with a short timeout, so their idle events let a
helper check its deadline; a manager that must run with ``timeout=None`` is
guarded by a watchdog that sends a notification after a while, so a manager
that failed to wake up is woken and the test fails instead of hanging.
*conn* is a plain sync psycopg connection in both flavours: the "other
session" that sends and ends backends.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import select
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgcast
import pgcast.aio
from _capacity import spare_connections
from _eventwait import join_thread, pause, run_sync, start_thread
from pgcast.embedded import EmbeddedServer
from tcp_proxy import TcpProxy

Conn = psycopg.Connection[tuple[Any, ...]]
Value = tuple[pgcast.PubSub, list[pgcast.Event | pgcast.Reconnected | pgcast.Gap]] | None
Opener = Callable[..., pgcast.PubSub]

#: How long a test waits for something that should arrive at once on loopback.
ARRIVAL = 10.0
#: The watchdog's delay: far longer than any wait a passing test does.
WATCHDOG = 15.0


@contextlib.contextmanager
def pubsubs(dsn: str) -> Iterator[Opener]:
    """``open_(*channels, dsn=...)`` opens a listening PubSub; all are closed at the end."""
    opened: list[pgcast.PubSub] = []

    def open_(*channels: str, dsn: str = dsn, **kwargs: Any) -> pgcast.PubSub:
        ps = pgcast.connect(dsn, **kwargs)
        opened.append(ps)
        if channels:
            ps.listen(*channels)
        return ps

    try:
        yield open_
    finally:
        for ps in opened:
            ps.close()


def channel() -> str:
    return f"nm_{uuid.uuid4().hex[:12]}"


def notify(conn: Conn, channel: str, payload: str = "") -> None:
    conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def settle(*pss: pgcast.PubSub) -> None:
    """Wait until notifications sent to each PubSub have reached its socket."""
    for ps in pss:
        ready, _, _ = select.select([ps.fileno()], [], [], ARRIVAL)
        assert ready, f"nothing arrived on {ps!r} within {ARRIVAL} s"
    time.sleep(0.05)  # the rest of a burst, sent in one go, lands meanwhile


def take(nm: pgcast.NotificationManager, count: int, timeout: float = ARRIVAL) -> list[Value]:
    """Iterate *nm* (whose timeout must be > 0) until *count* events came.

    Returns every value yielded, idle events included.
    """
    t = nm.gettimeout()
    assert t is not None and t > 0, "take() needs idle events to check its deadline"
    got: list[Value] = []
    n = 0
    deadline = time.monotonic() + timeout
    for x in nm:
        got.append(x)
        if x is not None:
            n += len(x[1])
            if n >= count:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"got {n} of {count} events within {timeout} s: {got[-3:]}")


def drain(nm: pgcast.NotificationManager) -> list[Value]:
    """Iterate *nm* to its end (timeout 0, or no connection left); every value yielded."""
    got: list[Value] = []
    for x in nm:
        got.append(x)
        assert len(got) < 100, f"the iteration does not end: {got[-3:]}"
    return got


def payloads(items: Iterable[object]) -> list[str]:
    """The payloads of *items*, each of which must be an event (not a marker)."""
    out: list[str] = []
    for e in items:
        assert isinstance(e, pgcast.Event), f"not an event: {e!r}"
        out.append(e.payload)
    return out


def payloads_of(x: Value) -> list[str]:
    """The payloads of the events of one value, which must not be an idle event."""
    assert x is not None, "an idle event, not a connection's events"
    return payloads(x[1])


def events_of(values: list[Value]) -> list[tuple[pgcast.PubSub, str, str]]:
    """(pubsub, channel, payload) of every event in *values*, in order; a marker fails."""
    out: list[tuple[pgcast.PubSub, str, str]] = []
    for x in values:
        if x is not None:
            for e in x[1]:
                assert isinstance(e, pgcast.Event), f"not an event: {e!r}"
                out.append((x[0], e.channel, e.payload))
    return out


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

    def body() -> None:
        chans = [channel() for _ in range(3)]
        with pubsubs(dsn) as open_:
            a, b, c = [open_(ch) for ch in chans]
            d = open_(chans[0], chans[2])  # two channels, one of them shared with a
            with pgcast.NotificationManager(a, b, c, d, timeout=0.2) as nm:
                for i, ch in enumerate(chans):
                    notify(conn, ch, f"p{i}")
                got = events_of(take(nm, 5))
            assert sorted([(ps.backend_pid, ch, p) for ps, ch, p in got]) == sorted(
                [
                    (a.backend_pid, chans[0], "p0"),
                    (b.backend_pid, chans[1], "p1"),
                    (c.backend_pid, chans[2], "p2"),
                    (d.backend_pid, chans[0], "p0"),
                    (d.backend_pid, chans[2], "p2"),
                ]
            )

    run_sync(body())


def test_a_value_is_the_connection_and_all_its_events(dsn: str, conn: Conn) -> None:

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            ps = open_(ch)
            with conn.transaction():  # one commit: delivered together
                for i in range(5):
                    notify(conn, ch, str(i))
                notify(conn, ch)  # no payload
            settle(ps)
            with pgcast.NotificationManager(ps, timeout=0.2) as nm:
                assert iter(nm) is nm
                x = next(nm)
            assert x is not None
            got_ps, events = x
            assert got_ps is ps
            assert isinstance(events, list)
            assert payloads(events) == ["0", "1", "2", "3", "4", ""]
            for event in events:  # notification triples
                assert isinstance(event, pgcast.Event)
                chan, payload, pid = event
                assert chan == ch and payload == event.payload and isinstance(payload, str)
                assert pid == conn.info.backend_pid

    run_sync(body())


def test_the_manager_is_its_own_iterator(dsn: str) -> None:

    def body() -> None:
        with pubsubs(dsn) as open_, pgcast.NotificationManager(open_()) as nm:
            assert iter(nm) is nm

    run_sync(body())


def test_events_already_received_are_yielded_first(dsn: str) -> None:
    # A notification a PubSub sends on a channel it listens to comes back with
    # the query's result: it is in the inbox, and the socket stays quiet.

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            ps = open_(ch)
            ps.notify(ch, "before")
            with pgcast.NotificationManager(ps, timeout=5) as nm, watchdog(dsn, ch):
                x = next(nm)
                assert payloads_of(x) == ["before"]
                ps.notify(ch, "inside the loop")
                x = next(nm)
            assert payloads_of(x) == ["inside the loop"]

    run_sync(body())


def test_a_notify_while_the_manager_waits_on_the_connection(dsn: str) -> None:
    # The notify comes from a task (a thread, in the sync flavour) while the
    # manager waits on the very connection it is sent from.

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            ps = open_(ch)

            def later() -> None:
                pause(0.2)
                ps.notify(ch, "sent meanwhile")

            with pgcast.NotificationManager(ps) as nm, watchdog(dsn, ch):
                notifier = start_thread(later)
                x = next(nm)
                join_thread(notifier)
            assert payloads_of(x) == ["sent meanwhile"]

    run_sync(body())


# -- timeouts ----------------------------------------------------------------------


def test_settimeout_and_gettimeout(dsn: str) -> None:

    def body() -> None:
        with pubsubs(dsn) as open_:
            nm = pgcast.NotificationManager(open_())
            with nm:
                assert nm.gettimeout() is None
                nm.settimeout(2)
                assert nm.gettimeout() == 2
                assert isinstance(nm.gettimeout(), int)
                nm.settimeout(0.5)
                assert nm.gettimeout() == 0.5
                nm.settimeout(0)
                assert nm.gettimeout() == 0
                nm.settimeout(None)
                assert nm.gettimeout() is None
                with pytest.raises(ValueError, match="timeout must be >= 0 seconds, got -1"):
                    nm.settimeout(-1)
                with pytest.raises(TypeError, match="timeout must be a number of seconds or None"):
                    nm.settimeout("1")  # type: ignore[arg-type]
                assert nm.gettimeout() is None
        for timeout in [3, 0.5]:
            with pgcast.NotificationManager(timeout=timeout) as other:
                assert other.gettimeout() == timeout
        with pytest.raises(ValueError, match="got -2"):
            pgcast.NotificationManager(timeout=-2)

    run_sync(body())


def test_timeout_none_never_idles(dsn: str, conn: Conn) -> None:

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            ps = open_(ch)
            timer = threading.Timer(1.0, notify, (conn, ch, "after a second"))
            with pgcast.NotificationManager(ps, timeout=None) as nm, watchdog(dsn, ch):
                start = time.monotonic()
                timer.start()
                x = next(nm)  # waits through the silent second: no idle event
                elapsed = time.monotonic() - start
            timer.join(ARRIVAL)
            assert payloads_of(x) == ["after a second"]
            assert elapsed >= 0.9

    run_sync(body())


def test_timeout_yields_idle_events_about_every_timeout(dsn: str, conn: Conn) -> None:

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            ps = open_(ch)
            with pgcast.NotificationManager(ps, timeout=0.2) as nm:
                stamps = [time.monotonic()]
                for x in nm:
                    assert x is None
                    stamps.append(time.monotonic())
                    if len(stamps) == 6:
                        break
                gaps = [b - a for a, b in itertools.pairwise(stamps)]
                assert min(gaps) >= 0.19, gaps
                assert sum(gaps) < 5, gaps  # about every 0.2 s: not stuck
                # An event restarts the count: the next idle event comes a whole
                # timeout after the event, not after the previous idle event.
                notify(conn, ch, "x")
                assert next(nm) is not None
                after_event = time.monotonic()
                assert next(nm) is None
                assert time.monotonic() - after_event >= 0.19

    run_sync(body())


def test_settimeout_while_iterating_takes_effect(dsn: str) -> None:

    def body() -> None:
        with pubsubs(dsn) as open_:
            ps = open_(channel())
            with pgcast.NotificationManager(ps, timeout=0.1) as nm:
                assert next(nm) is None
                nm.settimeout(0.4)
                start = time.monotonic()
                assert next(nm) is None
                assert time.monotonic() - start >= 0.3

    run_sync(body())


def test_timeout_zero_polls_every_connection_once_and_ends(dsn: str, conn: Conn) -> None:

    def body() -> None:
        chans = [channel() for _ in range(3)]
        with pubsubs(dsn) as open_:
            pss = [open_(ch) for ch in chans]
            quiet = open_(channel())
            with pgcast.NotificationManager(*pss, quiet, timeout=0) as nm:
                assert drain(nm) == []  # nothing pending: ends at once, no idle event
                for ch in chans:
                    for i in range(2):
                        notify(conn, ch, str(i))
                settle(*pss)
                got = drain(nm)
                assert None not in got
                assert sorted([(x[0].backend_pid, payloads(x[1])) for x in got if x]) == sorted(
                    [(ps.backend_pid, ["0", "1"]) for ps in pss]
                )
                # Promptly discarded, nothing lost: nothing is left anywhere...
                assert drain(nm) == []
                for ps in [*pss, quiet]:
                    assert ps.get_event() is None
                # ... and the same manager can be used again.
                notify(conn, chans[1], "again")
                settle(pss[1])
                again = drain(nm)
            assert [(x[0], payloads(x[1])) for x in again if x] == [(pss[1], ["again"])]
            assert events_of(again) == [(pss[1], chans[1], "again")]

    run_sync(body())


def test_timeout_set_to_zero_inside_the_loop_ends_after_a_poll(dsn: str, conn: Conn) -> None:

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            ps = open_(ch)
            values: list[Value] = []
            with pgcast.NotificationManager(ps, timeout=0.1) as nm:
                for x in nm:
                    values.append(x)
                    if x is None:
                        notify(conn, ch, "pending")
                        settle(ps)
                        nm.settimeout(0)
                    assert len(values) < 10
            assert values[0] is None
            assert [(x[0], payloads(x[1])) for x in values[1:] if x] == [(ps, ["pending"])]

    run_sync(body())


# -- nothing held, nothing lost ------------------------------------------------------


def test_breaking_out_at_an_idle_event_loses_nothing(dsn: str, conn: Conn) -> None:

    def body() -> None:
        chans = [channel() for _ in range(2)]
        with pubsubs(dsn) as open_:
            a, b = [open_(ch) for ch in chans]
            nm = pgcast.NotificationManager(a, b, timeout=0.3)
            for i in range(3):
                notify(conn, chans[0], f"a{i}")
                notify(conn, chans[1], f"b{i}")
            got: list[Value] = []
            for x in nm:
                if x is None:
                    break  # the safe break point: nothing is held
                got.append(x)
                assert len(got) < 10
            assert sorted([p for _, _, p in events_of(got)]) == ["a0", "a1", "a2", "b0", "b1", "b2"]
            nm.close()  # and the manager is discarded
            notify(conn, chans[0], "later")
            settle(a)
            assert payloads([e for e in a.wait(0) if e]) == ["later"]
            assert b.get_event() is None

    run_sync(body())


def test_breaking_out_while_handling_events_leaves_the_rest(dsn: str, conn: Conn) -> None:

    def body() -> None:
        chans = [channel() for _ in range(3)]
        with pubsubs(dsn) as open_:
            pss = [open_(ch) for ch in chans]
            for ch in chans:
                notify(conn, ch, ch)
            settle(*pss)
            with pgcast.NotificationManager(*pss, timeout=0.2) as nm:
                first = next(nm)  # as a loop broken while handling these events
                assert first is not None
                # The next iteration delivers the other connections' events, once each.
                rest = [ps for ps in pss if ps is not first[0]]
                nm.settimeout(0)
                second = drain(nm)
            assert sorted([x[0].backend_pid for x in second if x]) == sorted(
                [ps.backend_pid for ps in rest]
            )
            assert sorted([p for _, _, p in events_of([first, *second])]) == sorted(chans)

    run_sync(body())


def test_a_manager_dropped_without_close_is_collected_quietly(dsn: str) -> None:

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            ps = open_(ch)
            nm = pgcast.NotificationManager(ps, timeout=0.1)
            assert next(nm) is None
            del nm
            gc.collect()  # filterwarnings=error: a ResourceWarning would fail the test
            ps.notify(ch, "still works")  # the manager's hook on ps is now inert
            assert payloads([e for e in ps.wait(0) if e]) == ["still works"]

    run_sync(body())


def test_close_stops_watching_and_leaves_the_pubsubs_usable(dsn: str) -> None:

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            ps = open_(ch)
            nm = pgcast.NotificationManager(ps, timeout=0.1)
            assert next(nm) is None
            nm.close()
            nm.close()  # idempotent
            with pytest.raises(pgcast.ClosedError, match="NotificationManager is closed"):
                next(nm)
            assert ps.wake_callback is None
            ps.notify(ch, "mine")
            assert payloads([e for e in ps.wait(0) if e]) == ["mine"]

    run_sync(body())


# -- the connections set ------------------------------------------------------------


def test_connections_is_a_set_changed_inside_the_loop(dsn: str, conn: Conn) -> None:

    def body() -> None:
        chans = [channel() for _ in range(3)]
        with pubsubs(dsn) as open_:
            a, b, c = [open_(ch) for ch in chans]
            nm = pgcast.NotificationManager(a, timeout=0.2)
            assert isinstance(nm.connections, set)
            assert nm.connections == {a}
            notify(conn, chans[1], "sent to b before it was added")
            added = removed = False
            got: list[str] = []
            with nm:
                for x in nm:
                    if x is None:
                        if not added:  # the seed's pattern: add at an idle event
                            nm.connections.add(b)
                            nm.connections |= {c}
                            notify(conn, chans[2], "c0")
                            notify(conn, chans[0], "a0")
                            added = True
                        elif removed:
                            break
                        continue
                    ps, events = x
                    got += payloads(events)
                    if ps is a and (not removed):
                        nm.connections.remove(a)  # while handling its events
                        notify(conn, chans[0], "a1, not delivered")
                        notify(conn, chans[1], "b1")
                        removed = True
                    assert len(got) < 10
            assert sorted(got) == ["a0", "b1", "c0", "sent to b before it was added"]
            # A discarded connection keeps what arrived for it.
            settle(a)
            assert payloads([e for e in a.wait(0) if e]) == ["a1, not delivered"]

    run_sync(body())


def test_clearing_the_set_ends_the_iteration(dsn: str) -> None:

    def body() -> None:
        with pubsubs(dsn) as open_:
            nm = pgcast.NotificationManager(open_(), open_(), timeout=0.05)
            with nm:
                count = 0
                for x in nm:
                    assert x is None
                    count += 1
                    if count == 2:
                        nm.connections.clear()  # the seed's graceful end of the loop
                    assert count < 10
            assert count == 2

    run_sync(body())


def test_replacing_the_set(dsn: str, conn: Conn) -> None:

    def body() -> None:
        chans = [channel() for _ in range(2)]
        with pubsubs(dsn) as open_:
            a, b = [open_(ch) for ch in chans]
            with pgcast.NotificationManager(a, timeout=0.2) as nm:
                nm.connections = {b}
                assert isinstance(nm.connections, set) and nm.connections == {b}
                notify(conn, chans[0], "to a")
                notify(conn, chans[1], "to b")
                got = events_of(take(nm, 1))
                assert got == [(b, chans[1], "to b")]
                assert a.wake_callback is None

    run_sync(body())


def test_a_connection_added_while_the_manager_waits_wakes_it(dsn: str) -> None:
    # Added by a task (a thread, in the sync flavour) while the manager waits.

    def body() -> None:
        chans = [channel() for _ in range(2)]
        with pubsubs(dsn) as open_:
            a, b = [open_(ch) for ch in chans]
            b.notify(chans[1], "waiting in b's inbox")
            with pgcast.NotificationManager(a) as nm:

                def add_later() -> None:
                    pause(0.2)
                    nm.connections.add(b)

                with watchdog(dsn, chans[0]):
                    adder = start_thread(add_later)
                    x = next(nm)  # timeout None: only the change can wake it this soon
                    join_thread(adder)
            assert x is not None and x[0] is b
            assert payloads(x[1]) == ["waiting in b's inbox"]

    run_sync(body())


def test_no_connections_means_no_iteration() -> None:

    def body() -> None:
        with pgcast.NotificationManager() as nm:
            assert drain(nm) == []  # timeout None, yet it does not wait
            nm.settimeout(1)
            assert drain(nm) == []

    run_sync(body())


# -- dead connections ------------------------------------------------------------------


def test_a_terminated_backend_moves_to_garbage(dsn: str, conn: Conn) -> None:

    def body() -> None:
        chans = [channel() for _ in range(2)]
        with pubsubs(dsn) as open_:
            a, b = [open_(ch) for ch in chans]
            notify(conn, chans[0], "before the end")
            settle(a)
            with pgcast.NotificationManager(a, b, timeout=0.1) as nm:
                conn.execute("SELECT pg_terminate_backend(%s)", (a.backend_pid,))
                got: list[Value] = []
                deadline = time.monotonic() + ARRIVAL
                while a not in nm.garbage:
                    got.append(next(nm))
                    assert time.monotonic() < deadline, "the dead connection was not noticed"
                assert nm.connections == {b}
                # What it had received before dying was still delivered.
                assert "before the end" in [p for _, _, p in events_of(got)]
                notify(conn, chans[1], "b lives on")
                assert events_of(take(nm, 1)) == [(b, chans[1], "b lives on")]

    run_sync(body())


def test_a_closed_connection_moves_to_garbage(dsn: str, conn: Conn) -> None:

    def body() -> None:
        chans = [channel() for _ in range(3)]
        with pubsubs(dsn) as open_:
            a, b, c = [open_(ch) for ch in chans]
            with pgcast.NotificationManager(a, b, c, timeout=5) as nm:
                notify(conn, chans[0], "a0")
                x = next(nm)
                assert x is not None and x[0] is a
                a.close()  # closed by its user inside the loop
                notify(conn, chans[1], "b0")
                got: list[Value] = []
                deadline = time.monotonic() + ARRIVAL
                while a not in nm.garbage or not got:
                    got.append(next(nm))
                    assert time.monotonic() < deadline, f"a not in garbage, or no b0: {got}"
                assert events_of(got) == [(b, chans[1], "b0")]
                assert a not in nm.connections

                def close_later() -> None:
                    pause(0.2)
                    b.close()
                    pause(0.1)
                    c.close()

                # Closed by a task (a thread, in the sync flavour) while the
                # manager waits: it wakes up, and with no good connection
                # left, the iteration ends (before any idle event, which
                # would come after 5 s).
                closer = start_thread(close_later)
                start = time.monotonic()
                rest = drain(nm)
                assert time.monotonic() - start < 4.5
                join_thread(closer)
            assert rest == []
            assert nm.garbage == {a, b, c}
            assert nm.connections == set()

    run_sync(body())


def test_events_received_before_a_close_are_still_delivered(dsn: str) -> None:
    # py-postgresql: "if the connection is closed during the loop, any
    # remaining notifications will be emitted".

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            a, b = (open_(ch), open_(channel()))
            with pgcast.NotificationManager(a, b, timeout=0.2) as nm:
                assert next(nm) is None
                a.notify(ch, "last words")  # in a's inbox: it came with the result
                a.close()
                got = until(nm, lambda _: a in nm.garbage, "the closed one was not dropped")
            assert events_of(got) == [(a, ch, "last words")]

    run_sync(body())


def test_a_closed_connection_added_goes_to_garbage(dsn: str, conn: Conn) -> None:

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            good = open_(ch)
            dead = open_()
            dead.close()
            with pgcast.NotificationManager(dead, good, timeout=0.2) as nm:
                notify(conn, ch, "fine")
                assert events_of(take(nm, 1)) == [(good, ch, "fine")]
                assert nm.garbage == {dead}
                assert nm.connections == {good}

    run_sync(body())


def test_reusing_the_descriptor_of_a_closed_connection(dsn: str, conn: Conn) -> None:
    # When a managed connection is closed, the system may give its socket's
    # number to the next connection opened; that one must be watched (in
    # asyncio, the loop's reader for the old socket must not stand for the new one).

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            old = open_()
            with pgcast.NotificationManager(old, timeout=0.1) as nm:
                assert next(nm) is None
                fd = old.fileno()
                old.close()
                for _ in range(5):  # the number goes to one of the next sockets opened
                    new = open_(ch)
                    if new.fileno() == fd:
                        break
                assert new.fileno() == fd, "the descriptor was not reused: nothing to test"
                nm.connections.add(new)
                notify(conn, ch, "on the new one")
                assert events_of(take(nm, 1)) == [(new, ch, "on the new one")]
                assert nm.garbage == {old}

    run_sync(body())


def test_the_seed_s_garbage_recovery(dsn: str, conn: Conn) -> None:

    def body() -> None:
        ch = channel()
        with pubsubs(dsn) as open_:
            ps = open_(ch)
            other = open_(channel())  # a good connection keeps the loop going

            def take_out_trash(garbage: set[pgcast.PubSub]) -> list[pgcast.PubSub]:
                return [open_(*old.listening_channels()) for old in garbage]

            with pgcast.NotificationManager(ps, other, timeout=0.1) as nm:
                conn.execute("SELECT pg_terminate_backend(%s)", (ps.backend_pid,))
                deadline = time.monotonic() + ARRIVAL
                for x in nm:
                    if x is None and nm.garbage:
                        recovered = take_out_trash(nm.garbage)
                        nm.connections.update(recovered)
                        nm.garbage.clear()
                        break
                    assert time.monotonic() < deadline, "the dead connection was not noticed"
                (fresh,) = nm.connections - {other}
                assert fresh is not ps and (not nm.garbage)
                notify(conn, ch, "after recovery")
                assert events_of(take(nm, 1)) == [(fresh, ch, "after recovery")]

    run_sync(body())


def test_iteration_ends_when_every_connection_died(dsn: str, conn: Conn) -> None:

    def body() -> None:
        with pubsubs(dsn) as open_:
            pss = [open_(channel()) for _ in range(3)]
            with pgcast.NotificationManager(*pss, timeout=5) as nm:
                for ps in pss:
                    conn.execute("SELECT pg_terminate_backend(%s)", (ps.backend_pid,))
                start = time.monotonic()
                assert drain(nm) == []  # no idle event: it ends when the last one dies
                assert time.monotonic() - start < 4.5
            assert nm.garbage == set(pss)

    run_sync(body())


# -- databases and servers ---------------------------------------------------------------


def test_connections_to_different_databases(dsn: str, conn: Conn) -> None:
    dbname = f"pgcast_nm_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE DATABASE "{dbname}"')
    other_dsn = make_conninfo(dsn, dbname=dbname)

    def body() -> None:
        ch = channel()  # the same name in both: NOTIFY is per database
        with pubsubs(dsn) as open_:
            here = open_(ch)
            there = open_(ch, dsn=other_dsn)
            with pgcast.NotificationManager(here, there, timeout=0.2) as nm:
                notify(conn, ch, "here")
                with psycopg.connect(other_dsn, autocommit=True) as other:
                    notify(other, ch, "there")
                got = events_of(take(nm, 2))
            assert sorted([(ps is here, p) for ps, _, p in got]) == [
                (False, "there"),
                (True, "here"),
            ]

    try:
        run_sync(body())
    finally:
        conn.execute(f'DROP DATABASE "{dbname}" WITH (FORCE)')


def test_two_servers_and_a_stopped_server_moves_to_garbage(dsn: str, conn: Conn) -> None:
    with EmbeddedServer() as second:

        def body() -> None:
            ch = channel()
            with pubsubs(dsn) as open_:
                here = open_(ch)
                there = open_(ch, dsn=second.dsn)
                with pgcast.NotificationManager(here, there, timeout=0.2) as nm:
                    notify(conn, ch, "from the first server")
                    with psycopg.connect(second.dsn, autocommit=True) as other:
                        notify(other, ch, "from the second server")
                    got = events_of(take(nm, 2))
                    assert sorted([(ps is here, p) for ps, _, p in got]) == [
                        (False, "from the second server"),
                        (True, "from the first server"),
                    ]
                    second.stop()  # blocks the event loop while it stops: fine here
                    deadline = time.monotonic() + ARRIVAL
                    while there not in nm.garbage:
                        assert next(nm) is None
                        assert time.monotonic() < deadline, "the stopped server was not noticed"
                    assert nm.connections == {here}
                    notify(conn, ch, "still here")
                    assert events_of(take(nm, 1)) == [(here, ch, "still here")]

        run_sync(body())


# -- reconnect=True ----------------------------------------------------------------------

FAST = pgcast.Backoff(initial=0.05, maximum=0.2)


def until(
    nm: pgcast.NotificationManager, done: Callable[[list[Value]], bool], what: str
) -> list[Value]:
    """Iterate *nm* (timeout > 0) until done(values so far); every value yielded."""
    got: list[Value] = []
    deadline = time.monotonic() + ARRIVAL
    while not done(got):
        got.append(next(nm))
        assert time.monotonic() < deadline, f"{what} within {ARRIVAL} s; got {got[-3:]}"
    return got


def markers(values: list[Value], ps: pgcast.PubSub) -> list[pgcast.Reconnected]:
    """The Reconnected markers of *ps* in *values*."""
    return [
        e for x in values if x and x[0] is ps for e in x[1] if isinstance(e, pgcast.Reconnected)
    ]


def test_reconnect_option_reconnects_instead_of_garbage(dsn: str, conn: Conn) -> None:

    def body() -> None:
        chans = [channel() for _ in range(2)]
        with pubsubs(dsn) as open_:
            a, b = [open_(ch) for ch in chans]
            old_pid = a.backend_pid
            with pgcast.NotificationManager(a, b, timeout=0.1, reconnect=True) as nm:
                conn.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
                until(nm, lambda got: bool(markers(got, a)), "no Reconnected marker for a")
                assert nm.connections == {a, b} and (not nm.garbage)
                assert a.backend_pid != old_pid
                notify(conn, chans[0], "on the new connection")
                notify(conn, chans[1], "b")
                assert sorted(events_of(take(nm, 2)), key=str) == sorted(
                    [(a, chans[0], "on the new connection"), (b, chans[1], "b")], key=str
                )

    run_sync(body())


@pytest.mark.slow
def test_reconnect_option_waits_for_a_server_to_come_back(dsn: str, conn: Conn) -> None:
    with EmbeddedServer() as second:

        def body() -> None:
            ch = channel()
            with pubsubs(dsn) as open_:
                here = open_(ch)
                there = open_(ch, dsn=second.dsn, reconnect_backoff=FAST)
                with pgcast.NotificationManager(here, there, timeout=0.1, reconnect=True) as nm:
                    second.stop()
                    # While it reconnects, the other connection keeps delivering.
                    pause(0.3)
                    notify(conn, ch, "meanwhile")
                    assert events_of(take(nm, 1)) == [(here, ch, "meanwhile")]
                    assert there in nm.connections and (not nm.garbage)
                    second.start()
                    until(nm, lambda got: bool(markers(got, there)), "no marker")
                    with psycopg.connect(second.dsn, autocommit=True) as other:
                        notify(other, ch, "back")
                    assert events_of(take(nm, 1)) == [(there, ch, "back")]

        run_sync(body())


def test_reconnect_option_gives_up_into_garbage(dsn: str, conn: Conn) -> None:
    with EmbeddedServer() as second:

        def body() -> None:
            ch = channel()
            backoff = pgcast.Backoff(initial=0.05, maximum=0.1, max_attempts=3)
            with pubsubs(dsn) as open_:
                here = open_(ch)
                there = open_(ch, dsn=second.dsn, reconnect_backoff=backoff)
                with pgcast.NotificationManager(here, there, timeout=0.1, reconnect=True) as nm:
                    second.stop()
                    until(nm, lambda _: there in nm.garbage, "the reconnect did not give up")
                    assert nm.connections == {here}
                    notify(conn, ch, "still here")
                    assert events_of(take(nm, 1)) == [(here, ch, "still here")]

        run_sync(body())


def test_reconnect_option_a_closed_connection_still_goes_to_garbage(dsn: str) -> None:

    def body() -> None:
        with pubsubs(dsn) as open_:
            a, b = [open_(channel()) for _ in range(2)]
            with pgcast.NotificationManager(a, b, timeout=0.1, reconnect=True) as nm:
                assert next(nm) is None
                a.close()
                until(nm, lambda _: a in nm.garbage, "the closed one was not dropped")
                assert nm.connections == {b}

    run_sync(body())


def reconnects(nm: pgcast.NotificationManager, before: set[threading.Thread]) -> list[object]:
    """The manager's reconnects still running: its tasks, and (sync) the
    threads named as its reconnects that were not there *before*."""
    threads = [
        t
        for t in threading.enumerate()
        if t.name == "pgcast-manager-reconnect" and t not in before and t.is_alive()
    ]
    return [*nm._reconnects, *threads]


def test_closing_the_manager_ends_its_reconnects(dsn: str) -> None:
    # The sync manager's close() used to leave its reconnect threads running:
    # they went on reconnecting the PubSub after the manager was gone.
    before = set(threading.enumerate())
    with EmbeddedServer() as second:

        def body() -> None:
            ch = channel()
            with pubsubs(dsn) as open_:
                here = open_(channel())
                there = open_(ch, dsn=second.dsn, reconnect_backoff=FAST)
                nm = pgcast.NotificationManager(here, there, timeout=0.1, reconnect=True)
                second.stop()  # every reconnect attempt is refused now
                until(nm, lambda _: bool(reconnects(nm, before)), "no reconnect started")
                until(nm, lambda got: len(got) >= 3, "no idle events")  # in its backoff
                generation = there.generation
                started = time.monotonic()
                nm.close()
                took = time.monotonic() - started
                assert not reconnects(nm, before), "a reconnect outlived the manager's close()"
                assert took < 3.0, f"close() took {took:.1f} s"
                # Nothing reconnects the PubSub behind its user's back once the
                # server is back (the thread's backoff sleeps 0.2 s at most) ...
                second.start()
                pause(1.0)
                assert there.generation == generation, "reconnected after the manager's close()"
                # ... and it is usable: lost, and restored by its next command.
                there.notify(ch, "back")
                assert there.generation == generation + 1
                got: list[object] = []
                for e in there.wait(ARRIVAL):
                    got.append(e)
                    if isinstance(e, pgcast.Event) or e is None:
                        break
                assert [type(e) for e in got] == [pgcast.Reconnected, pgcast.Event], got
                assert payloads(got[1:]) == ["back"]

        run_sync(body())


def test_closing_the_manager_ends_a_reconnect_with_no_delay(dsn: str) -> None:
    # With Backoff(initial=0) the reconnect never slept, and only a sleep saw
    # the manager's stop: the sync close() waited 5 s and left the thread
    # retrying until the backoff gave up; the asyncio one froze the event
    # loop meanwhile (a refused connection fails without giving it a turn).
    before = set(threading.enumerate())
    no_delay = pgcast.Backoff(initial=0, maximum=0, max_time=4.0)
    with TcpProxy.for_dsn(dsn) as proxy:

        def body() -> None:
            with pubsubs(dsn) as open_:
                there = open_(
                    channel(),
                    dsn=proxy.dsn(dsn),
                    reconnect_backoff=no_delay,
                    health_check_interval=0,
                )
                nm = pgcast.NotificationManager(there, timeout=0.1, reconnect=True)
                proxy.refuse()  # every attempt is refused at once now
                proxy.cut()
                until(nm, lambda _: bool(reconnects(nm, before)), "no reconnect started")
                until(nm, lambda got: len(got) >= 3, "no idle events")  # retrying
                assert there in nm.connections, "the reconnect gave up"
                started = time.monotonic()
                nm.close()
                took = time.monotonic() - started
                assert took < 2.0, f"close() took {took:.1f} s"
                assert not reconnects(nm, before), "a reconnect outlived the manager's close()"

        run_sync(body())


def test_a_loss_seen_after_close_starts_no_reconnect(dsn: str) -> None:
    # A loss the iteration reports as close() runs (from another thread, in
    # the sync flavour) must not start a reconnect that close() did not see.
    before = set(threading.enumerate())

    def body() -> None:
        with pubsubs(dsn) as open_:
            ps = open_(channel())
            nm = pgcast.NotificationManager(ps, timeout=0.1, reconnect=True)
            nm.close()
            nm._lose(ps, pgcast.ConnectionLostError("lost as the manager closed"))
            pause(0.1)
            assert not reconnects(nm, before), "a reconnect started after close()"
            assert ps.generation == 0

    run_sync(body())


# -- scale ------------------------------------------------------------------------------


def test_a_hundred_idle_connections_and_one_active(dsn: str, conn: Conn) -> None:

    def body() -> None:
        with pubsubs(dsn) as open_:
            n = spare_connections(conn, 100)  # fewer on a server with a small max_connections
            idle = [open_(channel()) for _ in range(n)]
            ch = channel()
            active = open_(ch)
            with pgcast.NotificationManager(*idle, active, timeout=0.5) as nm:
                for i in range(20):
                    notify(conn, ch, str(i))
                    assert events_of(take(nm, 1)) == [(active, ch, str(i))]
                assert len(nm.connections) == n + 1 and (not nm.garbage)
                assert len(nm._core.fds) == n + 1
                # Registered once each (the sync flavour's selector also holds
                # the manager's own wake-up pipe)...
                keys = dict(nm._waiter._selector.get_map())
                assert len(keys) == n + 2
                for i in range(5):
                    notify(conn, ch, f"again {i}")
                    assert events_of(take(nm, 1)) == [(active, ch, f"again {i}")]
                # ... and not registered again on any wake-up since.
                selected = nm._waiter._selector.get_map()
                for fd, key in keys.items():
                    assert selected[fd] is key, f"descriptor {fd} registered again"

    run_sync(body())


def test_waiting_on_idle_connections_burns_no_cpu(dsn: str) -> None:

    def body() -> None:
        with pubsubs(dsn) as open_:
            idle = [open_(channel()) for _ in range(50)]
            with pgcast.NotificationManager(*idle, timeout=1.0) as nm:
                cpu = time.process_time()
                assert next(nm) is None  # a second of waiting on 50 sockets
                used = time.process_time() - cpu
            assert used < 0.2, f"{used:.3f} s of CPU for 1 s of waiting: polling?"

    run_sync(body())
