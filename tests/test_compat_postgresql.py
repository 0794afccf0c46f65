"""pgcast.compat.postgresql: py-postgresql's notification interface.

``open()`` and its PQ IRIs; the connection's names; and py-postgresql's
"Summary of Characteristics" of notification management, one test each
(``test_characteristic_N``), through the compat module against a real
server. py-postgresql is a sync library, so there is no asyncio twin.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import pgcast
from _eventwait import ARRIVAL_TIMEOUT
from pgcast.compat import postgresql
from pgcast.compat.postgresql._iri import libpq_params, parse_iri
from pgcast.compat.postgresql.notifyman import NotificationManager

Conn = psycopg.Connection[tuple[Any, ...]]


def iri_of(dsn: str) -> str:
    """The test server as a PQ IRI, the way py-postgresql users write it."""
    p = conninfo_to_dict(dsn)
    auth = quote(str(p.get("user", "")))
    if p.get("password"):
        auth += ":" + quote(str(p["password"]))
    host = str(p.get("host", "127.0.0.1"))
    netloc = (f"[unix:{host.replace('/', ':')}:.s.PGSQL.{p.get('port', 5432)}]"
              if host.startswith("/") else f"{host}:{p.get('port', 5432)}")
    return f"pq://{auth}@{netloc}/{p['dbname']}"


@pytest.fixture
def opener(dsn: str) -> Iterator[Callable[..., postgresql.Connection]]:
    """``opener(**kw)`` opens a compat connection to the test server; all are
    closed after the test."""
    opened: list[postgresql.Connection] = []

    def open_(**kw: Any) -> postgresql.Connection:
        db = postgresql.open(iri_of(dsn), **kw)
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()


class Watchdog:
    """Closes *connections* after *timeout* s unless cancelled, so that a loop
    that should have ended does end, and the test then fails loudly."""

    def __init__(self, *connections: pgcast.PubSub, timeout: float = ARRIVAL_TIMEOUT) -> None:
        self.fired = False

        def fire() -> None:
            self.fired = True
            for c in connections:
                c.close()

        self._timer = threading.Timer(timeout, fire)
        self._timer.start()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        assert not self.fired, "the loop did not end by itself: the watchdog ended it"


def kill(conn: Conn, db: postgresql.Connection) -> None:
    """Terminate *db*'s server session from another one."""
    conn.execute("SELECT pg_terminate_backend(%s)", (db.backend_id,))


# -- open() and PQ IRIs --------------------------------------------------------


def test_parse_iri_as_py_postgresql() -> None:
    assert parse_iri("pq://u:p%40x@[::1]:5433/db?search_path=a&[sslmode]=disable#s1,s2") == {
        "user": "u", "password": "p@x", "host": "::1", "port": "5433", "database": "db",
        "sslmode": "disable", "settings": {"search_path": "s1,s2"},
    }
    assert parse_iri("localhost/postgres") == {"host": "localhost", "database": "postgres"}
    assert parse_iri("postgresql://h") == {"host": "h"}
    assert parse_iri("pq://[unix:/run:pg:.s.PGSQL.6000]/d") == {
        "unix": "/run/pg/.s.PGSQL.6000", "database": "d"}
    with pytest.raises(ValueError, match="not a PQ IRI"):
        parse_iri("mysql://h/d")


def test_libpq_params_keywords_override_the_iri() -> None:
    assert libpq_params("pq://a@h:1/d?x=1", {"user": "b", "database": "e", "settings": {
        "y": "two words"}}) == {
        "user": "b", "host": "h", "port": "1", "dbname": "e", "options": r"-c x=1 -c y=two\ words"}
    assert libpq_params("pq://h:1/d", {"unix": "/tmp/.s.PGSQL.7"}) == {
        "dbname": "d", "host": "/tmp", "port": "7"}
    assert libpq_params(None, {"sslrootcrtfile": "ca.pem", "settings": [("a", "b")]}) == {
        "sslrootcert": "ca.pem", "options": "-c a=b"}
    with pytest.raises(ValueError, match=r"\.s\.PGSQL\.<port>"):
        libpq_params(None, {"unix": "/tmp/socket"})


def test_open_an_iri_with_settings(dsn: str) -> None:
    iri = iri_of(dsn) + "?application_name=compat%20app&[connect_timeout]=5#myschema,public"
    with postgresql.open(iri) as db:
        assert isinstance(db, pgcast.PubSub) and not db.closed
        info = db.connection.info
        assert info.parameter_status("application_name") == "compat app"
        assert db.connection.execute("SHOW search_path").fetchone() == ("myschema,public",)
    assert db.closed


def test_open_keywords_and_refusals(dsn: str) -> None:
    p = conninfo_to_dict(dsn)
    with postgresql.open(host=p.get("host"), port=p.get("port"), user=p.get("user"),
                         password=p.get("password"), database=p["dbname"]) as db:
        assert db.connection.info.dbname == p["dbname"]
    with pytest.raises(ValueError, match="connector"):
        postgresql.open("&" + iri_of(dsn))
    with pytest.raises(pgcast.ConnectError):
        postgresql.open(iri_of(dsn) + "_no_such_database")


# -- the connection's names -------------------------------------------------------


def test_listen_unlisten_listening_channels(opener: Callable[..., postgresql.Connection]) -> None:
    db = opener()
    db.listen("a", "B c")
    assert set(db.listening_channels()) == {"a", "B c"}
    db.unlisten("a")
    assert set(db.listening_channels()) == {"B c"}


def test_notify_takes_py_postgresql_arguments(
    opener: Callable[..., postgresql.Connection],
) -> None:
    db = opener()
    db.listen("n1", "n2", "n3")
    db.notify("n1", ("n2", "payload 2"), n3="payload 3")
    got = list(db.iternotifies(0))
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while len(got) < 3 and time.monotonic() < deadline:
        got += list(db.iternotifies(0))
    me = db.backend_id
    assert got == [("n1", "", me), ("n2", "payload 2", me), ("n3", "payload 3", me)]
    db.notify()  # nothing to send: nothing sent, no error
    with pytest.raises(pgcast.InvalidChannelError):
        db.notify("x" * 64)
    assert db.listening_channels() == {"n1", "n2", "n3"}  # still usable


def test_wait_is_iternotifies(opener: Callable[..., postgresql.Connection]) -> None:
    # The name py-postgresql's 1.0 documentation gives it.
    db = opener()
    db.listen("w")
    db.notify("w")
    with Watchdog(db):
        for x in db.wait():
            assert x == ("w", "", db.backend_id)
            break
        for x in db.wait(0.05):
            assert x is None
            break


def test_closed_during_the_loop_remaining_notifications_come_first(
    opener: Callable[..., postgresql.Connection],
) -> None:
    # "if the connection is closed during the loop, any remaining notifications
    # *will* be emitted prior to the loop ending"
    db = opener()
    db.listen("c")
    db.notify(("c", "1"), ("c", "2"), ("c", "3"))  # one transaction: one batch
    got = []
    with Watchdog(db):
        for _channel, payload, _pid in db.iternotifies():
            got.append(payload)
            db.close()
    assert got == ["1", "2", "3"] and db.closed


# -- Summary of Characteristics -------------------------------------------------


def test_characteristic_1_the_iterator_continues_until_the_connections_die(
    opener: Callable[..., postgresql.Connection], conn: Conn
) -> None:
    """The iterator will continue until the connections die."""
    db1, db2 = opener(), opener()
    for db in (db1, db2):
        db.listen("c1")
    nm = NotificationManager(db1, db2, timeout=0.05)
    idles = 0
    with Watchdog(db1, db2):
        for x in nm:
            if x is None:
                idles += 1
                if idles == 3:
                    kill(conn, db1)  # one dies: the iterator goes on
                if idles == 6:
                    assert nm.connections == {db2}
                    kill(conn, db2)  # the last dies: the iterator ends
    assert idles >= 6 and nm.connections == set() and nm.garbage == {db1, db2}
    # the single-connection iterator alike, ending silently
    db3 = opener()
    db3.listen("c1")
    seen = []
    with Watchdog(db3):
        for x in db3.iternotifies(0.05):
            seen.append(x)
            if len(seen) == 2:
                kill(conn, db3)
    assert seen[:2] == [None, None] and db3.closed


def test_characteristic_2_yielded_objects_are_none_triples_or_pairs(
    opener: Callable[..., postgresql.Connection],
) -> None:
    """Objects yielded by the iterator are either None, an "idle event", or an
    individual notification triple if using db.iternotifies(), or a
    (db, notifies) pair if using the base NotificationManager."""
    db = opener()
    db.listen("c2")
    db.notify(("c2", "a"), ("c2", "b"))
    items = []
    with Watchdog(db):
        for x in db.iternotifies(0.1):
            items.append(x)
            if x is None:
                break
    assert items == [("c2", "a", db.backend_id), ("c2", "b", db.backend_id), None]
    db.notify(("c2", "c"))
    pairs = []
    with Watchdog(db):
        for x in NotificationManager(db, timeout=0.1):
            pairs.append(x)
            if x is None:
                break
    assert pairs == [(db, [("c2", "c", db.backend_id)]), None]


def test_characteristic_3_dead_or_failing_connections_go_to_garbage(
    opener: Callable[..., postgresql.Connection], conn: Conn
) -> None:
    """When a connection dies or raises an exception, it will be removed from
    the nm.connections set and added to the nm.garbage set."""
    db1, db2, db3 = opener(), opener(), opener()
    for db in (db1, db2, db3):
        db.listen("c3")
    nm = NotificationManager(db1, db2, db3, timeout=0.05)
    kill(conn, db1)  # dies
    db2.close()  # closed by its user
    nm.connections.add(...)  # type: ignore[arg-type]  # not a connection: raises
    with Watchdog(db1, db2, db3):
        for x in nm:
            if x is None:
                break
    assert nm.connections == {db3}
    assert nm.garbage == {db1, db2, ...}
    conn.execute("NOTIFY c3, 'still'")
    with Watchdog(db3):
        for x in nm:
            if x is not None:
                assert x == (db3, [("c3", "still", conn.info.backend_pid)])
                break


def test_characteristic_4_nothing_is_held_during_an_idle_event(
    opener: Callable[..., postgresql.Connection], conn: Conn
) -> None:
    """The NotificationManager instance will not hold any notifications during
    an idle event. (Idle events offer a break point in which the manager may
    be discarded.)"""
    db = opener()
    db.listen("c4")
    for i in range(5):
        conn.execute(f"NOTIFY c4, '{i}'")
    got: list[str] = []
    nm = NotificationManager(db, timeout=0.2)
    with Watchdog(db):
        for x in nm:
            if x is None:
                break  # everything sent before was yielded before this idle event
            got += [payload for _, payload, _ in x[1]]
    assert got == ["0", "1", "2", "3", "4"]
    del nm  # discarded at the idle event
    conn.execute("NOTIFY c4, 'after'")
    nm2 = NotificationManager(db, timeout=0.2)
    with Watchdog(db):
        x = next(iter(nm2))
        while x is None:
            x = next(iter(nm2))
    assert x == (db, [("c4", "after", conn.info.backend_pid)])


def test_characteristic_5_zero_timeout_yields_what_is_pending_and_ends(
    opener: Callable[..., postgresql.Connection], conn: Conn
) -> None:
    """A timeout of zero will cause the iterator to only yield the events that
    are pending right now, and promptly end. However, the same manager object
    may be used again."""
    db1, db2 = opener(), opener()
    db1.listen("c5")
    db2.listen("c5")
    nm = NotificationManager(db1, db2)
    nm.settimeout(0)
    assert nm.gettimeout() == 0
    assert list(nm) == []  # nothing pending: ends at once, no idle event
    conn.execute("NOTIFY c5, 'one'")
    pairs: list[Any] = []
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while len(pairs) < 2 and time.monotonic() < deadline:
        pairs += list(nm)  # the same manager, again
    pid = conn.info.backend_pid
    assert sorted(pairs, key=lambda p: p[0].backend_id) == sorted(
        [(db1, [("c5", "one", pid)]), (db2, [("c5", "one", pid)])],
        key=lambda p: p[0].backend_id)
    assert None not in pairs
    assert list(nm) == []
    assert list(db1.iternotifies(0)) == []


def test_characteristic_6_a_notification_is_a_channel_payload_pid_tuple(
    opener: Callable[..., postgresql.Connection], conn: Conn
) -> None:
    """A notification triple is a tuple consisting of (channel, payload, pid)."""
    db = opener()
    db.listen("c6")
    conn.execute("NOTIFY c6, 'p'")
    with Watchdog(db):
        x = next(db.iternotifies())
    assert isinstance(x, tuple) and len(x) == 3
    channel, payload, pid = x
    assert (channel, payload, pid) == ("c6", "p", conn.info.backend_pid)


def test_characteristic_7_connections_added_and_removed_at_any_time(
    opener: Callable[..., postgresql.Connection], conn: Conn
) -> None:
    """Connections may be added and removed from the nm.connections set at any
    time."""
    db1, db2 = opener(), opener()
    db1.listen("c7")
    db2.listen("c7")
    nm = NotificationManager(db1)  # timeout None: blocks, no idle events

    def from_another_thread() -> None:
        nm.connections.add(db2)  # wakes the blocked manager
        conn.execute("NOTIFY c7, 'both'")

    threading.Timer(0.2, from_another_thread).start()
    seen: dict[postgresql.Connection, list[Any]] = {}
    with Watchdog(db1, db2):
        for db, notifies in nm:
            seen.setdefault(db, []).extend(notifies)
            if len(seen) == 2:
                nm.connections.remove(db1)  # inside the loop
                break
    assert set(seen) == {db1, db2}
    threading.Timer(0.2, nm.connections.clear).start()
    with Watchdog(db1, db2):
        assert list(nm) == []  # ends once the set is emptied from the other thread
    assert nm.garbage == set() and not db1.closed and not db2.closed


def test_listen_and_notify_agree_on_exact_names(
    opener: Callable[..., postgresql.Connection], conn: Conn
) -> None:
    # py-postgresql quoted NOTIFY but not LISTEN: listen("Prices") heard
    # `prices`, never notify("Prices"); and a name with `;` ran as SQL.
    db = opener()
    evil = "x; DROP TABLE users"
    db.listen("Prices", evil)
    assert db.listening_channels() == {"Prices", evil}
    conn.execute("NOTIFY prices, 'folded'")  # another client, raw SQL: not this channel
    db.notify(("Prices", "exact"), (evil, "evil"))
    conn.execute("""NOTIFY "Prices", 'raw'""")
    got: list[Any] = []
    with Watchdog(db):
        for x in db.iternotifies(0.05):
            if x is None and len(got) >= 3:
                break
            if x is not None:
                got.append(x[:2])
    assert got == [("Prices", "exact"), (evil, "evil"), ("Prices", "raw")]


def test_closed_in_the_manager_loop_what_it_received_still_comes(
    opener: Callable[..., postgresql.Connection],
) -> None:
    # The same rule for the NotificationManager: a connection closed while the
    # loop handles another one's notifications still has its own handed out.
    db1, db2 = opener(), opener()
    for db in (db1, db2):
        db.listen(f"cm{db.backend_id}")
        db.notify((f"cm{db.backend_id}", f"from {db.backend_id}"))  # in its own inbox already
    nm = NotificationManager(db1, db2, timeout=0.05)
    pairs: list[Any] = []
    with Watchdog(db1, db2):
        for x in nm:
            if x is None:
                break
            pairs.append(x)
            if len(pairs) == 1:
                (db2 if x[0] is db1 else db1).close()
    first, other = pairs[0][0], ({db1, db2} - {pairs[0][0]}).pop()
    assert [(db, [p for _, p, _ in events]) for db, events in pairs] == [
        (first, [f"from {first.backend_id}"]), (other, [f"from {other.backend_id}"])]
    assert other.closed and nm.garbage == {other} and nm.connections == {first}


def test_open_with_reconnect_notify_comes_back(
    opener: Callable[..., postgresql.Connection], conn: Conn
) -> None:
    db = opener(reconnect=True, reconnect_backoff=pgcast.Backoff(initial=0.01))
    db.listen("rc")
    old = db.backend_id
    kill(conn, db)
    # pg_terminate_backend() only signals: whether the end reaches this
    # client before the next command is sent is a race. If it has, the
    # command reconnects first (LISTENing again) and is sent; if not, the
    # command was on the wire and pgcast's rule says it may or may not have
    # run (never retried). Either way the next one runs on a new session.
    try:
        db.notify(("rc", "lost"))
    except pgcast.ConnectionLostError as exc:
        assert "may or may not have run" in str(exc), exc
    db.notify(("rc", "after"))
    assert db.backend_id != old and not db.closed
    with Watchdog(db):
        got = list(db.iternotifies(0))
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        while not any(isinstance(x, pgcast.Event) for x in got) and time.monotonic() < deadline:
            got += list(db.iternotifies(0))
    assert ("rc", "after", db.backend_id) in got
