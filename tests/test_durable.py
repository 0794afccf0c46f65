"""Durable channels (:mod:`pgcast.durable`, :mod:`pgcast.durable._core`).

The pure parts first: reference payloads, what needs the log, durations,
prune arguments, and the replay/live switch-over as a model checked by
hypothesis over every interleaving of commits, notifications and replay
queries. Then against PostgreSQL: the schema (install, idempotence,
concurrency, privileges, versions), durable notify and replay with ``since``,
named consumers and ``ack``, the switch-over under concurrent publishers,
commit order against id order, reconnects, retention and the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

import pgcast
import pgcast.aio
from pgcast.durable import install_schema, prune
from pgcast.durable._core import (
    INLINE_LIMIT,
    REF_PREFIX,
    REPLAY_SQL,
    DurableState,
    Unfetched,
    needs_log,
    parse_ref,
    publish_many_query,
    publish_query,
    ref_payload,
)
from pgcast.durable._schema import (
    LATEST_VERSION,
    MIGRATIONS,
    parse_duration,
    prune_query,
)

Conn = psycopg.Connection[tuple[Any, ...]]
TIMEOUT = 20.0

text_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


# -- helpers ------------------------------------------------------------------------------


def drain(ps: pgcast.PubSub, idle: float = 0.3) -> list[pgcast.Event]:
    """Every event until *idle* seconds pass without one (bounded by TIMEOUT)."""
    got: list[pgcast.Event] = []
    deadline = time.monotonic() + TIMEOUT
    for event in ps.wait(idle):
        if event is None:
            return got
        if isinstance(event, pgcast.Event):
            got.append(event)
        if time.monotonic() > deadline:
            break
    pytest.fail(f"events kept coming for {TIMEOUT} s; got {len(got)}")


def take(ps: pgcast.PubSub, n: int, timeout: float = TIMEOUT) -> list[Any]:
    """The next *n* values (events and markers) of *ps*, or fail."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    for item in ps.events(select_timeout=0.05, yield_timeouts=True):
        if item is not None:
            got.append(item)
            if len(got) == n:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"received {len(got)} of {n} within {timeout} s: last {got[-3:]}")


def terminate(conn: Conn, pid: int) -> None:
    """End the session *pid* and wait until it is gone."""
    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + TIMEOUT
    while conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
        if time.monotonic() > deadline:
            pytest.fail(f"backend {pid} still alive {TIMEOUT} s after pg_terminate_backend")
        time.sleep(0.01)


def ids(events: list[Any]) -> list[int]:
    return [e.id for e in events]


@pytest.fixture
def schema(dsn: str) -> None:
    """The pgcast schema installed in the session's database."""
    with psycopg.connect(dsn, autocommit=True) as c:
        install_schema(c)


@pytest.fixture
def pub(dsn: str, schema: None) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as ps:
        yield ps


@pytest.fixture
def sub(dsn: str, schema: None) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as ps:
        yield ps


@pytest.fixture
def fresh_dsn(dsn: str, conn: Conn) -> Iterator[str]:
    """A new, empty database (no pgcast schema), dropped afterwards."""
    name = f"pgcast_durable_{uuid.uuid4().hex[:12]}"
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(dsn, dbname=name)
    finally:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def log_rows(conn: Conn, channel: str) -> list[tuple[int, str]]:
    return [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT id, payload FROM pgcast.log WHERE channel = %s ORDER BY id", (channel,)
        )
    ]


# -- reference payloads (pure) --------------------------------------------------------------


@given(st.integers(0, 2**63 - 1), st.text(text_chars) | st.none())
def test_ref_payload_round_trips(id: int, payload: str | None) -> None:
    assert parse_ref(ref_payload(id, payload)) == (id, payload)


@pytest.mark.parametrize(
    "text",
    ["", "hello", "pgcast:12", "\x1epgcast:", "\x1epgcast:x", "\x1epgcast:12x",
     "\x1epgcast:" + "9" * 20, "\x1eother"],
)
def test_other_texts_are_not_references(text: str) -> None:
    assert parse_ref(text) is None


def test_reference_payloads_fit_in_notify() -> None:
    # The longest id and the longest inline payload still fit under 8000 bytes.
    longest = ref_payload(2**63 - 1, "x" * (INLINE_LIMIT - 1))
    assert len(longest.encode()) < pgcast.MAX_PAYLOAD_BYTES
    assert REF_PREFIX.startswith("\x1e")


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        ("a" * 7999, False),
        ("a" * 8000, True),
        ("é" * 3999 + "a", False),  # 7999 bytes
        ("é" * 4000, True),  # 8000 bytes, 4000 characters
        ("€" * 2666 + "a", False),  # 7999 bytes
        ("€" * 2666 + "é", True),  # 8000 bytes
        ("\N{GRINNING FACE}" * 1999 + "abc", False),  # 7999 bytes
        ("\N{GRINNING FACE}" * 2000, True),  # 8000 bytes
        ("\x1e", True),  # would look like a reference: through the log
        ("\x1epgcast:1:x", True),
        ("x\x1e", False),
    ],
)
def test_what_needs_the_log_is_counted_in_utf8_bytes(text: str, logged: bool) -> None:
    assert needs_log(text) is logged
    (_, params), via_log = publish_query("c", text, durable=False)
    assert via_log is logged
    assert params is not None and text in params


@given(st.text(text_chars, max_size=3000))
def test_needs_log_agrees_with_the_byte_size(text: str) -> None:
    expected = len(text.encode()) >= 8000 or text.startswith("\x1e")
    assert needs_log(text) is expected


def test_publish_queries() -> None:
    (sql_text, params), logged = publish_query("c", {"a": 1}, durable=True)
    assert logged and "pgcast.notify" in sql_text and params == ("c", '{"a":1}', True)
    (sql_text, params), logged = publish_query("c", "x", durable=False)
    assert not logged and "pg_notify" in sql_text
    planned = publish_many_query([("a", "1"), ("b", "2")], durable=False)
    assert planned is not None and not planned[1]
    planned = publish_many_query([("a", "1"), ("b", "x" * 9000)], durable=False)
    assert planned is not None and planned[1]  # one large message: all through the function
    assert publish_many_query([], durable=True) is None
    with pytest.raises(pgcast.PayloadError, match="NUL"):
        publish_query("c", "a\x00b", durable=True)
    with pytest.raises(pgcast.PayloadError, match="NUL"):
        publish_many_query([("c", "ok"), ("c", "\x00")], durable=True)
    with pytest.raises(pgcast.InvalidChannelError):
        publish_query("", "x", durable=True)
    for durable in (False, True):
        with pytest.raises(pgcast.PayloadError, match="not valid Unicode"):
            publish_query("c", "lone \ud800 surrogate", durable=durable)


# -- durations and retention arguments (pure) ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("45", 45), ("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800),
     ("2w", 1209600), ("1.5h", 5400), (" 7D ", 604800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "d", "7x", "-1d", "7 days", "1e3s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_prune_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="nothing to prune by"):
        prune_query(None, None)
    with pytest.raises(ValueError, match="negative"):
        prune_query(timedelta(days=-1))
    with pytest.raises(ValueError, match="keep_last"):
        prune_query(keep_last=-1)
    with pytest.raises(ValueError, match="keep_last"):
        prune_query(keep_last=True)
    with pytest.raises(pgcast.InvalidChannelError):
        prune_query(channel="")
    assert timedelta(days=7) == pgcast.DEFAULT_RETENTION


def test_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1].version == LATEST_VERSION


# -- DurableEvent --------------------------------------------------------------------------


def test_durable_event_is_an_event_with_an_id() -> None:
    e = pgcast.DurableEvent("c", '{"k":1}', 7, 42)
    channel, payload, pid = e  # still a 3-tuple
    assert (channel, payload, pid, e.id) == ("c", '{"k":1}', 7, 42)
    assert isinstance(e, pgcast.Event) and len(e) == 3 and e.json() == {"k": 1}
    assert getattr(e, "id", None) == 42
    assert getattr(pgcast.Event("c", "p", 1), "id", None) is None
    assert e == pgcast.Event("c", '{"k":1}', 7)
    assert e != pgcast.DurableEvent("c", '{"k":1}', 7, 43)
    assert hash(e) == hash(pgcast.Event("c", '{"k":1}', 7))
    assert repr(e) == "DurableEvent(channel='c', payload='{\"k\":1}', pid=7, id=42)"
    assert e._replace(payload="x").id == 42
    with pytest.raises(AttributeError):
        e.id = 3  # type: ignore[misc]
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(e)).id == 42
    assert copy.copy(e).id == 42


# -- the switch-over from replay to live, as a model (pure) ---------------------------------


class Model:
    """One channel's log and a DurableState listening to it.

    Ids commit in order (the advisory lock's guarantee); each commit after the
    LISTEN queues a notification, delivered later in commit order; a query
    sees the log as of its snapshot, taken some time after it was issued.
    """

    def __init__(self, committed: int, batch: int, since: int | None) -> None:
        self.log: list[int] = list(range(1, committed + 1))
        self.notes: deque[int] = deque()
        self.inbox: deque[Any] = deque()
        self.state = DurableState(self.inbox)
        self.state.version = 1  # the merge alone; gaps: tests/test_aio_gaps.py
        self.batch = batch
        self.since = since
        self.start = since
        self.snapshot: int | None = None
        self.subscribe()

    def subscribe(self) -> None:
        self.state.plan_subscribe(["c"], True, self.since, None)  # then LISTEN
        self.subscribing = True
        self.steps: Any = self.state.subscribe_steps(["c"], self.since, None, self.batch)
        self.query: Any = next(self.steps, None)

    def commit(self) -> None:
        self.log.append(len(self.log) + 1)
        self.notes.append(self.log[-1])

    def deliver(self) -> None:
        if self.notes:
            id = self.notes.popleft()
            self.state.admit("c", ref_payload(id, str(id)), 1)

    def snap(self) -> None:
        if self.query is not None and self.snapshot is None:
            self.snapshot = len(self.log)

    def answer(self) -> None:
        if self.query is None or self.snapshot is None:
            return
        sql_text, params = self.query
        visible = self.log[: self.snapshot]
        if sql_text == REPLAY_SQL:
            _, _, start, limit = params
            rows = [(i, 1, str(i)) for i in visible if i > start][:limit]
        else:  # the end of the log
            rows = [(max(visible, default=0),)]
            self.start = rows[0][0]
        self.snapshot = None
        try:
            self.query = self.steps.send(rows)
        except StopIteration:
            self.query = None
            self.subscribing = False

    def reconnect(self) -> None:
        # The connection breaks: undelivered notifications and the running
        # query are lost; the new connection LISTENs at once.
        self.notes.clear()
        if self.query is not None:
            self.steps.close()
            self.query = None
            self.snapshot = None
        self.state.reconnected()
        if self.subscribing:  # listen() failed: the application calls it again
            self.state.abandon(["c"])
            self.subscribe()

    def issue(self) -> None:
        if self.query is None and self.state.pending:
            self.steps = self.state.replay_steps(self.batch)
            self.query = next(self.steps, None)

    def finish(self) -> None:
        for _ in range(10_000):
            if self.query is not None:
                self.snap()
                self.answer()
            elif self.notes:
                self.deliver()
            elif self.state.pending:
                self.issue()
            else:
                return
        raise AssertionError("the model did not settle")


@settings(max_examples=1000)
@given(
    committed=st.integers(0, 12),
    batch=st.integers(1, 4),
    since=st.integers(0, 12) | st.none(),
    actions=st.lists(
        st.sampled_from(["commit", "deliver", "snap", "answer", "issue", "reconnect"]),
        max_size=60,
    ),
)
def test_switch_over_has_no_gap_and_no_duplicate(
    committed: int, batch: int, since: int | None, actions: list[str]
) -> None:
    if since is not None:
        since = min(since, committed)
    model = Model(committed, batch, since)
    for action in actions:
        getattr(model, action)()
    model.finish()
    # Without since, it starts at the end of the log as it was when looked at
    # (after the LISTEN); either way, everything after, once, in order.
    assert model.start is not None and model.start >= (committed if since is None else since)
    assert [e.id for e in model.inbox] == list(range(model.start + 1, len(model.log) + 1))
    assert not model.state.streams["c"].replaying


def test_replay_that_finds_a_seen_id_pruned_still_goes_live() -> None:
    inbox: deque[Any] = deque()
    state = DurableState(inbox)
    state.version = 1  # the merge alone (positional replay parameters)
    state.plan_subscribe(["c"], True, 0, None)
    state.admit("c", ref_payload(5, "five"), 1)  # dropped while replaying, seen 5
    steps = state.subscribe_steps(["c"], 0, None, batch=10)
    next(steps)
    with pytest.raises(StopIteration):
        steps.send([(3, 1, "three")])  # 5 was pruned before the query ran
    assert ids(list(inbox)) == [3]
    assert not state.pending
    state.admit("c", ref_payload(5, "five"), 1)  # a late duplicate: a hint to read
    state.admit("c", ref_payload(6, "six"), 1)
    assert ids(list(inbox)) == [3]  # references are read from the log, never taken
    assert state.pending
    steps = state.replay_steps(batch=10)
    assert next(steps)[1][1:3] == ("c", 3)
    with pytest.raises(StopIteration):
        steps.send([(6, 1, "six")])
    assert ids(list(inbox)) == [3, 6]
    assert not state.pending


def test_large_replayed_payloads_are_fetched_later() -> None:
    inbox: deque[Any] = deque()
    state = DurableState(inbox)
    state.version = 1  # rows without the gap header (tests/test_aio_gaps.py)
    state.plan_subscribe(["c"], True, 0, None)
    steps = state.subscribe_steps(["c"], 0, None)
    next(steps)
    with pytest.raises(StopIteration):
        steps.send([(1, 9, "small"), (2, 9, None)])
    assert type(inbox[1]) is Unfetched and inbox[1].id == 2
    fetch = DurableState.fetch_steps(inbox[1])
    next(fetch)
    with pytest.raises(StopIteration) as done:
        fetch.send([("big",)])
    assert done.value.value == pgcast.DurableEvent("c", "big", 9, 2)


def test_listen_arguments_are_checked() -> None:
    state = DurableState(deque())
    with pytest.raises(ValueError, match="need durable=True"):
        state.plan_subscribe(["c"], False, 3, None)
    with pytest.raises(ValueError, match="need durable=True"):
        state.plan_subscribe(["c"], False, None, "w")
    with pytest.raises(ValueError, match="since must be"):
        state.plan_subscribe(["c"], True, -1, None)
    with pytest.raises(ValueError, match="since must be"):
        state.plan_subscribe(["c"], True, True, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="consumer name"):
        state.plan_subscribe(["c"], True, None, "")
    with pytest.raises(TypeError, match="consumer must be a str"):
        state.plan_subscribe(["c"], True, None, 5)  # type: ignore[arg-type]


# -- the schema --------------------------------------------------------------------------


def test_install_schema_creates_it_once(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        assert c.execute("SELECT to_regnamespace('pgcast')").fetchone() == (None,)
        assert install_schema(c) == 0
        assert install_schema(c) == LATEST_VERSION  # idempotent: nothing to do
        assert pgcast.install_schema(c) == LATEST_VERSION
        tables = {r[0] for r in c.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'pgcast'")}
        assert tables == {"log", "consumers", "schema_version", "meta", "pruned"}
        versions = c.execute("SELECT version FROM pgcast.schema_version").fetchall()
        assert versions == [(v.version,) for v in MIGRATIONS]


def test_install_schema_in_a_non_autocommit_connection(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn) as c:
        assert install_schema(c) == 0  # its own transaction, committed
    with psycopg.connect(fresh_dsn) as c:
        c.execute("SELECT 1")  # a transaction is open: install joins it (savepoint)
        assert install_schema(c) == LATEST_VERSION


def test_concurrent_installs_take_turns(fresh_dsn: str) -> None:
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def install() -> None:
        try:
            with psycopg.connect(fresh_dsn, autocommit=True) as c:
                barrier.wait(TIMEOUT)
                results.append(install_schema(c))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors and sorted(results) == [0] + [LATEST_VERSION] * 5


def test_a_newer_schema_is_refused(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        install_schema(c)
        c.execute("INSERT INTO pgcast.schema_version VALUES (%s, 'from the future')",
                  (LATEST_VERSION + 1,))
        with pytest.raises(pgcast.SchemaError, match="newer than this pgcast knows"):
            install_schema(c)
    with pgcast.connect(fresh_dsn) as ps, pytest.raises(pgcast.SchemaError, match="upgrade"):
        ps.notify("c", "x", durable=True)


def test_pubsub_runs_no_ddl_unless_asked(fresh_dsn: str) -> None:
    def schema_exists() -> bool:
        with psycopg.connect(fresh_dsn, autocommit=True) as c:
            return c.execute("SELECT to_regnamespace('pgcast')").fetchone() != (None,)

    with pgcast.connect(fresh_dsn) as ps:
        ps.notify("c", "plain")  # no schema needed
        # Each door that needs the log: refused with the command to run,
        # nothing created, the PubSub still usable.
        with pytest.raises(pgcast.SchemaError, match="pgcast init"):
            ps.notify("c", "kept", durable=True)
        with pytest.raises(pgcast.SchemaError, match="install_schema=True"):
            ps.notify("c", "x" * 9000)
        with pytest.raises(pgcast.SchemaError, match="pgcast init"):
            ps.notify_many([("c", "a"), ("c", "y" * 9000)])
        with pytest.raises(pgcast.SchemaError, match="pgcast init"):
            ps.listen("c", durable=True)
        assert not schema_exists()
        ps.listen("c")
        ps.notify("c", "after")
        assert [e.payload for e in take(ps, 1)] == ["after"]
    # Asked for: the PubSub installs it when it first needs it.
    with pgcast.connect(fresh_dsn, install_schema=True) as ps:
        ps.notify("c", "plain")
        assert not schema_exists()  # not before it is needed
        assert ps.notify("c", "kept", durable=True) == 1
        with psycopg.connect(fresh_dsn, autocommit=True) as c:
            assert log_rows(c, "c") == [(1, "kept")]
    # Installed once (by pgcast init, here install_schema()): no opt-in needed.
    with pgcast.connect(fresh_dsn) as ps:
        assert ps.notify("c", "again", durable=True) == 2


def test_async_pubsub_runs_no_ddl_unless_asked(fresh_dsn: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(fresh_dsn) as aps:
            with pytest.raises(pgcast.SchemaError, match="pgcast init"):
                await aps.notify("c", "x" * 9000)
            with pytest.raises(pgcast.SchemaError, match="pgcast init"):
                await aps.listen("c", durable=True)
        async with await pgcast.aio.connect(fresh_dsn, install_schema=True) as aps:
            assert await aps.notify("c", "kept", durable=True) == 1

    asyncio.run(main())


def test_a_role_that_may_not_install_is_told_to_run_init(fresh_dsn: str, conn: Conn) -> None:
    role = f"pgcast_weak_{uuid.uuid4().hex[:8]}"
    try:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("the test server's role may not create roles")
    try:
        weak = psycopg.conninfo.make_conninfo(fresh_dsn, user=role)
        with pgcast.connect(weak) as ps:
            ps.notify("c", "small is fine")
            with pytest.raises(pgcast.SchemaError, match="pgcast init") as info:
                ps.notify("c", "x" * 9000)
            assert "9000" not in str(info.value)  # names the problem, not the payload
            with pytest.raises(pgcast.SchemaError, match="pgcast init"):
                ps.listen("c", durable=True)
            # Nothing half-done: the PubSub is usable and the channel not durable.
            ps.listen("c")
            ps.notify("c", "after")
            assert [e.payload for e in take(ps, 1)] == ["after"]
    finally:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_sql_functions_work_from_sql(dsn: str, schema: None, unique_channel: str,
                                         conn: Conn) -> None:
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        row = conn.execute("SELECT pgcast.notify(%s, 'from SQL')", (unique_channel,)).fetchone()
        assert row is not None and isinstance(row[0], int)
        plain = conn.execute("SELECT pgcast.notify(%s, 'plain', false)",
                             (unique_channel,)).fetchone()
        assert plain == (None,)
        conn.execute("SELECT pgcast.notify_many(ARRAY[%s, %s], ARRAY['a', 'b'])",
                     (unique_channel, unique_channel))
        got = take(ps, 4)
        assert [e.payload for e in got] == ["from SQL", "plain", "a", "b"]
        assert got[0].id == row[0] and type(got[1]) is pgcast.Event
        assert got[2].id < got[3].id
        with pytest.raises(psycopg.errors.RaiseException, match="2 channels but 1 payloads"):
            conn.execute("SELECT pgcast.notify_many(ARRAY['a', 'b'], ARRAY['x'])")


# -- durable notify and replay ---------------------------------------------------------------


def test_durable_notify_returns_increasing_ids(pub: pgcast.PubSub, unique_channel: str,
                                               conn: Conn) -> None:
    a = pub.notify(unique_channel, "a", durable=True)
    b = pub.notify(unique_channel, {"b": 2}, durable=True)
    last = pub.notify_many([(unique_channel, "c"), (unique_channel, "d")], durable=True)
    assert a is not None and b is not None and last is not None and a < b < last
    assert pub.notify(unique_channel, "plain") is None
    assert log_rows(conn, unique_channel) == [(a, "a"), (b, '{"b":2}'), (last - 1, "c"),
                                              (last, "d")]


def test_listen_since_replays_then_continues_live(
    pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str
) -> None:
    first = pub.notify(unique_channel, "1", durable=True)
    for i in range(2, 6):
        pub.notify(unique_channel, str(i), durable=True)
    assert first is not None
    sub.listen(unique_channel, durable=True, since=first)  # after the first
    pub.notify(unique_channel, "6", durable=True)
    got = take(sub, 5)
    assert [e.payload for e in got] == ["2", "3", "4", "5", "6"]
    assert all(type(e) is pgcast.DurableEvent for e in got)
    assert ids(got) == list(range(first + 1, first + 6))
    assert drain(sub) == []


def test_listen_since_zero_replays_everything_kept(
    pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str
) -> None:
    pub.notify_many([(unique_channel, str(i)) for i in range(10)], durable=True)
    sub.listen(unique_channel, durable=True, since=0)
    assert [e.payload for e in drain(sub)] == [str(i) for i in range(10)]


def test_durable_listen_without_since_starts_at_the_end(
    pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str
) -> None:
    pub.notify(unique_channel, "old", durable=True)
    sub.listen(unique_channel, durable=True)
    pub.notify(unique_channel, "new", durable=True)
    assert [e.payload for e in drain(sub)] == ["new"]


def test_a_plain_listener_sees_durable_messages_with_ids(
    pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str
) -> None:
    sub.listen(unique_channel)
    sent = pub.notify(unique_channel, "durable", durable=True)
    pub.notify(unique_channel, "plain")
    got = take(sub, 2)
    assert got[0] == pgcast.DurableEvent(unique_channel, "durable", pub.backend_pid, sent or 0)
    assert type(got[1]) is pgcast.Event and getattr(got[1], "id", None) is None


def test_replay_spans_many_batches_and_get_event(
    pub: pgcast.PubSub, sub: pgcast.PubSub, unique_channel: str
) -> None:
    n = 2500  # more than two replay batches of 1000
    pub.notify_many([(unique_channel, str(i)) for i in range(n)], durable=True)
    sub.listen(unique_channel, durable=True, since=0)
    got: list[pgcast.Event] = []
    deadline = time.monotonic() + TIMEOUT
    while len(got) < n and time.monotonic() < deadline:
        event = sub.get_event()  # never waits, yet replays batch after batch
        if isinstance(event, pgcast.Event):
            got.append(event)
    assert [e.payload for e in got] == [str(i) for i in range(n)]


def test_ignore_own_and_rollback(pub: pgcast.PubSub, dsn: str, unique_channel: str) -> None:
    with pgcast.connect(dsn) as other:
        pub.listen(unique_channel, durable=True)
        pub.notify(unique_channel, "mine", durable=True)
        other.notify(unique_channel, "theirs", durable=True)
        with pytest.raises(RuntimeError), pub.transaction():
            pub.notify(unique_channel, "rolled back", durable=True)
            raise RuntimeError
        other.notify(unique_channel, "end", durable=True)
        got = []
        for e in pub.events(select_timeout=0.05, ignore_own=True):
            assert e is not None
            got.append(e.payload)
            if e.payload == "end":
                break
        assert got == ["theirs", "end"]


def test_unlisten_and_listen_again(pub: pgcast.PubSub, sub: pgcast.PubSub,
                                   unique_channel: str) -> None:
    sub.listen(unique_channel, durable=True)
    a = pub.notify(unique_channel, "a", durable=True)
    assert [e.payload for e in take(sub, 1)] == ["a"]
    sub.listen(unique_channel, durable=True)  # the same again: nothing to do
    with pytest.raises(ValueError, match="already listened to durably"):
        sub.listen(unique_channel, durable=True, since=0)
    sub.unlisten(unique_channel)
    pub.notify(unique_channel, "while away", durable=True)
    sub.listen(unique_channel, durable=True, since=a)
    assert [e.payload for e in drain(sub)] == ["while away"]


# -- named consumers ------------------------------------------------------------------------


def test_consumer_resumes_after_what_it_acknowledged(
    dsn: str, pub: pgcast.PubSub, unique_channel: str
) -> None:
    for i in range(5):
        pub.notify(unique_channel, str(i), durable=True)
    with pgcast.connect(dsn) as worker:
        worker.listen(unique_channel, durable=True, consumer="cache", since=0)
        got = drain(worker)
        assert [e.payload for e in got] == ["0", "1", "2", "3", "4"]
        worker.ack(got[2])
        worker.ack(got[1])  # acknowledgements only move forward
    pub.notify(unique_channel, "5", durable=True)
    with pgcast.connect(dsn) as worker:
        worker.listen(unique_channel, durable=True, consumer="cache")
        assert [e.payload for e in drain(worker)] == ["3", "4", "5"]
        # Another consumer keeps its own position; a new one starts at the end.
        worker.listen(unique_channel)  # already listened: nothing changes
    with pgcast.connect(dsn) as other:
        other.listen(unique_channel, durable=True, consumer="audit")
        pub.notify(unique_channel, "6", durable=True)
        assert [e.payload for e in drain(other)] == ["6"]


def test_consumer_positions_are_in_the_database(
    dsn: str, pub: pgcast.PubSub, unique_channel: str, conn: Conn
) -> None:
    sent = pub.notify(unique_channel, "x", durable=True)
    with pgcast.connect(dsn) as worker:
        worker.listen(unique_channel, durable=True, consumer="w", since=0)
        (event,) = drain(worker)
        worker.ack(event)
    row = conn.execute(
        "SELECT position FROM pgcast.consumers WHERE name = 'w' AND channel = %s",
        (unique_channel,),
    ).fetchone()
    assert row == (sent,)


def test_ack_errors(sub: pgcast.PubSub, pub: pgcast.PubSub, unique_channel: str) -> None:
    sub.listen(unique_channel, durable=True)
    pub.notify(unique_channel, "x", durable=True)
    (event,) = take(sub, 1)
    with pytest.raises(ValueError, match="not listened to with a consumer"):
        sub.ack(event)
    with pytest.raises(TypeError, match="only events of durable channels"):
        sub.ack(pgcast.Event(unique_channel, "x", 1))
    with pytest.raises(ValueError, match="already listened to durably; unlisten it first"):
        sub.listen("other_" + unique_channel[-8:], unique_channel, durable=True, consumer="b")
    assert sub.listening_channels() == {unique_channel}


# -- switch-over and commit order against PostgreSQL ----------------------------------------


def test_switch_over_under_concurrent_publishers(dsn: str, schema: None,
                                                 unique_channel: str) -> None:
    """Publishers keep committing while a listener replays a backlog and goes
    live: every message arrives once, in id order, each publisher's in its order."""
    backlog = 2500
    per_thread, threads_n = 400, 4
    with pgcast.connect(dsn) as pub:
        pub.notify_many([(unique_channel, f"b:{i}") for i in range(backlog)], durable=True)
    errors: list[BaseException] = []

    def publish(k: int) -> None:
        try:
            with pgcast.connect(dsn) as p:
                for i in range(per_thread):
                    p.notify(unique_channel, f"{k}:{i}", durable=True)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    with pgcast.connect(dsn) as sub:
        time.sleep(0.05)  # publishers are running
        sub.listen(unique_channel, durable=True, since=0)
        got = take(sub, backlog + per_thread * threads_n, timeout=60)
        for t in threads:
            t.join(TIMEOUT)
        assert not errors
        assert drain(sub) == []
    event_ids = ids(got)
    assert event_ids == sorted(set(event_ids))  # increasing: no duplicate, in order
    payloads = [e.payload for e in got]
    assert payloads[:backlog] == [f"b:{i}" for i in range(backlog)]
    for k in range(threads_n):
        mine = [p for p in payloads if p.startswith(f"{k}:")]
        assert mine == [f"{k}:{i}" for i in range(per_thread)]


def test_a_later_id_cannot_commit_first(dsn: str, schema: None, unique_channel: str) -> None:
    """Transaction A draws its id and stays open; B, on the same channel,
    waits for A (the advisory lock), so ids follow commit order and a replay
    that starts meanwhile misses neither."""
    with pgcast.connect(dsn) as a, pgcast.connect(dsn) as b, pgcast.connect(dsn) as sub:
        b_done = threading.Event()
        b_id: list[int | None] = []

        def publish_b() -> None:
            b_id.append(b.notify(unique_channel, "B", durable=True))
            b_done.set()

        with a.transaction():
            a_id = a.notify(unique_channel, "A", durable=True)
            t = threading.Thread(target=publish_b)
            t.start()
            assert not b_done.wait(0.5)  # B waits for A's commit
            sub.listen(unique_channel, durable=True, since=0)  # replay while A is open
        t.join(TIMEOUT)
        assert b_done.is_set() and a_id is not None and b_id[0] is not None
        assert a_id < b_id[0]
        assert [e.payload for e in take(sub, 2)] == ["A", "B"]
        assert drain(sub) == []


def test_other_channels_are_not_held_up(dsn: str, schema: None, unique_channel: str) -> None:
    with pgcast.connect(dsn) as a, pgcast.connect(dsn) as b, a.transaction():
        a.notify(unique_channel, "A", durable=True)
        started = time.monotonic()
        b.notify(unique_channel + "_other", "B", durable=True)
        assert time.monotonic() - started < 5  # not waiting for A


# -- across reconnects ------------------------------------------------------------------------


def test_messages_sent_while_disconnected_are_replayed_before_the_marker(
    dsn: str, pub: pgcast.PubSub, unique_channel: str, conn: Conn
) -> None:
    with pgcast.connect(dsn) as sub:
        sub.listen(unique_channel, durable=True)
        sub.listen(unique_channel + "_plain")
        pub.notify(unique_channel, "before", durable=True)
        assert [e.payload for e in take(sub, 1)] == ["before"]
        terminate(conn, sub.backend_pid)
        for i in range(5):
            pub.notify(unique_channel, f"missed {i}", durable=True)
        pub.notify(unique_channel + "_plain", "lost for good")
        got = take(sub, 6)
        assert [e.payload for e in got[:5]] == [f"missed {i}" for i in range(5)]
        assert isinstance(got[5], pgcast.Reconnected)
        pub.notify(unique_channel, "after", durable=True)
        assert [e.payload for e in drain(sub)] == ["after"]


def test_a_long_gap_goes_on_after_the_marker(
    dsn: str, pub: pgcast.PubSub, unique_channel: str, conn: Conn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pgcast.client

    monkeypatch.setattr(pgcast.durable._core, "BATCHES_BEFORE_MARKER", 1)
    with pgcast.connect(dsn) as sub:
        sub.listen(unique_channel, durable=True)
        terminate(conn, sub.backend_pid)
        pub.notify_many([(unique_channel, str(i)) for i in range(2500)], durable=True)
        got = take(sub, 2501)
        marker = next(i for i, e in enumerate(got) if isinstance(e, pgcast.Reconnected))
        assert marker == 1000  # one batch before the marker, the rest after it
        payloads = [e.payload for e in got if not isinstance(e, pgcast.Reconnected)]
        assert payloads == [str(i) for i in range(2500)]
        assert drain(sub) == []


# -- retention ---------------------------------------------------------------------------------


def age(conn: Conn, channel: str, ids_: list[int], days: int) -> None:
    conn.execute(
        "UPDATE pgcast.log SET created_at = now() - make_interval(days => %s) "
        "WHERE channel = %s AND id = ANY(%s)", (days, channel, ids_),
    )


def test_prune_by_age_and_keep_last(pub: pgcast.PubSub, conn: Conn,
                                    unique_channel: str) -> None:
    other = unique_channel + "_b"
    sent = [pub.notify(unique_channel, str(i), durable=True) or 0 for i in range(6)]
    sent_b = [pub.notify(other, str(i), durable=True) or 0 for i in range(3)]
    age(conn, unique_channel, sent[:4], 8)  # 0..3 are 8 days old
    age(conn, other, sent_b, 8)
    # keep_last protects the newest of each channel whatever their age.
    deleted = prune(conn, keep_last=5, channel=unique_channel)
    assert deleted == {unique_channel: 1}
    assert [r[1] for r in log_rows(conn, unique_channel)] == ["1", "2", "3", "4", "5"]
    # The default: older than 7 days, on every channel.
    deleted = prune(conn)
    assert deleted[unique_channel] == 3 and deleted[other] == 3
    assert [r[1] for r in log_rows(conn, unique_channel)] == ["4", "5"]
    # Age 0 with keep_last: exactly the last N.
    assert prune(conn, older_than=timedelta(0), keep_last=1, channel=unique_channel) == {
        unique_channel: 1}
    assert [r[1] for r in log_rows(conn, unique_channel)] == ["5"]
    assert prune(conn, older_than=None, keep_last=0, channel=unique_channel) == {
        unique_channel: 1}
    assert prune(conn, channel=unique_channel) == {}


def test_prune_without_the_schema(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as c, \
            pytest.raises(pgcast.SchemaError, match="not installed"):
        prune(c)


def test_a_referenced_payload_pruned_before_it_is_read_is_skipped(
    pub: pgcast.PubSub, sub: pgcast.PubSub, conn: Conn, unique_channel: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sub.listen(unique_channel)
    pub.notify(unique_channel, "x" * 10_000)
    pub.notify(unique_channel, "end")
    # The payload is fetched as the event is handed out: delete it first.
    prune(conn, older_than=timedelta(0), channel=unique_channel)
    with caplog.at_level(logging.WARNING, logger="pgcast"):
        assert [e.payload for e in take(sub, 1)] == ["end"]
    assert "is not in the log (pruned before it could be read" in caplog.text


# -- the CLI -----------------------------------------------------------------------------------


def pgcast_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "pgcast", *args], capture_output=True, text=True,
            timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"pgcast {' '.join(args)} did not finish in {timeout} s")


def test_cli_init(fresh_dsn: str) -> None:
    done = pgcast_cli("init", "--dsn", fresh_dsn)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"pgcast schema installed (version {LATEST_VERSION})\n"
    done = pgcast_cli("init", "--dsn", fresh_dsn)
    assert done.stdout == f"pgcast schema is up to date (version {LATEST_VERSION})\n"


def test_cli_prune(dsn: str, pub: pgcast.PubSub, conn: Conn, unique_channel: str) -> None:
    sent = [pub.notify(unique_channel, str(i), durable=True) or 0 for i in range(5)]
    done = pgcast_cli("prune", "--dsn", dsn, "--channel", unique_channel)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "pruned 0 message(s)\n"  # nothing is 7 days old
    age(conn, unique_channel, sent, 2)
    done = pgcast_cli("prune", "--dsn", dsn, "--channel", unique_channel,
                      "--older-than", "1d", "--keep-last", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{unique_channel}\t3\npruned 3 message(s)\n"
    assert [r[1] for r in log_rows(conn, unique_channel)] == ["3", "4"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "7x"], "invalid duration '7x'"),
        (["--keep-last", "-2"], "must be >= 0"),
        (["--keep-last", "many"], "not a whole number"),
    ],
)
def test_cli_prune_usage_errors(args: list[str], message: str) -> None:
    done = pgcast_cli("prune", *args, "--dsn", "postgresql://127.0.0.1:1/none")
    assert done.returncode == 2 and message in done.stderr


def test_cli_prune_without_the_schema_is_one_line(fresh_dsn: str) -> None:
    done = pgcast_cli("prune", "--dsn", fresh_dsn)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "pgcast init" in done.stderr


def test_a_forged_reference_reads_no_other_channels_message(
    dsn: str, conn: Conn, unique_channel: str, schema: None
) -> None:
    """A plain NOTIFY whose payload imitates a log reference (raw SQL, the
    SQL function pg_notify) names a message of another channel: the listener
    fetches on its own channel only, so the private payload never reaches it.
    Sent through pgcast, the same text is an ordinary payload, delivered as is."""
    private, public = unique_channel + ".private", unique_channel + ".public"
    secret = "secret:" + "x" * INLINE_LIMIT  # too large to ride inline: fetched by id
    with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
        secret_id = pub.notify(private, secret, durable=True)
        assert secret_id is not None
        forged = ref_payload(secret_id)
        sub.listen(public)
        conn.execute(sql.SQL("NOTIFY {}, {}").format(sql.Identifier(public), forged))
        conn.execute("SELECT pg_notify(%s, %s)", (public, forged))
        pub.notify(public, forged)  # pgcast sends it through the log, as text
        pub.notify(public, "after")
        got = take(sub, 2)
        assert [e.payload for e in got] == [forged, "after"]
        assert all("secret" not in e.payload for e in got)


def forge_everywhere(conn: Conn, dsn: str, channel: str, near: int) -> list[str]:
    """Send reference payloads naming a huge id and the next few ids by every
    door a plain sender has; returns the inline texts used."""
    texts = [f"forged-{i}" for i in range(4)]
    refs = [ref_payload(2**62, texts[0]), ref_payload(near + 1, texts[1]),
            ref_payload(near + 2, texts[2]), ref_payload(2**62 + 5), ref_payload(near + 3)]
    for ref in refs:
        conn.execute(sql.SQL("NOTIFY {}, {}").format(sql.Identifier(channel), ref))
        conn.execute("SELECT pg_notify(%s, %s)", (channel, ref))
        pgcast.notify(conn, channel, ref)
    with pgcast.Publisher(dsn) as publisher:
        for ref in refs:
            publisher.publish(channel, ref)
        publisher.flush()
    return texts


def test_a_forged_reference_never_moves_a_durable_position(
    dsn: str, conn: Conn, unique_channel: str, schema: None
) -> None:
    """Issue 12 item 1(b): a forged reference with a huge (or a guessed next)
    id moved the durable position, so real messages were dropped as
    duplicates, and ack() stored the forged position. Now a reference is only
    a hint to read the log: only rows read move the position."""
    with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
        sub.listen(unique_channel, durable=True, consumer="forge-test")
        first = pub.notify(unique_channel, "one", durable=True)
        assert first is not None
        texts = forge_everywhere(conn, dsn, unique_channel, first)
        pub.notify_many([(unique_channel, ref_payload(2**62, "many"))])
        second = pub.notify(unique_channel, "two", durable=True)
        got = []
        for _ in range(100):
            got += [e for e in take(sub, 1) if isinstance(e, pgcast.Event)]
            if got[-1].payload == "two":
                break
        payloads = [e.payload for e in got]
        assert payloads[0] == "one" and payloads[-1] == "two"
        assert not set(texts) & set(payloads), payloads  # no forged text as a message
        logged = {i for i, _ in log_rows(conn, unique_channel)}
        assert all(getattr(e, "id", None) in logged for e in got), "an id not in the log"
        sub.ack(got[-1])
    row = conn.execute("SELECT position FROM pgcast.consumers WHERE name = 'forge-test' "
                       "AND channel = %s", (unique_channel,)).fetchone()
    assert row is not None and row[0] == second
    with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as again:
        again.listen(unique_channel, durable=True, consumer="forge-test")
        pub.notify(unique_channel, "three", durable=True)
        assert [e.payload for e in drain(again)] == ["three"]


def test_notify_many_refuses_what_is_not_a_pair(dsn: str, unique_channel: str) -> None:
    with pgcast.connect(dsn) as ps:
        bad: list[Any] = [[(unique_channel, "a", "b")], [(unique_channel,)], ["ab"], 5, "ab"]
        for messages in bad:
            with pytest.raises(TypeError, match=r"\(channel, payload\) pair"):
                ps.notify_many(messages)
        ps.notify(unique_channel, "still usable")
