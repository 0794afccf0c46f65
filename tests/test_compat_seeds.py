"""Every code example of the seed documents, run through pgcast.compat.

The documents are in ``tests/data/seeds/`` verbatim: py-postgresql's
notification chapter (001; it uses ``db.iternotifies()``), the commit that
wrote its first version (003, a diff; ``db.wait()``), and pgpubsub's README
(000). Each example runs exactly as written except its import line
(``postgresql.notifyman`` -> ``pgcast.compat.postgresql.notifyman``,
``import pgpubsub`` -> ``from pgcast.compat import pgpubsub``); the test
supplies what the example takes as given (``db``, ``db1``..., ``nm``, a
sender on another connection, ``take_out_trash``) and checks what it should
have done. Loops end by the examples' own ``break``s, idle events, or by
the connections closing ("the iterator will continue until the connections
die"); a watchdog closes the connections after a bound, failing the test.

Where a document itself is broken, the test says so and checks that pgcast
fails the same way py-postgresql would:

* 003 was rendered without indentation: its compound statements are run with
  the indentation of the same statement in 001, after checking that they are
  the same statement (``shape``).
* 001/003's garbage example falls through from its idle branch to
  ``db, notifies = x`` with ``x`` None (TypeError); the last one's ``x in
  None`` is a TypeError too (a typo for ``is``, also run corrected).
* pgpubsub's README lost its inline code in the seed (``for e in`` without
  ``pubsub.events():``) and is Python 2 (``print e.payload``): those three
  examples are run completed, the completion spelled out in :data:`COMPLETED`
  next to the verbatim fragment.
"""

from __future__ import annotations

import io
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgcast
from _eventwait import ARRIVAL_TIMEOUT
from _seed_examples import Statement, doctest_blocks, read_seed, shape
from pgcast.compat import pgpubsub, postgresql
from pgcast.compat.postgresql.notifyman import NotificationManager

Conn = psycopg.Connection[tuple[Any, ...]]

#: The one line each example may change.
IMPORTS = {
    "from postgresql.notifyman import NotificationManager":
        "from pgcast.compat.postgresql.notifyman import NotificationManager",
    "import pgpubsub": "from pgcast.compat import pgpubsub",
}

NOTIFYMAN = doctest_blocks(read_seed("001_py_postgresql_notifyman.txt"))
DRIVER_DIFF = doctest_blocks(read_seed(
    "003_py_postgresql_driver_diff.txt", diff=True, start="Notification Management\n===="))


def reindented(block_003: list[Statement], block_001: list[Statement]) -> list[Statement]:
    """003's block with the indentation its rendering lost, from 001's same
    block (``iternotifies`` there is ``wait`` here); fails unless every
    statement is the same one."""
    assert len(block_003) == len(block_001)
    out = []
    for s3, s1 in zip(block_003, block_001, strict=True):
        source = s1.source.replace("iternotifies", "wait")
        assert shape(s3.source) == shape(source), (s3.source, source)
        out.append(Statement(s3.source if "\n" not in s3.source else source, s3.want))
    return out


#: The py-postgresql examples, by name: (001's, 003's rendition).
PY_POSTGRESQL = {
    name: [NOTIFYMAN[i], reindented(DRIVER_DIFF[i], NOTIFYMAN[i])]
    for i, name in enumerate([
        "single_connection", "idle_break", "many_connections", "add_at_idle",
        "garbage", "clear_to_end", "zero_timeout_db", "zero_timeout_nm",
    ])
}
SEED_IDS = ["001-iternotifies", "003-wait"]


def run(block: list[Statement], ns: dict[str, Any], out: io.StringIO | None = None) -> str:
    """Run *block*'s statements in *ns* as the interactive prompt does
    (expression values printed), only the import line changed; return what
    was printed."""
    out = out if out is not None else io.StringIO()
    for statement in block:
        source = IMPORTS.get(statement.source, statement.source)
        if all(line.lstrip().startswith("#") for line in source.splitlines() if line.strip()):
            continue  # a comment alone, as the prompt skips it
        with redirect_stdout(out):
            exec(compile(source + "\n", "<seed example>", "single"), ns)
    return out.getvalue()


class Watchdog:
    """Closes *connections* after *timeout* s unless the block ended first;
    the test then fails, saying the loop did not end by itself."""

    def __init__(self, *connections: Any, timeout: float = ARRIVAL_TIMEOUT) -> None:
        self.fired = False

        def fire() -> None:
            self.fired = True
            for c in connections:
                c.close()

        self._timer = threading.Timer(timeout, fire)

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        assert not self.fired, "the example's loop did not end: the watchdog closed it"


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll *condition* (a test helper, on another thread) for ARRIVAL_TIMEOUT."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {ARRIVAL_TIMEOUT} s")
        time.sleep(0.01)


@pytest.fixture
def opener(dsn: str) -> Iterator[Callable[..., postgresql.Connection]]:
    """Opens py-postgresql-style connections to the test server (via a PQ
    IRI); all are closed after the test."""
    p = conninfo_to_dict(dsn)
    iri = f"pq://{p.get('user', '')}@{p.get('host')}:{p.get('port', 5432)}/{p['dbname']}"
    opened: list[postgresql.Connection] = []

    def open_(**kw: Any) -> postgresql.Connection:
        db = postgresql.open(iri, password=p.get("password"), **kw)
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()


def listening(opener: Callable[..., postgresql.Connection], n: int) -> list[Any]:
    """*n* connections listening to ``rabbits``."""
    dbs = [opener() for _ in range(n)]
    for db in dbs:
        db.listen("rabbits")
    return dbs


# -- py-postgresql ---------------------------------------------------------------


def test_the_seeds_have_the_examples_tested() -> None:
    assert len(NOTIFYMAN) == 8 and len(DRIVER_DIFF) == 8
    assert "postgresql.notifyman" in NOTIFYMAN[2][0].source


@pytest.mark.parametrize("seed", [0, 1], ids=SEED_IDS)
def test_single_connection(seed: int, opener: Callable[..., postgresql.Connection]) -> None:
    db = opener()
    ns: dict[str, Any] = {"db": db}
    with Watchdog(db):
        run(PY_POSTGRESQL["single_connection"][seed], ns)  # its asserts pass
    assert (ns["channel"], ns["payload"], ns["pid"]) == ("for_rabbits", "", db.backend_id)


@pytest.mark.parametrize("seed", [0, 1], ids=SEED_IDS)
def test_idle_break(seed: int, opener: Callable[..., postgresql.Connection]) -> None:
    db = opener()
    db.listen("for_rabbits")
    ns: dict[str, Any] = {"db": db}
    with Watchdog(db):
        run(PY_POSTGRESQL["idle_break"][seed], ns)
    assert ns["x"] is None


@pytest.mark.parametrize("seed", [0, 1], ids=SEED_IDS)
def test_many_connections(
    seed: int, opener: Callable[..., postgresql.Connection], conn: Conn
) -> None:
    db1, db2, dbN = listening(opener, 3)
    conn.execute("NOTIFY rabbits, 'one'")
    conn.execute("NOTIFY rabbits, 'two'")
    ns: dict[str, Any] = {"db1": db1, "db2": db2, "dbN": dbN}
    with Watchdog(db1, db2, dbN):
        run(PY_POSTGRESQL["many_connections"][seed], ns)  # breaks at its first idle event
    nm = ns["nm"]
    assert isinstance(nm, pgcast.NotificationManager) and nm.gettimeout() == 2
    assert nm.connections == {db1, db2, dbN}
    assert nm.garbage == {...}  # the `...` of `NotificationManager(db1, db2, ..., dbN)`
    assert ns["db"] in {db1, dbN, db2} and ns["x"] is None
    assert ns["notifies"] == [("rabbits", "one", conn.info.backend_pid),
                              ("rabbits", "two", conn.info.backend_pid)]
    # Every notification was handed out before the idle event.
    assert list(NotificationManager(db1, db2, dbN, timeout=0)) == []


@pytest.mark.parametrize("seed", [0, 1], ids=SEED_IDS)
def test_add_at_idle(seed: int, opener: Callable[..., postgresql.Connection]) -> None:
    db1, db2, db3 = listening(opener, 3)
    nm = NotificationManager(db1, db2, timeout=0.05)
    ns: dict[str, Any] = {"nm": nm}

    def meanwhile() -> None:  # the example never ends by itself: its connections die
        wait_for(lambda: "y" in ns, "the example's loop started")
        ns["y"].append(db3)
        wait_for(lambda: db3 in nm.connections, "y[0] added at an idle event")
        for db in (db1, db2, db3):
            db.close()

    helper = threading.Thread(target=meanwhile)
    helper.start()
    with Watchdog(db1, db2, db3):
        run(PY_POSTGRESQL["add_at_idle"][seed], ns)
    helper.join(ARRIVAL_TIMEOUT)
    assert ns["y"] == [] and nm.connections == set() and nm.garbage == {db1, db2, db3}


@pytest.mark.parametrize("seed", [0, 1], ids=SEED_IDS)
def test_garbage(
    seed: int, opener: Callable[..., postgresql.Connection], conn: Conn
) -> None:
    db1, db2 = listening(opener, 2)
    nm = NotificationManager(db1, db2, timeout=0.2)
    trash: list[set[Any]] = []

    def take_out_trash(garbage: set[Any]) -> list[postgresql.Connection]:
        trash.append(set(garbage))
        return listening(opener, len(garbage))

    ns: dict[str, Any] = {"nm": nm, "take_out_trash": take_out_trash}
    conn.execute("NOTIFY rabbits, 'before'")
    conn.execute("SELECT pg_terminate_backend(%s, 5000)", (db2.backend_id,))
    with Watchdog(db1, db2), pytest.raises(TypeError, match="cannot unpack non-iterable NoneType"):
        # As written, the idle branch goes on to `db, notifies = x` with x None.
        run(PY_POSTGRESQL["garbage"][seed], ns)
    assert ns["notifies"] == [("rabbits", "before", conn.info.backend_pid)]
    assert trash == [{db2}]  # the dead connection was in garbage at the idle event
    (recovered,) = ns["recovered"]
    assert nm.connections == {db1, recovered} and nm.garbage == set()


@pytest.mark.parametrize("seed", [0, 1], ids=SEED_IDS)
def test_clear_to_end_as_written(
    seed: int, opener: Callable[..., postgresql.Connection]
) -> None:
    (db1,) = listening(opener, 1)
    ns: dict[str, Any] = {"nm": NotificationManager(db1, timeout=0.05), "done_listening": True}
    with Watchdog(db1), pytest.raises(TypeError, match="argument of type 'NoneType' is not"):
        run(PY_POSTGRESQL["clear_to_end"][seed], ns)  # `x in None`


@pytest.mark.parametrize("seed", [0, 1], ids=SEED_IDS)
def test_clear_to_end_corrected(
    seed: int, opener: Callable[..., postgresql.Connection]
) -> None:
    (db1,) = listening(opener, 1)
    nm = NotificationManager(db1, timeout=0.05)
    ns: dict[str, Any] = {"nm": nm, "done_listening": True}
    (loop,) = PY_POSTGRESQL["clear_to_end"][seed]
    assert "x in None" in loop.source
    with Watchdog(db1):
        run([Statement(loop.source.replace("x in None", "x is None"))], ns)
    assert nm.connections == set() and nm.garbage == set() and not db1.closed


@pytest.mark.parametrize("seed", [0, 1], ids=SEED_IDS)
def test_zero_timeout_db(seed: int, opener: Callable[..., postgresql.Connection]) -> None:
    (db,) = listening(opener, 1)
    db.notify(("rabbits", "1"), ("rabbits", "2"))
    ns: dict[str, Any] = {"db": db}
    with Watchdog(db):
        run(PY_POSTGRESQL["zero_timeout_db"][seed], ns)
    assert ns["notifies"] == [("rabbits", "1", db.backend_id), ("rabbits", "2", db.backend_id)]


@pytest.mark.parametrize("seed", [0, 1], ids=SEED_IDS)
def test_zero_timeout_nm(seed: int, opener: Callable[..., postgresql.Connection]) -> None:
    db1, db2 = listening(opener, 2)
    db1.notify(("rabbits", "a"))
    # A zero timeout polls what is pending *now*: wait (bounded) until the
    # server's signal reached db2's socket, or the test races the delivery.
    readable, _, _ = select.select([db2.fileno()], [], [], 10)
    assert readable, "db2 never received the notification"
    ns: dict[str, Any] = {"nm": NotificationManager(db1, db2, timeout=2)}
    with Watchdog(db1, db2):
        run(PY_POSTGRESQL["zero_timeout_nm"][seed], ns)
    pid = db1.backend_id
    assert sorted(ns["db_notifies"], key=lambda pair: pair[0] is db2) == [
        (db1, [("rabbits", "a", pid)]), (db2, [("rabbits", "a", pid)])]


# -- pgpubsub --------------------------------------------------------------------

PGPUBSUB_README = read_seed("000_pgpubsub_readme.txt")

#: pgpubsub's examples whose inline code the seed lost, as found in it, and
#: as run: ``pubsub.events(...)`` and ``e.pid`` restored, ``print`` a call.
COMPLETED = {
    "for_events": (
        "for e in\n    print e.payload",
        "for e in pubsub.events():\n    print(e.payload)",
    ),
    "keepalive": (
        "    for e in\n        if e is None:",
        "for e in pubsub.events(yield_timeouts=True):\n    if e is None:\n"
        "        send_keepalive()",
    ),
    "echo": (
        "    my_pid = pubsub.conn.get_backend_pid()\n    for e in\n        sender_pid =\n"
        "        if sender_pid != my_pid:\n            pubsub.notify('echo', e.payload)",
        "my_pid = pubsub.conn.get_backend_pid()\nfor e in pubsub.events():\n"
        "    sender_pid = e.pid\n    if sender_pid != my_pid:\n"
        "        pubsub.notify('echo', e.payload)",
    ),
}


@pytest.fixture
def test_db(dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The README connects to database ``test`` as ``postgres`` on the default
    server: the ``PG*`` variables point at the test server, and ``test`` is
    created if that server lacks it (the embedded one). Returns its DSN."""
    p = conninfo_to_dict(dsn)
    for key, var in (("host", "PGHOST"), ("port", "PGPORT"), ("password", "PGPASSWORD")):
        if p.get(key):
            monkeypatch.setenv(var, str(p[key]))
    with psycopg.connect(dsn, autocommit=True) as c:
        if c.execute("SELECT 1 FROM pg_database WHERE datname = 'test'").fetchone() is None:
            c.execute("CREATE DATABASE test")
    return make_conninfo(dsn, dbname="test", user="postgres")


def statement(source: str) -> list[Statement]:
    """*source* as the prompt takes it: a statement per unindented line, with
    the indented lines after it."""
    out: list[Statement] = []
    for line in source.split("\n"):
        if line.startswith(" ") and out:
            out[-1].source += "\n" + line
        else:
            out.append(Statement(line))
    return out


def test_pgpubsub_examples_are_verbatim() -> None:
    for verbatim in (
        "import pgpubsub\npubsub = pgpubsub.connect(user='postgres', database='test')",
        "pubsub.notify('test_channel', 'some message')",
        *(found for found, _ in COMPLETED.values()),
    ):
        assert verbatim in PGPUBSUB_README


def test_pgpubsub_connect(test_db: str) -> None:
    ns: dict[str, Any] = {}
    run(statement("import pgpubsub\npubsub = pgpubsub.connect(user='postgres', database='test')"),
        ns)
    with ns["pubsub"] as pubsub:
        assert isinstance(pubsub, pgpubsub.PubSub)
        assert pubsub.pubsub.connection.info.dbname == "test"


def test_pgpubsub_notify(test_db: str) -> None:
    with pgcast.connect(test_db) as listener, pgpubsub.connect(test_db) as pubsub:
        listener.listen("test_channel")
        run(statement("pubsub.notify('test_channel', 'some message')"), {"pubsub": pubsub})
        got = next(e for e in listener.events(select_timeout=ARRIVAL_TIMEOUT, yield_timeouts=True))
        assert got == ("test_channel", "some message", pubsub.conn.get_backend_pid())


def test_pgpubsub_get_event_doctest(test_db: str) -> None:
    # The README's >>> session, its printed output compared (the pid is the
    # session's own: it notifies itself).
    (block,) = doctest_blocks(PGPUBSUB_README)
    with pgpubsub.connect(test_db) as pubsub:
        out = run(block, {"pubsub": pubsub})
        pid = pubsub.conn.get_backend_pid()
    wants = "".join(line + "\n" for s in block for line in s.want)
    assert wants == "Notify(9425, 'test', 'message 1')\nNotify(9425, 'test', 'message 2')\n"
    assert out == wants.replace("9425", str(pid))


def test_pgpubsub_for_events(test_db: str) -> None:
    with pgpubsub.connect(test_db) as pubsub, psycopg.connect(test_db, autocommit=True) as other:
        pubsub.listen("test_channel")
        out = io.StringIO()

        def meanwhile() -> None:  # the loop has no break: it ends when closed
            other.execute("NOTIFY test_channel, 'first'")
            other.execute("NOTIFY test_channel, 'second'")
            wait_for(lambda: "second" in out.getvalue(), "both printed")
            pubsub.close()

        helper = threading.Thread(target=meanwhile)
        helper.start()
        with Watchdog(pubsub):
            run(statement(COMPLETED["for_events"][1]), {"pubsub": pubsub}, out)
        helper.join(ARRIVAL_TIMEOUT)
    assert out.getvalue() == "first\nsecond\n"


@pytest.mark.slow
def test_pgpubsub_keepalive(test_db: str) -> None:
    # select_timeout's default of 5 s, as the README says: one quiet slice.
    with pgpubsub.connect(test_db) as pubsub:
        pubsub.listen("test_channel")
        kept: list[float] = []

        def send_keepalive() -> None:
            kept.append(time.monotonic())
            pubsub.close()  # ends the loop at its idle event

        start = time.monotonic()
        with Watchdog(pubsub, timeout=5 + ARRIVAL_TIMEOUT):
            run(statement(COMPLETED["keepalive"][1]),
                {"pubsub": pubsub, "send_keepalive": send_keepalive})
    assert len(kept) == 1 and kept[0] - start >= 4.9


def test_pgpubsub_echo(test_db: str) -> None:
    with pgpubsub.connect(test_db) as pubsub, pgcast.connect(test_db) as other:
        pubsub.listen("test", "echo")  # the seed lost which channels; its own echo comes back
        other.listen("echo")
        ns: dict[str, Any] = {"pubsub": pubsub}
        echoes: list[Any] = []

        def meanwhile() -> None:
            other.notify("test", "hello")
            deadline = time.monotonic() + ARRIVAL_TIMEOUT
            for e in other.events(select_timeout=0.05, yield_timeouts=True):
                if isinstance(e, pgcast.Event):
                    echoes.append(e)
                    break
                if time.monotonic() > deadline:
                    break
            # The loop has no break: it ends when closed, here once it has
            # skipped its own echo (so no notify of its is in flight).
            wait_for(lambda: ns.get("sender_pid") == ns["my_pid"], "own echo skipped")
            pubsub.close()

        helper = threading.Thread(target=meanwhile)
        helper.start()
        with Watchdog(pubsub):
            run(statement(COMPLETED["echo"][1]), ns)
        helper.join(ARRIVAL_TIMEOUT)
    assert echoes == [("echo", "hello", ns["my_pid"])]  # echoed once, not again


def test_seed_copies_are_the_seeds() -> None:
    shared = os.environ.get("PGCAST_SEEDS_DIR", "/work/shared/seeds")
    if not os.path.isdir(shared):
        pytest.skip(f"no seed directory at {shared}")
    originals = {p.read_text(encoding="utf-8") for p in Path(shared).iterdir()}
    for name in ("000_pgpubsub_readme.txt", "001_py_postgresql_notifyman.txt",
                 "003_py_postgresql_driver_diff.txt"):
        assert read_seed(name) in originals, name
