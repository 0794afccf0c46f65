"""Table change feeds (:mod:`pgcast.triggers`) against real PostgreSQL.

Each test proves a sentence of issue 5: the JSON change event (operation,
schema, table, key, row, old values of the changed columns, transaction id)
for INSERT, UPDATE and DELETE, composite and missing keys; nothing on
rollback; a change too big for NOTIFY never fails its transaction; the
statement-level mode sends the set of keys in few notifications; names are
quoted, never SQL; the CLI installs and removes feeds.

To show that something is *not* delivered, a test sends a sentinel from the
same session afterwards and checks everything received up to it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import _faults
import pgcast
from _eventwait import collect_until
from pgcast import triggers
from pgcast.embedded import EmbeddedServer
from pgcast.triggers import Change, default_channel, unwatch_table, watch_table, watched_tables

Conn = psycopg.Connection[tuple[Any, ...]]
SENTINEL = "--sentinel--"
CLI_TIMEOUT = 60.0


@pytest.fixture
def table(conn: Conn) -> Iterator[str]:
    """A fresh table name in public; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    conn.execute(f'DROP TABLE IF EXISTS "{name}" CASCADE')


@pytest.fixture
def ps(dsn: str) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as pubsub:
        yield pubsub


def changes_until_sentinel(ps: pgcast.PubSub, conn: Conn, channel: str) -> list[Change]:
    """Every change event on *channel* sent before now, decoded."""
    conn.execute("SELECT pg_notify(%s, %s)", (channel, SENTINEL))
    events = collect_until(ps, SENTINEL)
    return [Change.from_event(e) for e in events
            if e.payload != SENTINEL and e.channel == channel]


def txid(conn: Conn) -> int:
    row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
    assert row is not None
    return int(row[0])


# -- pure ----------------------------------------------------------------------


def test_default_channel_names_the_table_and_fits_postgres() -> None:
    assert default_channel("public", "ports") == "ports_changed"
    assert default_channel("shop", "ports") == "shop.ports_changed"
    long_a = default_channel("public", "x" * 63)
    long_b = default_channel("public", "x" * 62 + "y")
    assert len(long_a.encode()) <= pgcast.MAX_CHANNEL_BYTES
    assert long_a.endswith("_changed") and long_a != long_b
    multibyte = default_channel("ス" * 20, "テ" * 20)
    assert len(multibyte.encode()) <= pgcast.MAX_CHANNEL_BYTES
    multibyte.encode().decode()  # cut on a character boundary


def test_change_from_event_decodes_both_modes_and_refuses_others() -> None:
    row = Change.from_event(pgcast.Event("c", json.dumps(
        {"op": "UPDATE", "schema": "s", "table": "t", "key": {"id": 1},
         "row": {"id": 1, "v": 2}, "old": {"v": 1}, "txid": 7}), 1))
    assert (row.op, row.key, row.old, row.txid, row.keys()) == (
        "UPDATE", {"id": 1}, {"v": 1}, 7, [{"id": 1}])
    stmt = Change.from_event(pgcast.Event("c", json.dumps(
        {"op": "DELETE", "schema": "s", "table": "t", "txid": 7, "count": 2,
         "keys": [{"id": 1}, {"id": 2}], "part": 1, "parts": 1}), 1))
    assert stmt.keys() == [{"id": 1}, {"id": 2}] and stmt.count == 2
    truncated = Change.from_event(pgcast.Event("c", json.dumps(
        {"op": "UPDATE", "schema": "s", "table": "t", "txid": 7, "count": 9,
         "keys": None, "truncated": True}), 1))
    assert truncated.keys() is None and truncated.truncated
    with pytest.raises(ValueError, match="not a pgcast change event"):
        Change.from_event(pgcast.Event("c", "hello", 1))


# -- row mode --------------------------------------------------------------------


def test_insert_update_delete_send_key_row_old_and_txid(
    conn: Conn, ps: pgcast.PubSub, table: str
) -> None:
    conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, name text, price int)')
    feed = watch_table(conn, table)
    assert feed.channel == f"{table}_changed" and feed.key == ("id",)
    ps.listen(feed.channel)
    with conn.transaction():
        conn.execute(f'INSERT INTO "{table}" VALUES (1, %s, 10)', ("ruby",))
        insert_txid = txid(conn)
    with conn.transaction():
        conn.execute(f'UPDATE "{table}" SET price = 11 WHERE id = 1')
        update_txid = txid(conn)
    conn.execute(f'DELETE FROM "{table}" WHERE id = 1')

    insert, update, delete = changes_until_sentinel(ps, conn, feed.channel)
    assert insert == Change("INSERT", "public", table, insert_txid, key={"id": 1},
                            row={"id": 1, "name": "ruby", "price": 10})
    assert update == Change("UPDATE", "public", table, update_txid, key={"id": 1},
                            row={"id": 1, "name": "ruby", "price": 11}, old={"price": 10})
    assert delete.op == "DELETE" and delete.key == {"id": 1}
    assert delete.row == {"id": 1, "name": "ruby", "price": 11}  # the row as it was
    assert delete.txid > update_txid


def test_composite_primary_key_and_chosen_columns(
    conn: Conn, ps: pgcast.PubSub, table: str
) -> None:
    conn.execute(
        f'CREATE TABLE "{table}" (category text, port text, version text, notes text,'
        " PRIMARY KEY (category, port))"
    )
    feed = watch_table(conn, f"public.{table}", channel=f"{table}_ports",
                       columns=["version"])
    assert feed.key == ("category", "port") and feed.columns == ("version",)
    ps.listen(feed.channel)
    conn.execute(f"INSERT INTO \"{table}\" VALUES ('www', 'nginx', '1.0', 'n')")
    conn.execute(f"UPDATE \"{table}\" SET version = '1.1', notes = 'm'")
    conn.execute(f"UPDATE \"{table}\" SET notes = 'only an unsent column'")

    insert, update, notes_only = changes_until_sentinel(ps, conn, feed.channel)
    assert insert.key == {"category": "www", "port": "nginx"}
    assert insert.row == {"version": "1.0"}
    assert update.row == {"version": "1.1"} and update.old == {"version": "1.0"}
    # A change of unsent columns is still a change of the row; its old values stay private.
    assert notes_only.op == "UPDATE" and notes_only.old == {}


def test_table_without_primary_key_sends_key_null_or_the_replica_identity(
    conn: Conn, ps: pgcast.PubSub, table: str
) -> None:
    conn.execute(f'CREATE TABLE "{table}" (a int NOT NULL, b text)')
    feed = watch_table(conn, table)
    assert feed.key is None
    ps.listen(feed.channel)
    conn.execute(f"INSERT INTO \"{table}\" VALUES (1, 'x')")
    (change,) = changes_until_sentinel(ps, conn, feed.channel)
    assert change.key is None and change.keys() is None
    assert change.row == {"a": 1, "b": "x"}  # the row is the only identification

    conn.execute(f'CREATE UNIQUE INDEX "{table}_a" ON "{table}" (a)')
    conn.execute(f'ALTER TABLE "{table}" REPLICA IDENTITY USING INDEX "{table}_a"')
    assert watch_table(conn, table).key == ("a",)
    conn.execute(f'DELETE FROM "{table}"')
    (change,) = changes_until_sentinel(ps, conn, feed.channel)
    assert change.op == "DELETE" and change.key == {"a": 1}


def test_nothing_is_sent_for_a_rolled_back_change(
    conn: Conn, ps: pgcast.PubSub, table: str
) -> None:
    conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY)')
    feed = watch_table(conn, table)
    ps.listen(feed.channel)
    with pytest.raises(RuntimeError), conn.transaction():
        conn.execute(f'INSERT INTO "{table}" VALUES (1)')
        raise RuntimeError("roll it back")
    conn.execute(f'INSERT INTO "{table}" VALUES (2)')
    assert [c.key for c in changes_until_sentinel(ps, conn, feed.channel)] == [{"id": 2}]


def test_a_100_kb_row_does_not_fail_its_insert_and_is_sent_truncated(
    conn: Conn, ps: pgcast.PubSub, table: str
) -> None:
    conn.execute(f'CREATE TABLE "{table}" (id text PRIMARY KEY, body text)')
    feed = watch_table(conn, table)
    ps.listen(feed.channel)
    conn.execute(f'INSERT INTO "{table}" VALUES (%s, %s)', ("small", "x" * 100_000))
    # Even the key is too big for NOTIFY here: the event still goes, with key null.
    conn.execute(f'INSERT INTO "{table}" VALUES (%s, %s)', ("k" * 9000, ""))
    conn.execute(f'UPDATE "{table}" SET body = %s WHERE id = %s', ("y" * 100_000, "small"))

    big_row, big_key, big_update = changes_until_sentinel(ps, conn, feed.channel)
    assert big_row.truncated and big_row.key == {"id": "small"} and big_row.row is None
    assert big_key.truncated and big_key.key is None and big_key.op == "INSERT"
    assert big_update.truncated and big_update.old is None and big_update.op == "UPDATE"
    row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
    assert row == (2,)


def test_names_are_quoted_never_sql(conn: Conn, ps: pgcast.PubSub) -> None:
    schema = f'My "Schema" {uuid.uuid4().hex[:6]}'
    name = 'we"ird; DROP TABLE x; --'
    conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(schema)))
    try:
        conn.execute(psycopg.sql.SQL(
            'CREATE TABLE {} ("Key col" int PRIMARY KEY, "v;al" text)'
        ).format(psycopg.sql.Identifier(schema, name)))
        feed = watch_table(conn, (schema, name), columns=["v;al"])
        assert (feed.schema, feed.table) == (schema, name)
        assert feed.channel == default_channel(schema, name)
        # The same table named as SQL text, quoted as a user would: the same feed.
        quoted = psycopg.sql.Identifier(schema, name).as_string(conn)
        assert watch_table(conn, quoted, channel=feed.channel, columns=["v;al"]) == feed
        ps.listen(feed.channel)
        conn.execute(psycopg.sql.SQL("INSERT INTO {} VALUES (1, 'v')").format(
            psycopg.sql.Identifier(schema, name)))
        (change,) = changes_until_sentinel(ps, conn, feed.channel)
        assert (change.schema, change.table) == (schema, name)
        assert change.key == {"Key col": 1} and change.row == {"v;al": "v"}
        assert len(watched_tables(conn, (schema, name))) == 1
    finally:
        conn.execute(psycopg.sql.SQL("DROP SCHEMA {} CASCADE").format(
            psycopg.sql.Identifier(schema)))


def test_bad_arguments_raise_clear_errors_and_change_nothing(conn: Conn, table: str) -> None:
    conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY)')
    conn.execute(f'CREATE VIEW "{table}_v" AS SELECT * FROM "{table}"')
    with pytest.raises(pgcast.WatchError, match="no table"):
        watch_table(conn, f"{table}_missing")
    with pytest.raises(pgcast.WatchError, match="not a table"):
        watch_table(conn, f"{table}_v")
    with pytest.raises(pgcast.WatchError, match="no column 'nope'"):
        watch_table(conn, table, columns=["id", "nope"])
    with pytest.raises(pgcast.WatchError, match="unknown operation 'UPSERT'"):
        watch_table(conn, table, operations=["INSERT", "UPSERT"])
    with pytest.raises(pgcast.WatchError, match="per='row'"):
        watch_table(conn, table, columns=["id"], per="statement")
    with pytest.raises(pgcast.InvalidChannelError, match="63"):
        watch_table(conn, table, channel="c" * 64)
    assert watched_tables(conn, table) == []
    assert isinstance(pgcast.WatchError("x"), ValueError)


def test_watch_is_idempotent_and_unwatch_removes_only_what_is_asked(
    conn: Conn, ps: pgcast.PubSub, table: str
) -> None:
    conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY)')
    first = watch_table(conn, table)
    assert watch_table(conn, table) == first
    other = watch_table(conn, table, channel=f"{table}_other", operations=["DELETE"])
    assert [f.channel for f in watched_tables(conn, table)] == [first.channel, other.channel]
    ps.listen(first.channel, other.channel)
    conn.execute(f'INSERT INTO "{table}" VALUES (1)')
    assert len(changes_until_sentinel(ps, conn, first.channel)) == 1  # once, not twice

    assert unwatch_table(conn, table, first.channel) == 3
    conn.execute(f'INSERT INTO "{table}" VALUES (2)')
    conn.execute(f'DELETE FROM "{table}" WHERE id = 2')
    conn.execute("SELECT pg_notify(%s, %s)", (first.channel, SENTINEL))
    received = collect_until(ps, SENTINEL)
    assert [(e.channel, Change.from_event(e).op) for e in received[:-1]] == [
        (other.channel, "DELETE")]
    assert unwatch_table(conn, table) == 1
    assert unwatch_table(conn, table) == 0
    assert watched_tables(conn, table) == []


def test_concurrent_installs_do_not_collide(dsn: str, conn: Conn) -> None:
    names = [f"t_{uuid.uuid4().hex[:10]}" for _ in range(4)]
    for name in names:
        conn.execute(f'CREATE TABLE "{name}" (id int PRIMARY KEY)')
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(names))

    def install(name: str) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as own:
                barrier.wait(10)
                watch_table(own, name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=install, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert all(len(watched_tables(conn, n)) == 1 for n in names)
    finally:
        for name in names:
            conn.execute(f'DROP TABLE "{name}"')


def test_functions_are_versioned_and_reinstalled_when_different(conn: Conn) -> None:
    triggers.install(conn)
    conn.execute("COMMENT ON FUNCTION pgcast.table_change_row() IS 'old version'")
    triggers.install(conn)
    row = conn.execute(
        "SELECT obj_description('pgcast.table_change_row()'::regprocedure, 'pg_proc')"
    ).fetchone()
    assert row == (f"pgcast table change feed, version {triggers.FUNCTIONS_VERSION}",)


# -- statement mode ---------------------------------------------------------------


def test_statement_mode_sends_the_set_of_keys_per_statement(
    conn: Conn, ps: pgcast.PubSub, table: str
) -> None:
    conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, v int)')
    feed = watch_table(conn, table, per="statement",
                       operations=["INSERT", "UPDATE", "DELETE", "TRUNCATE"])
    ps.listen(feed.channel)
    conn.execute(f'INSERT INTO "{table}" SELECT g, g FROM generate_series(1, 5) g')
    conn.execute(f'UPDATE "{table}" SET v = v + 1 WHERE id <= 2')
    conn.execute(f'UPDATE "{table}" SET id = 10 WHERE id = 5')  # the key itself changes
    conn.execute(f'UPDATE "{table}" SET v = 0 WHERE false')    # no row: no event
    conn.execute(f'DELETE FROM "{table}" WHERE id IN (3, 4)')
    conn.execute(f'TRUNCATE "{table}"')

    insert, update, rekey, delete, truncate = changes_until_sentinel(ps, conn, feed.channel)

    def ids(change: Change) -> list[int]:
        keys = change.keys()
        assert keys is not None
        return sorted(k["id"] for k in keys)

    assert insert.op == "INSERT" and insert.count == 5 and ids(insert) == [1, 2, 3, 4, 5]
    assert (update.count, ids(update)) == (2, [1, 2])
    assert (rekey.count, ids(rekey)) == (1, [5, 10])  # old and new key
    assert delete.op == "DELETE" and ids(delete) == [3, 4]
    assert truncate.op == "TRUNCATE" and truncate.keys() is None
    assert (insert.part, insert.parts, insert.truncated) == (1, 1, False)


@pytest.mark.slow
def test_a_100000_row_update_sends_a_few_notifications_not_100000(
    conn: Conn, ps: pgcast.PubSub, table: str
) -> None:
    conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, v int)')
    conn.execute(f'INSERT INTO "{table}" SELECT g, 0 FROM generate_series(1, 100000) g')
    feed = watch_table(conn, table, per="statement")
    ps.listen(feed.channel)

    # Default limit: the keys would take more than 16 notifications, so one
    # notification says "100,000 rows changed" and leaves the keys out.
    conn.execute(f'UPDATE "{table}" SET v = 1')
    (summary,) = changes_until_sentinel(ps, conn, feed.channel)
    assert summary.truncated and summary.keys() is None and summary.count == 100_000

    # With room for them, every key arrives, over a few hundred notifications at most.
    watch_table(conn, table, per="statement", max_parts=400)
    conn.execute(f'UPDATE "{table}" SET v = 2')
    parts = changes_until_sentinel(ps, conn, feed.channel)
    assert 1 < len(parts) <= 400
    assert {(p.part, p.parts) for p in parts} == {(i, len(parts)) for i in
                                                    range(1, len(parts) + 1)}
    assert len({p.txid for p in parts}) == 1 and not any(p.truncated for p in parts)
    ids = [k["id"] for p in parts for k in p.keys() or []]
    assert sorted(ids) == list(range(1, 100_001))
    row = conn.execute(f'SELECT count(*) FROM "{table}" WHERE v = 2').fetchone()
    assert row == (100_000,)


# -- the CLI ------------------------------------------------------------------------


def pgcast_cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "pgcast.cli", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"pgcast {args} did not finish in {timeout} s") from exc


def test_cli_watch_listen_unwatch(dsn: str, conn: Conn, table: str) -> None:
    conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, name text, secret text)')
    done = pgcast_cli("watch", table, "--columns", "name", "--dsn", dsn)
    assert done.returncode == 0, done.stderr
    channel = done.stdout.strip()
    assert channel == f"{table}_changed" and "key: id" in done.stderr

    listener = subprocess.Popen(
        [sys.executable, "-m", "pgcast.cli", "listen", channel, "--count", "1",
         "--timeout", "30", "--dsn", dsn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert listener.stderr is not None
        assert "listening on" in listener.stderr.readline()  # LISTENing now
        conn.execute(f"INSERT INTO \"{table}\" VALUES (1, 'n', 's')")
        out, _ = listener.communicate(timeout=CLI_TIMEOUT)
    finally:
        listener.kill()
        listener.wait(10)
    event = json.loads(json.loads(out.splitlines()[0])["payload"])
    assert event["key"] == {"id": 1} and event["row"] == {"name": "n"}

    done = pgcast_cli("unwatch", table, "--dsn", dsn)
    assert done.returncode == 0 and "3 triggers" in done.stderr, done.stderr
    assert watched_tables(conn, table) == []
    done = pgcast_cli("watch", f"{table}_missing", "--dsn", dsn)
    assert done.returncode == 1 and "no table" in done.stderr and "Traceback" not in done.stderr


def test_cli_watch_and_unwatch_on_a_sql_ascii_database(sql_ascii_dsn: str) -> None:
    """The CLI's connection speaks UTF-8 like every pgcast connection: on a
    database in SQL_ASCII, psycopg's default would read the catalog as bytes."""
    with psycopg.connect(sql_ascii_dsn, autocommit=True) as ascii_conn:
        ascii_conn.execute("CREATE TABLE ports (id int PRIMARY KEY, name text)")
    done = pgcast_cli("watch", "ports", "--dsn", sql_ascii_dsn)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ports_changed" and "key: id" in done.stderr
    done = pgcast_cli("unwatch", "ports", "--dsn", sql_ascii_dsn)
    assert done.returncode == 0 and "3 triggers" in done.stderr, done.stderr
    done = pgcast_cli("init", "--dsn", sql_ascii_dsn)
    assert done.returncode == 0, done.stderr


def test_statement_mode_a_key_too_big_for_notify_does_not_fail_its_statement(
    conn: Conn, ps: pgcast.PubSub, table: str
) -> None:
    # Measured in bytes, not characters: 2,700 euro signs are 8,100 bytes.
    conn.execute(f'CREATE TABLE "{table}" (id text PRIMARY KEY)')
    feed = watch_table(conn, table, per="statement")
    ps.listen(feed.channel)
    conn.execute(f'INSERT INTO "{table}" VALUES (%s)', ("\u20ac" * 2700,))
    conn.execute(f'INSERT INTO "{table}" VALUES (%s)', ("small",))
    big, small = changes_until_sentinel(ps, conn, feed.channel)
    assert (big.op, big.count, big.truncated, big.keys()) == ("INSERT", 1, True, None)
    assert (small.truncated, small.keys()) == (False, [{"id": "small"}])
    row = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
    assert row == (2,)


def test_row_mode_a_multibyte_key_too_big_for_notify_does_not_fail_its_insert(
    conn: Conn, ps: pgcast.PubSub, table: str
) -> None:
    conn.execute(f'CREATE TABLE "{table}" (id text PRIMARY KEY)')
    feed = watch_table(conn, table)
    ps.listen(feed.channel)
    conn.execute(f'INSERT INTO "{table}" VALUES (%s)', ("\u20ac" * 2700,))
    [big] = changes_until_sentinel(ps, conn, feed.channel)
    assert big.truncated and big.key is None and big.op == "INSERT"


small_queue_server = _faults.small_queue_server  # a fixture


def test_a_full_notification_queue_fails_the_commit_of_a_watched_change(
    small_queue_server: EmbeddedServer,
) -> None:
    # PostgreSQL's rule, documented in the README: the change's NOTIFY is
    # queued at commit; with the server's queue full, the commit fails and
    # the change is rolled back with it (nothing half done, nothing silent).
    dsn = small_queue_server.dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS full_q (id int PRIMARY KEY)")
        conn.execute("TRUNCATE full_q")
        watch_table(conn, "full_q")
        holder = _faults.fill_notify_queue(dsn)
        try:
            with pytest.raises(psycopg.errors.ProgramLimitExceeded,
                               match="too many notifications in the NOTIFY queue"):
                conn.execute("INSERT INTO full_q VALUES (1)")
        finally:
            holder.close()
        assert conn.execute("SELECT count(*) FROM full_q").fetchone() == (0,)
