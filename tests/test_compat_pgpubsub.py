"""pgcast.compat.pgpubsub: pgpubsub's interface, pgcast underneath.

Real server, a second session sending with raw SQL where the point is what
another client sees. pgpubsub is a sync library, so there is no asyncio twin.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import pgcast
from _eventwait import ARRIVAL_TIMEOUT
from pgcast.compat import pgpubsub
from pgcast.compat.pgpubsub import Notify

Conn = psycopg.Connection[tuple[Any, ...]]


def psycopg2_kwargs(dsn: str) -> dict[str, Any]:
    """The test DSN as pgpubsub users write it: psycopg2's ``database=``."""
    params: dict[str, Any] = conninfo_to_dict(dsn)
    params["database"] = params.pop("dbname")
    return params


def next_event(pubsub: pgpubsub.PubSub) -> Notify | pgcast.Reconnected:
    """The next event, or fail after ARRIVAL_TIMEOUT."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    for e in pubsub.events(select_timeout=0.05, yield_timeouts=True):
        if e is not None:
            return e
        if time.monotonic() > deadline:
            break
    pytest.fail(f"no event within {ARRIVAL_TIMEOUT} s")


def test_notify_is_psycopg2s_notify() -> None:
    n = Notify(9425, "test", "message 1")
    assert repr(n) == "Notify(9425, 'test', 'message 1')"
    assert (n.pid, n.channel, n.payload) == (9425, "test", "message 1")
    # psycopg2's backward-compatible tuple interface: (pid, channel)
    assert n == (9425, "test") and len(n) == 2 and n[0] == 9425 and n[1] == "test"
    pid, channel = n
    assert (pid, channel) == (9425, "test")
    assert n == Notify(9425, "test", "message 1") != Notify(9425, "test", "other")
    assert hash(n) == hash(Notify(9425, "test", "message 1"))
    with pytest.raises(AttributeError, match="immutable"):
        n.payload = "x"  # type: ignore[misc]


def test_get_event_returns_notifies_in_order_then_none(dsn: str, unique_channel: str) -> None:
    with pgpubsub.connect(**psycopg2_kwargs(dsn)) as pubsub:
        pubsub.listen(unique_channel)
        assert pubsub.get_event() is None
        pubsub.notify(unique_channel, "message 1")
        pubsub.notify(unique_channel, "message 2")
        first = next_event(pubsub)
        assert first == Notify(pubsub.conn.get_backend_pid(), unique_channel, "message 1")
        assert pubsub.get_event() == Notify(
            pubsub.conn.get_backend_pid(), unique_channel, "message 2")
        assert pubsub.get_event() is None


def test_events_yields_none_on_timeouts_only_when_asked(dsn: str, unique_channel: str) -> None:
    with pgpubsub.connect(dsn) as pubsub, psycopg.connect(dsn, autocommit=True) as other:
        pubsub.listen(unique_channel)
        assert next(pubsub.events(select_timeout=0.05, yield_timeouts=True)) is None
        threading.Timer(0.3, other.execute, (f'NOTIFY "{unique_channel}", \'x\'',)).start()
        e = next(pubsub.events(select_timeout=0.05))  # no None: waits for the event
        assert isinstance(e, Notify) and e.payload == "x"
        assert e.pid == other.info.backend_pid != pubsub.conn.get_backend_pid()


def test_echo_skips_own_notifications(dsn: str, unique_channel: str) -> None:
    # The seed's echo loop, with a bounded end.
    with pgpubsub.connect(dsn) as pubsub, psycopg.connect(dsn, autocommit=True) as other:
        pubsub.listen(unique_channel, "echo")
        my_pid = pubsub.conn.get_backend_pid()
        other.execute("SELECT pg_notify(%s, 'ping')", (unique_channel,))
        echoed = []
        for e in pubsub.events(select_timeout=0.05):
            assert isinstance(e, Notify)
            if e.pid != my_pid:
                pubsub.notify("echo", e.payload)
            else:
                echoed.append(e)
                break
        assert echoed == [Notify(my_pid, "echo", "ping")]


def test_channel_names_are_exact_and_quoted(dsn: str, conn: Conn) -> None:
    # pgpubsub sent `LISTEN <name>` unquoted: "Prices" became prices, and the
    # seed warns that a name built from user input could run SQL.
    evil = 'x"; DROP TABLE users; --'
    with pgpubsub.connect(dsn) as pubsub:
        pubsub.listen("Prices", evil)
        conn.execute("NOTIFY prices, 'folded'")
        conn.execute("""NOTIFY "Prices", 'exact'""")
        conn.execute("SELECT pg_notify(%s, 'evil')", (evil,))
        got = [next_event(pubsub), next_event(pubsub)]
        assert [(e.channel, e.payload) for e in got if isinstance(e, Notify)] == [
            ("Prices", "exact"), (evil, "evil")]
        assert pubsub.get_event() is None


def test_bad_payload_is_refused_and_the_pubsub_stays_usable(dsn: str, unique_channel: str) -> None:
    with pgpubsub.connect(dsn) as pubsub:
        pubsub.listen(unique_channel)
        with pytest.raises(pgcast.PayloadError, match="NUL"):
            pubsub.notify(unique_channel, "a\x00b")
        pubsub.notify(unique_channel, "fine")
        e = next_event(pubsub)
        assert isinstance(e, Notify) and e.payload == "fine"


def test_lost_connection_is_reconnected_with_a_marker(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    with pgpubsub.connect(dsn, reconnect_backoff=pgcast.Backoff(initial=0.01)) as pubsub:
        pubsub.listen(unique_channel)
        old = pubsub.conn.get_backend_pid()
        conn.execute("SELECT pg_terminate_backend(%s)", (old,))
        assert isinstance(next_event(pubsub), pgcast.Reconnected)
        assert pubsub.conn.get_backend_pid() != old
        conn.execute("SELECT pg_notify(%s, 'after')", (unique_channel,))
        e = next_event(pubsub)
        assert isinstance(e, Notify) and e.payload == "after"


def test_reconnect_false_raises_as_pgpubsub_did(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    with pgpubsub.connect(dsn, reconnect=False) as pubsub:
        pubsub.listen(unique_channel)
        conn.execute("SELECT pg_terminate_backend(%s)", (pubsub.conn.get_backend_pid(),))
        with pytest.raises(pgcast.ConnectionLostError):
            next_event(pubsub)


def test_unlisten_stops_and_close_ends_events(dsn: str, unique_channel: str) -> None:
    pubsub = pgpubsub.connect(dsn)
    pubsub.listen(unique_channel, "other_" + unique_channel)
    pubsub.unlisten(unique_channel)
    pubsub.notify(unique_channel, "dropped")
    pubsub.notify("other_" + unique_channel, "kept")
    e = next_event(pubsub)
    assert isinstance(e, Notify) and e.payload == "kept"
    threading.Timer(0.2, pubsub.close).start()
    assert list(pubsub.events(select_timeout=0.05)) == []
    assert pubsub.conn.closed


def test_other_threads_notify_while_one_iterates(dsn: str, unique_channel: str) -> None:
    # The README's question "Is it safe to pass pubsub objects between
    # threads?": with pgcast underneath, other threads may notify, listen and
    # unlisten while one iterates, without waiting for its select_timeout.
    with pgpubsub.connect(dsn) as pubsub:
        pubsub.listen(unique_channel)
        senders = [threading.Thread(target=pubsub.notify, args=(unique_channel, str(i)))
                   for i in range(4)]
        got: list[str] = []
        for t in senders:
            t.start()
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        for e in pubsub.events(select_timeout=5):  # 5 s slices: no sender waits for one
            assert isinstance(e, Notify)
            got.append(e.payload)
            if len(got) == 4 or time.monotonic() > deadline:
                break
        for t in senders:
            t.join(ARRIVAL_TIMEOUT)
        assert sorted(got) == ["0", "1", "2", "3"]
