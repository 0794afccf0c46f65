# Generated from tests/test_aio_durable.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
"""Durable channels against PostgreSQL, the same in both flavours: written
once for asyncio; tests/test_durable.py, the same tests for the sync flavour,
is generated from this file by tools/async_to_sync.py (edit this one, then
run the script).

The schema (install, idempotence, concurrency, privileges, versions),
durable notify and replay with ``since``, named consumers and ``ack``, the
switch-over under concurrent publishers, commit order against id order,
reconnects, retention and forged references. The pure parts are in
tests/test_durable_core.py, the CLI in tests/test_durable_cli.py.

Each test opens its PubSubs inside its body (an asyncio fixture would need a
plugin); *conn* is a plain sync psycopg connection in both flavours: the
"other session" that looks at the log or ends a backend.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgcast
import pgcast.aio
from _durable_log import age, log_rows
from _eventwait import join_thread, pause, run_sync, start_thread
from pgcast.durable import install_schema
from pgcast.durable._core import INLINE_LIMIT, ref_payload
from pgcast.durable._schema import LATEST_VERSION, MIGRATIONS

Conn = psycopg.Connection[tuple[Any, ...]]
TIMEOUT = 20.0


@pytest.fixture
def schema(dsn: str) -> None:
    """The pgcast schema installed in the session's database."""
    with psycopg.connect(dsn, autocommit=True) as c:
        install_schema(c)


def drain(aps: pgcast.PubSub, idle: float = 0.3) -> list[pgcast.Event]:
    """Every event until *idle* seconds pass without one (bounded by TIMEOUT)."""
    got: list[pgcast.Event] = []
    deadline = time.monotonic() + TIMEOUT
    for item in aps.wait(idle):
        if item is None:
            return got
        if isinstance(item, pgcast.Event):
            got.append(item)
        if time.monotonic() > deadline:
            break
    pytest.fail(f"events kept coming for {TIMEOUT} s; got {len(got)}")


def take(aps: pgcast.PubSub, n: int, timeout: float = TIMEOUT) -> list[Any]:
    """The next *n* values (events and markers) of *aps*, or fail."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    for item in aps.events(select_timeout=0.05, yield_timeouts=True):
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


# -- the schema --------------------------------------------------------------------------


def test_install_schema_creates_it_once(fresh_dsn: str) -> None:

    def main() -> None:
        with psycopg.Connection.connect(fresh_dsn, autocommit=True) as c:
            cur = c.execute("SELECT to_regnamespace('pgcast')")
            assert cur.fetchone() == (None,)
            assert pgcast.install_schema(c) == 0
            assert pgcast.install_schema(c) == LATEST_VERSION  # idempotent
            cur = c.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'pgcast'")
            tables = {r[0] for r in cur.fetchall()}
            assert tables == {"log", "consumers", "schema_version", "meta", "pruned"}
            cur = c.execute("SELECT version FROM pgcast.schema_version")
            assert cur.fetchall() == [(v.version,) for v in MIGRATIONS]

    run_sync(main())


def test_install_schema_in_a_non_autocommit_connection(fresh_dsn: str) -> None:

    def main() -> None:
        with psycopg.Connection.connect(fresh_dsn) as c:
            assert pgcast.install_schema(c) == 0  # its own transaction, committed
        with psycopg.Connection.connect(fresh_dsn) as c:
            c.execute("SELECT 1")  # a transaction is open: install joins it (savepoint)
            assert pgcast.install_schema(c) == LATEST_VERSION

    run_sync(main())


def test_concurrent_installs_take_turns(fresh_dsn: str) -> None:
    n = 6
    results: list[int] = []

    def main() -> None:
        # Every connection is open before the first install starts.
        conns = [psycopg.Connection.connect(fresh_dsn, autocommit=True) for _ in range(n)]
        try:

            def installer(c: psycopg.Connection[Any]) -> Any:

                def install() -> None:
                    results.append(pgcast.install_schema(c))

                return install

            runners = [start_thread(installer(c)) for c in conns]
            for runner in runners:
                join_thread(runner, TIMEOUT)
        finally:
            for c in conns:
                c.close()

    run_sync(main())
    assert sorted(results) == [0] + [LATEST_VERSION] * (n - 1)


def test_a_newer_schema_is_refused(fresh_dsn: str) -> None:

    def main() -> None:
        with psycopg.Connection.connect(fresh_dsn, autocommit=True) as c:
            pgcast.install_schema(c)
            c.execute(
                "INSERT INTO pgcast.schema_version VALUES (%s, 'from the future')",
                (LATEST_VERSION + 1,),
            )
            with pytest.raises(pgcast.SchemaError, match="newer than this pgcast knows"):
                pgcast.install_schema(c)
        with pgcast.connect(fresh_dsn) as ps:
            ps.notify("c", "plain is fine")
            with pytest.raises(pgcast.SchemaError, match="upgrade"):
                ps.notify("c", "x", durable=True)

    run_sync(main())


def test_pubsub_runs_no_ddl_unless_asked(fresh_dsn: str) -> None:

    def schema_exists() -> bool:
        with psycopg.connect(fresh_dsn, autocommit=True) as c:
            return c.execute("SELECT to_regnamespace('pgcast')").fetchone() != (None,)

    def main() -> None:
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

    run_sync(main())


def test_a_role_that_may_not_install_is_told_to_run_init(fresh_dsn: str, conn: Conn) -> None:
    role = f"pgcast_weak_{uuid.uuid4().hex[:8]}"
    try:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("the test server's role may not create roles")

    def main() -> None:
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

    try:
        run_sync(main())
    finally:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_sql_functions_work_from_sql(
    dsn: str, schema: None, unique_channel: str, conn: Conn
) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as ps:
            ps.listen(unique_channel)
            row = conn.execute("SELECT pgcast.notify(%s, 'from SQL')", (unique_channel,)).fetchone()
            assert row is not None and isinstance(row[0], int)
            plain = conn.execute(
                "SELECT pgcast.notify(%s, 'plain', false)", (unique_channel,)
            ).fetchone()
            assert plain == (None,)
            conn.execute(
                "SELECT pgcast.notify_many(ARRAY[%s, %s], ARRAY['a', 'b'])",
                (unique_channel, unique_channel),
            )
            got = take(ps, 4)
            assert [e.payload for e in got] == ["from SQL", "plain", "a", "b"]
            assert got[0].id == row[0] and type(got[1]) is pgcast.Event
            assert got[2].id < got[3].id
            with pytest.raises(psycopg.errors.RaiseException, match="2 channels but 1 payloads"):
                conn.execute("SELECT pgcast.notify_many(ARRAY['a', 'b'], ARRAY['x'])")

    run_sync(main())


# -- durable notify and replay ---------------------------------------------------------------


def test_durable_notify_returns_increasing_ids(
    dsn: str, schema: None, unique_channel: str, conn: Conn
) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub:
            a = pub.notify(unique_channel, "a", durable=True)
            b = pub.notify(unique_channel, {"b": 2}, durable=True)
            last = pub.notify_many([(unique_channel, "c"), (unique_channel, "d")], durable=True)
            assert a is not None and b is not None and (last is not None) and (a < b < last)
            assert pub.notify(unique_channel, "plain") is None
            assert log_rows(conn, unique_channel) == [
                (a, "a"),
                (b, '{"b":2}'),
                (last - 1, "c"),
                (last, "d"),
            ]

    run_sync(main())


def test_durable_notify_and_replay_since(dsn: str, schema: None, unique_channel: str) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            first = pub.notify(unique_channel, "1", durable=True)
            last = pub.notify_many([(unique_channel, str(i)) for i in range(2, 5)], durable=True)
            assert first is not None and last == first + 3
            sub.listen(unique_channel, durable=True, since=first)  # after the first
            pub.notify(unique_channel, "5", durable=True)
            got = take(sub, 4)
            assert [e.payload for e in got] == ["2", "3", "4", "5"]
            assert {type(e) for e in got} == {pgcast.DurableEvent}
            assert ids(got) == list(range(first + 1, first + 5))
            assert drain(sub) == []

    run_sync(main())


def test_listen_since_zero_replays_everything_kept(
    dsn: str, schema: None, unique_channel: str
) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            pub.notify_many([(unique_channel, str(i)) for i in range(10)], durable=True)
            sub.listen(unique_channel, durable=True, since=0)
            assert [e.payload for e in drain(sub)] == [str(i) for i in range(10)]

    run_sync(main())


def test_durable_listen_without_since_starts_at_the_end(
    dsn: str, schema: None, unique_channel: str
) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            pub.notify(unique_channel, "old", durable=True)
            sub.listen(unique_channel, durable=True)
            pub.notify(unique_channel, "new", durable=True)
            assert [e.payload for e in drain(sub)] == ["new"]

    run_sync(main())


def test_a_plain_listener_sees_durable_messages_with_ids(
    dsn: str, schema: None, unique_channel: str
) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            sub.listen(unique_channel)
            sent = pub.notify(unique_channel, "durable", durable=True)
            pub.notify(unique_channel, "plain")
            got = take(sub, 2)
            assert got[0] == pgcast.DurableEvent(
                unique_channel, "durable", pub.backend_pid, sent or 0
            )
            assert type(got[1]) is pgcast.Event and getattr(got[1], "id", None) is None

    run_sync(main())


def test_replay_spans_many_batches_and_get_event(
    dsn: str, schema: None, unique_channel: str
) -> None:
    n = 2500  # more than two replay batches of 1000

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            pub.notify_many([(unique_channel, str(i)) for i in range(n)], durable=True)
            sub.listen(unique_channel, durable=True, since=0)
            got: list[pgcast.Event] = []
            deadline = time.monotonic() + TIMEOUT
            while len(got) < n and time.monotonic() < deadline:
                event = sub.get_event()  # never waits, yet replays batch after batch
                if isinstance(event, pgcast.Event):
                    got.append(event)
            assert [e.payload for e in got] == [str(i) for i in range(n)]

    run_sync(main())


def test_ignore_own_and_rollback(dsn: str, schema: None, unique_channel: str) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as other:
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

    run_sync(main())


def test_unlisten_and_listen_again(dsn: str, schema: None, unique_channel: str) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
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

    run_sync(main())


def test_notify_many_refuses_what_is_not_a_pair(dsn: str, unique_channel: str) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as ps:
            bad: list[Any] = [[(unique_channel, "a", "b")], [(unique_channel,)], ["ab"], 5, "ab"]
            for messages in bad:
                with pytest.raises(TypeError, match="\\(channel, payload\\) pair"):
                    ps.notify_many(messages)
            ps.notify(unique_channel, "still usable")

    run_sync(main())


# -- named consumers ------------------------------------------------------------------------


def test_consumer_resumes_after_what_it_acknowledged(
    dsn: str, schema: None, unique_channel: str
) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub:
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
                worker.listen(unique_channel)  # already listened: nothing changes
            # Another consumer keeps its own position; a new one starts at the end.
            with pgcast.connect(dsn) as other:
                other.listen(unique_channel, durable=True, consumer="audit")
                pub.notify(unique_channel, "6", durable=True)
                assert [e.payload for e in drain(other)] == ["6"]

    run_sync(main())


def test_consumer_positions_are_in_the_database(
    dsn: str, schema: None, unique_channel: str, conn: Conn
) -> None:

    def main() -> int | None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as worker:
            sent = pub.notify(unique_channel, "x", durable=True)
            worker.listen(unique_channel, durable=True, consumer="w", since=0)
            (event,) = drain(worker)
            worker.ack(event)
            return sent

    sent = run_sync(main())
    row = conn.execute(
        "SELECT position FROM pgcast.consumers WHERE name = 'w' AND channel = %s", (unique_channel,)
    ).fetchone()
    assert row == (sent,)


def test_ack_errors(dsn: str, schema: None, unique_channel: str) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            sub.listen(unique_channel, durable=True)
            pub.notify(unique_channel, "x", durable=True)
            (event,) = take(sub, 1)
            with pytest.raises(ValueError, match="not listened to with a consumer"):
                sub.ack(event)
            with pytest.raises(TypeError, match="only events of durable channels"):
                sub.ack(pgcast.Event(unique_channel, "x", 1))
            with pytest.raises(ValueError, match="already listened to durably; unlisten it first"):
                sub.listen(
                    "other_" + unique_channel[-8:], unique_channel, durable=True, consumer="b"
                )
            assert sub.listening_channels() == {unique_channel}

    run_sync(main())


# -- switch-over and commit order against PostgreSQL ----------------------------------------


def test_switch_over_under_concurrent_publishers(
    dsn: str, schema: None, unique_channel: str
) -> None:
    """Publishers keep committing while a listener replays a backlog and goes
    live: every message arrives once, in id order, each publisher's in its order."""
    backlog = 2500
    per_publisher, publishers = (400, 4)

    def publisher(k: int) -> Any:

        def publish() -> None:
            with pgcast.connect(dsn) as p:
                for i in range(per_publisher):
                    p.notify(unique_channel, f"{k}:{i}", durable=True)

        return publish

    def main() -> list[Any]:
        with pgcast.connect(dsn) as pub:
            pub.notify_many([(unique_channel, f"b:{i}") for i in range(backlog)], durable=True)
        with pgcast.connect(dsn) as sub:
            runners = [start_thread(publisher(k)) for k in range(publishers)]
            pause(0.05)  # publishers are running
            sub.listen(unique_channel, durable=True, since=0)
            got = take(sub, backlog + per_publisher * publishers, timeout=60)
            for runner in runners:
                join_thread(runner, TIMEOUT)
            assert drain(sub) == []
            return got

    got = run_sync(main(), timeout=120)
    event_ids = ids(got)
    assert event_ids == sorted(set(event_ids))  # increasing: no duplicate, in order
    payloads = [e.payload for e in got]
    assert payloads[:backlog] == [f"b:{i}" for i in range(backlog)]
    for k in range(publishers):
        mine = [p for p in payloads if p.startswith(f"{k}:")]
        assert mine == [f"{k}:{i}" for i in range(per_publisher)]


def test_a_later_id_cannot_commit_first(dsn: str, schema: None, unique_channel: str) -> None:
    """Transaction A draws its id and stays open; B, on the same channel,
    waits for A (the advisory lock), so ids follow commit order and a replay
    that starts meanwhile misses neither."""

    def main() -> None:
        with pgcast.connect(dsn) as a, pgcast.connect(dsn) as b, pgcast.connect(dsn) as sub:
            b_id: list[int | None] = []

            def publish_b() -> None:
                b_id.append(b.notify(unique_channel, "B", durable=True))

            with a.transaction():
                a_id = a.notify(unique_channel, "A", durable=True)
                runner = start_thread(publish_b)
                pause(0.5)
                assert b_id == []  # B waits for A's commit
                sub.listen(unique_channel, durable=True, since=0)  # replay, A open
            join_thread(runner, TIMEOUT)
            assert a_id is not None and b_id[0] is not None
            assert a_id < b_id[0]
            assert [e.payload for e in take(sub, 2)] == ["A", "B"]
            assert drain(sub) == []

    run_sync(main())


def test_other_channels_are_not_held_up(dsn: str, schema: None, unique_channel: str) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as a, pgcast.connect(dsn) as b, a.transaction():
            a.notify(unique_channel, "A", durable=True)
            started = time.monotonic()
            b.notify(unique_channel + "_other", "B", durable=True)
            assert time.monotonic() - started < 5  # not waiting for A

    run_sync(main())


def test_many_batches_and_a_concurrent_publisher(
    dsn: str, schema: None, unique_channel: str
) -> None:
    backlog, live = (2300, 300)

    def publish() -> None:
        with pgcast.connect(dsn) as p:
            for i in range(live):
                p.notify(unique_channel, f"l{i}", durable=True)

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            pub.notify_many([(unique_channel, f"b{i}") for i in range(backlog)], durable=True)
            runner = start_thread(publish)
            pause(0.02)
            sub.listen(unique_channel, durable=True, since=0)
            got = take(sub, backlog + live, timeout=60)
            join_thread(runner, TIMEOUT)
            assert drain(sub) == []
            assert [e.payload for e in got] == [f"b{i}" for i in range(backlog)] + [
                f"l{i}" for i in range(live)
            ]
            event_ids = ids(got)
            assert event_ids == sorted(set(event_ids))

    run_sync(main(), timeout=90)


# -- across reconnects ------------------------------------------------------------------------


def test_messages_sent_while_disconnected_are_replayed_before_the_marker(
    dsn: str, schema: None, unique_channel: str, conn: Conn
) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            sub.listen(unique_channel, durable=True)
            sub.listen(unique_channel + "_plain")
            pub.notify(unique_channel, "before", durable=True)
            assert [e.payload for e in take(sub, 1)] == ["before"]
            pid = sub.backend_pid
            terminate(conn, pid)
            for i in range(5):
                pub.notify(unique_channel, f"missed {i}", durable=True)
            pub.notify(unique_channel + "_plain", "lost for good")
            got = take(sub, 6)
            assert [e.payload for e in got[:5]] == [f"missed {i}" for i in range(5)]
            assert isinstance(got[5], pgcast.Reconnected)
            assert sub.backend_pid != pid
            pub.notify(unique_channel, "after", durable=True)
            assert [e.payload for e in drain(sub)] == ["after"]

    run_sync(main())


def test_a_long_gap_goes_on_after_the_marker(
    dsn: str, schema: None, unique_channel: str, conn: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgcast.durable._core, "BATCHES_BEFORE_MARKER", 1)

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            sub.listen(unique_channel, durable=True)
            terminate(conn, sub.backend_pid)
            pub.notify_many([(unique_channel, str(i)) for i in range(2500)], durable=True)
            got = take(sub, 2501)
            marker = [i for i, e in enumerate(got) if isinstance(e, pgcast.Reconnected)]
            assert marker == [1000]  # one batch before the marker, the rest after it
            payloads = [e.payload for e in got if not isinstance(e, pgcast.Reconnected)]
            assert payloads == [str(i) for i in range(2500)]
            assert drain(sub) == []

    run_sync(main())


# -- retention ---------------------------------------------------------------------------------


def test_prune_by_age_and_keep_last(dsn: str, schema: None, unique_channel: str) -> None:
    other = unique_channel + "_b"

    def main() -> None:
        with (
            pgcast.connect(dsn) as pub,
            psycopg.Connection.connect(dsn, autocommit=True) as c,
            psycopg.Connection.connect(dsn, autocommit=True) as look,
        ):
            sent = [pub.notify(unique_channel, str(i), durable=True) or 0 for i in range(6)]
            sent_b = [pub.notify(other, str(i), durable=True) or 0 for i in range(3)]
            with psycopg.connect(dsn, autocommit=True) as plain:
                age(plain, unique_channel, sent[:4], 8)  # 0..3 are 8 days old
                age(plain, other, sent_b, 8)

            def kept() -> list[str]:
                cur = look.execute(
                    "SELECT payload FROM pgcast.log WHERE channel = %s ORDER BY id",
                    (unique_channel,),
                )
                return [r[0] for r in cur.fetchall()]

            # keep_last protects the newest of each channel whatever their age.
            deleted = pgcast.prune(c, keep_last=5, channel=unique_channel)
            assert deleted == {unique_channel: 1}
            assert kept() == ["1", "2", "3", "4", "5"]
            # The default: older than 7 days, on every channel.
            deleted = pgcast.prune(c)
            assert deleted[unique_channel] == 3 and deleted[other] == 3
            assert kept() == ["4", "5"]
            # Age 0 with keep_last: exactly the last N.
            assert pgcast.prune(
                c, older_than=timedelta(0), keep_last=1, channel=unique_channel
            ) == {unique_channel: 1}
            assert kept() == ["5"]
            assert pgcast.prune(c, older_than=None, keep_last=0, channel=unique_channel) == {
                unique_channel: 1
            }
            assert pgcast.prune(c, channel=unique_channel) == {}

    run_sync(main())


def test_prune_without_the_schema(fresh_dsn: str) -> None:

    def main() -> None:
        c = psycopg.Connection.connect(fresh_dsn, autocommit=True)
        try:
            with pytest.raises(pgcast.SchemaError, match="not installed"):
                pgcast.prune(c)
        finally:
            c.close()

    run_sync(main())


def test_a_referenced_payload_pruned_before_it_is_read_is_skipped(
    dsn: str, schema: None, conn: Conn, unique_channel: str, caplog: pytest.LogCaptureFixture
) -> None:

    def main() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            sub.listen(unique_channel)
            pub.notify(unique_channel, "x" * 10000)
            pub.notify(unique_channel, "end")
            # The payload is fetched as the event is handed out: delete it first.
            with psycopg.Connection.connect(dsn, autocommit=True) as c:
                pgcast.prune(c, older_than=timedelta(0), channel=unique_channel)
            with caplog.at_level(logging.WARNING, logger="pgcast"):
                assert [e.payload for e in take(sub, 1)] == ["end"]

    run_sync(main())
    assert "is not in the log (pruned before it could be read" in caplog.text


# -- forged references ------------------------------------------------------------------------


def test_a_forged_reference_reads_no_other_channels_message(
    dsn: str, conn: Conn, unique_channel: str, schema: None
) -> None:
    """A plain NOTIFY whose payload imitates a log reference (raw SQL, the
    SQL function pg_notify) names a message of another channel: the listener
    fetches on its own channel only, so the private payload never reaches it.
    Sent through pgcast, the same text is an ordinary payload, delivered as is."""
    private, public = (unique_channel + ".private", unique_channel + ".public")
    secret = "secret:" + "x" * INLINE_LIMIT  # too large to ride inline: fetched by id

    def main() -> None:
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
            assert not [e for e in got if "secret" in e.payload]

    run_sync(main())


def test_a_forged_reference_without_the_schema_is_skipped(
    fresh_dsn: str, unique_channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Any role may NOTIFY: a reference payload on a plain channel of a
    database without the pgcast schema raised SchemaError out of events(),
    ending the iteration (the gateway's LISTEN loop reconnected, its clients
    losing what came meanwhile). Now it is skipped with a warning."""

    def main() -> None:
        with pgcast.connect(fresh_dsn) as sub:
            sub.listen(unique_channel)
            with psycopg.Connection.connect(fresh_dsn, autocommit=True) as app:
                for ref in (ref_payload(5), ref_payload(6, "inline")):
                    app.execute("SELECT pg_notify(%s, %s)", (unique_channel, ref))
                app.execute("SELECT pg_notify(%s, 'after')", (unique_channel,))
            got = take(sub, 2)
            assert [e.payload for e in got] == ["inline", "after"]

    with caplog.at_level(logging.WARNING, logger="pgcast"):
        run_sync(main())
    assert "names the log, which cannot be read" in caplog.text


def forge_everywhere(conn: Conn, dsn: str, channel: str, near: int) -> list[str]:
    """Send reference payloads naming a huge id and the next few ids by every
    door a plain sender has; returns the inline texts used."""
    texts = [f"forged-{i}" for i in range(4)]
    refs = [
        ref_payload(2**62, texts[0]),
        ref_payload(near + 1, texts[1]),
        ref_payload(near + 2, texts[2]),
        ref_payload(2**62 + 5),
        ref_payload(near + 3),
    ]
    with psycopg.Connection.connect(dsn, autocommit=True) as app:
        for ref in refs:
            conn.execute(sql.SQL("NOTIFY {}, {}").format(sql.Identifier(channel), ref))
            conn.execute("SELECT pg_notify(%s, %s)", (channel, ref))
            pgcast.notify(app, channel, ref)
    publisher = pgcast.Publisher(dsn)
    with publisher:
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

    def main() -> int | None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as sub:
            sub.listen(unique_channel, durable=True, consumer="forge-test")
            first = pub.notify(unique_channel, "one", durable=True)
            assert first is not None
            texts = forge_everywhere(conn, dsn, unique_channel, first)
            pub.notify_many([(unique_channel, ref_payload(2**62, "many"))])
            second = pub.notify(unique_channel, "two", durable=True)
            got: list[Any] = []
            for _ in range(100):
                got += [e for e in take(sub, 1) if isinstance(e, pgcast.Event)]
                if got[-1].payload == "two":
                    break
            payloads = [e.payload for e in got]
            assert payloads[0] == "one" and payloads[-1] == "two"
            assert not set(texts) & set(payloads), payloads  # no forged text as a message
            logged = {i for i, _ in log_rows(conn, unique_channel)}
            assert not [e for e in got if getattr(e, "id", None) not in logged], "not in the log"
            sub.ack(got[-1])
            return second

    second = run_sync(main())
    row = conn.execute(
        "SELECT position FROM pgcast.consumers WHERE name = 'forge-test' AND channel = %s",
        (unique_channel,),
    ).fetchone()
    assert row is not None and row[0] == second

    def again() -> None:
        with pgcast.connect(dsn) as pub, pgcast.connect(dsn) as resumed:
            resumed.listen(unique_channel, durable=True, consumer="forge-test")
            pub.notify(unique_channel, "three", durable=True)
            assert [e.payload for e in drain(resumed)] == ["three"]

    run_sync(again())
