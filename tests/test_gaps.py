# Generated from tests/test_aio_gaps.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
# ruff: noqa: E501
"""Durable resumes that cannot be complete are announced (pgcast.Gap), in
both flavours: written once for asyncio; tests/test_gaps.py is generated from
this file by tools/async_to_sync.py (edit this one, then run the script).

Every door a resume comes through is tried: ``since=`` (an id or a
Position), a named consumer's stored position, the position held across a
reconnect; and both reasons: pruned messages and another epoch of the log.
A complete resume gives no marker, in particular when other channels' ids
(ids are global) were pruned. *conn* is a plain sync psycopg connection in
both flavours: the "other session" that publishes and prunes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgcast
import pgcast.aio
from _eventwait import ARRIVAL_TIMEOUT, run_sync
from pgcast.durable import _schema, install_schema

Conn = psycopg.Connection[tuple[Any, ...]]
Item = pgcast.Event | pgcast.Reconnected | pgcast.Gap


@pytest.fixture
def db(dsn: str, conn: Conn) -> Iterator[str]:
    """A new database with the pgcast schema, dropped afterwards (TRUNCATE
    and unscoped prunes stay in it)."""
    name = f"pgcast_gaps_{uuid.uuid4().hex[:12]}"
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = psycopg.conninfo.make_conninfo(dsn, dbname=name)
        with psycopg.connect(url, autocommit=True) as c:
            install_schema(c)
        yield url
    finally:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def publish(url: str, channel: str, *payloads: str) -> list[int]:
    """Publish durably from another session; the ids."""
    with psycopg.connect(url, autocommit=True) as c:  # type: ignore[index]
        return [
            int(c.execute("SELECT pgcast.notify(%s, %s)", (channel, p)).fetchone()[0])
            for p in payloads
        ]


def prune_all(url: str, channel: str, **kwargs: Any) -> pgcast.durable.PruneResult:
    with psycopg.connect(url, autocommit=True) as c:
        return pgcast.prune(c, older_than=timedelta(0), channel=channel, **kwargs)


def take(ps: pgcast.PubSub, sentinel: str) -> list[Item]:
    """Events and markers up to the event whose payload is *sentinel*."""
    got: list[Item] = []
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    for item in ps.events(select_timeout=0.05, yield_timeouts=True):
        if item is not None:
            got.append(item)
            if isinstance(item, pgcast.Event) and item.payload == sentinel:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"sentinel {sentinel!r} not received within {ARRIVAL_TIMEOUT} s; got {got}")


def shape(items: list[Item]) -> list[object]:
    """Payloads of events, and the markers as they are."""
    return [i.payload if isinstance(i, pgcast.Event) else i for i in items]


# -- since= ---------------------------------------------------------------------------


def test_since_before_pruned_messages_gives_a_gap(db: str) -> None:

    def body() -> None:
        ch = "orders"
        ids = publish(db, ch, "a", "b", "c", "d", "e")
        deleted = prune_all(db, ch, keep_last=2)
        assert deleted == {ch: 3}
        seen: list[pgcast.Gap] = []
        with pgcast.connect(db, on_gap=seen.append) as ps:
            ps.listen(ch, durable=True, since=ids[0])
            publish(db, ch, "end")
            got = take(ps, "end")
        gap = pgcast.Gap(ch, ids[0], ids[3], "pruned", got[0].epoch)  # type: ignore[union-attr]
        assert shape(got) == [gap, "d", "e", "end"]
        assert seen == [gap]
        assert isinstance(gap.epoch, str) and gap.epoch

    run_sync(body())


def test_since_after_the_pruned_part_is_complete(db: str) -> None:

    def body() -> None:
        ch = "orders"
        ids = publish(db, ch, "a", "b", "c", "d")
        prune_all(db, ch, keep_last=2)  # a and b go; c and d stay
        with pgcast.connect(db) as ps:
            ps.listen(ch, durable=True, since=ids[1])  # after b: nothing lost
            publish(db, ch, "end")
            assert shape(take(ps, "end")) == ["c", "d", "end"]

    run_sync(body())


def test_other_channels_pruned_ids_are_no_gap(db: str) -> None:
    """Ids are global: a channel quiet since the position, whose neighbours'
    messages (with higher ids) were pruned, lost nothing."""

    def body() -> None:
        (mine,) = publish(db, "mine", "m1")
        publish(db, "other", "o1", "o2", "o3")
        with psycopg.connect(db, autocommit=True) as c:
            c.execute("DELETE FROM pgcast.log WHERE channel = 'other'")  # recorded too
        with pgcast.connect(db) as ps:
            ps.listen("mine", durable=True, since=mine)
            ps.listen("other", durable=True, since=mine)  # this one did lose o1..o3
            publish(db, "mine", "end")
            got = take(ps, "end")
        gaps = [g for g in got if isinstance(g, pgcast.Gap)]
        assert [(g.channel, g.reason, g.oldest) for g in gaps] == [("other", "pruned", None)]
        assert [e.payload for e in got if isinstance(e, pgcast.Event)] == ["end"]

    run_sync(body())


def test_a_position_from_another_epoch_gives_a_gap(db: str) -> None:

    def body() -> None:
        ch = "orders"
        publish(db, ch, "old1", "old2")
        with pgcast.connect(db) as ps:
            ps.listen(ch, durable=True, since=0)
            got = take(ps, "old2")
        last = got[-1]
        assert isinstance(last, pgcast.DurableEvent) and last.epoch is not None
        position = last.position
        assert pgcast.Position.parse(str(position)) == position
        with psycopg.connect(db, autocommit=True) as c:
            c.execute("TRUNCATE pgcast.log RESTART IDENTITY")
        publish(db, ch, "new1", "new2")
        with pgcast.connect(db) as ps:
            ps.listen(ch, durable=True, since=position)  # id 2 of the old log
            got = take(ps, "new2")
        gap = got[0]
        assert isinstance(gap, pgcast.Gap)
        assert (gap.reason, gap.since, gap.oldest) == ("epoch", position.id, 1)
        assert gap.epoch != position.epoch
        # Numerically id 2 is "new2": without the epoch it would skip new1.
        assert shape(got[1:]) == ["new1", "new2"]

    run_sync(body())


def test_bad_since_is_refused_with_a_clear_error(dsn: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            with pytest.raises(ValueError, match="since must be a log id"):
                ps.listen("c", durable=True, since="12")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="non-empty str epoch"):
                ps.listen("c", durable=True, since=pgcast.Position(3, ""))
            with pytest.raises(ValueError, match="not a log position"):
                pgcast.Position.parse("abc:x")

    run_sync(body())


# -- named consumers --------------------------------------------------------------------


def test_a_consumer_behind_a_forced_prune_gets_a_gap_until_it_acks(db: str) -> None:

    def body() -> None:
        ch = "jobs"
        with pgcast.connect(db) as ps:
            ps.listen(ch, durable=True, consumer="w", since=0)
            publish(db, ch, "a", "b", "c", "d")
            got = take(ps, "a")
            ps.ack(got[-1])  # at a
        result = prune_all(db, ch, keep_last=1)
        assert result == {ch: 1} and result.held == {ch: 2}  # only a, acked, went
        result = prune_all(db, ch, keep_last=1, force=True)
        assert result == {ch: 2}
        assert [(b.consumer, b.channel) for b in result.left_behind] == [("w", ch)]
        for _ in range(2):  # the gap is announced again until the consumer acks past it
            with pgcast.connect(db) as ps:
                ps.listen(ch, durable=True, consumer="w")
                got = take(ps, "d")
            assert isinstance(got[0], pgcast.Gap) and got[0].reason == "pruned"
            assert shape(got[1:]) == ["d"]
        with pgcast.connect(db) as ps:
            ps.listen(ch, durable=True, consumer="w")
            got = take(ps, "d")
            ps.ack(got[-1])
        with pgcast.connect(db) as ps:
            ps.listen(ch, durable=True, consumer="w")
            publish(db, ch, "e")
            assert shape(take(ps, "e")) == ["e"]

    run_sync(body())


def test_since_moves_an_existing_consumer(db: str) -> None:

    def body() -> None:
        ch = "jobs"
        ids = publish(db, ch, "a", "b", "c")
        with pgcast.connect(db) as ps:
            ps.listen(ch, durable=True, consumer="w", since=0)
            got = take(ps, "c")
            ps.ack(got[-1])
        with pgcast.connect(db) as ps:  # rewind
            ps.listen(ch, durable=True, consumer="w", since=ids[0])
            assert shape(take(ps, "c")) == ["b", "c"]
        with psycopg.connect(db, autocommit=True) as c:
            row = c.execute("SELECT position FROM pgcast.consumers WHERE name = 'w'").fetchone()
        assert row == (ids[0],)  # moved back, before any ack
        publish(db, ch, "d")
        with pgcast.connect(db) as ps:  # seek forward, past c
            ps.listen(ch, durable=True, consumer="w", since=ids[2])
            publish(db, ch, "end")
            assert shape(take(ps, "end")) == ["d", "end"]

    run_sync(body())


def test_a_consumer_of_another_epoch_gets_a_gap(db: str) -> None:

    def body() -> None:
        ch = "jobs"
        with pgcast.connect(db) as ps:
            ps.listen(ch, durable=True, consumer="w", since=0)
            publish(db, ch, "a", "b", "c")
            got = take(ps, "c")
            ps.ack(got[-1])
        with psycopg.connect(db, autocommit=True) as c:
            c.execute("TRUNCATE pgcast.log RESTART IDENTITY")
        publish(db, ch, "x", "y", "z", "w")  # id 4 > the consumer's 3
        with pgcast.connect(db) as ps:
            ps.listen(ch, durable=True, consumer="w")
            got = take(ps, "w")
            assert isinstance(got[0], pgcast.Gap) and got[0].reason == "epoch"
            assert shape(got[1:]) == ["x", "y", "z", "w"]
            ps.ack(got[1])  # x, id 1 of the new log
        with psycopg.connect(db, autocommit=True) as c:
            row = c.execute(
                "SELECT position, epoch = (SELECT epoch FROM pgcast.meta) FROM pgcast.consumers WHERE name = 'w'"
            ).fetchone()
        assert row == (1, True)  # replaced (the old 3 was of the other log), not max(3, 1)

    run_sync(body())


# -- reconnects -------------------------------------------------------------------------


def test_a_gap_while_reconnecting_is_announced(db: str, conn: Conn) -> None:
    """The position held across a reconnect: messages published and pruned
    while the listener is away come as a Gap, then what is left, then the
    Reconnected marker. The database refuses connections meanwhile, so the
    reconnect cannot happen before the prune."""

    def body() -> None:
        ch = "feed"
        name = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
        backoff = pgcast.Backoff(initial=0.05, maximum=0.2)
        with pgcast.connect(db, reconnect_backoff=backoff) as ps:
            ps.listen(ch, durable=True)
            publish(db, ch, "live")
            assert shape(take(ps, "live")) == ["live"]
            with psycopg.connect(db, autocommit=True) as other:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                        sql.Identifier(name)
                    )
                )
                try:
                    other.execute("SELECT pg_terminate_backend(%s)", (ps.backend_pid,))
                    for payload in ["m1", "m2", "m3"]:
                        other.execute("SELECT pgcast.notify(%s, %s)", (ch, payload))
                    other.execute(
                        "DELETE FROM pgcast.log WHERE channel = %s AND payload IN ('live', 'm1')",
                        (ch,),
                    )
                finally:
                    conn.execute(
                        sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                            sql.Identifier(name)
                        )
                    )
            got = take(ps, "m3")
            got.append(anext_item(ps))
        assert isinstance(got[0], pgcast.Gap) and got[0].reason == "pruned"
        assert shape(got[1:3]) == ["m2", "m3"]
        assert isinstance(got[3], pgcast.Reconnected)

    run_sync(body())


def anext_item(ps: pgcast.PubSub) -> Item:
    """The next event or marker, or fail."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    for item in ps.events(select_timeout=0.05, yield_timeouts=True):
        if item is not None:
            return item
        if time.monotonic() > deadline:
            break
    pytest.fail(f"nothing received within {ARRIVAL_TIMEOUT} s")


# -- a version-1 schema keeps working, and is upgraded by install_schema ----------------


@pytest.fixture
def v1_db(dsn: str, conn: Conn) -> Iterator[str]:
    """A new database with the pgcast schema of version 1 only, as a release
    before epochs installed it (the migration list's first entry)."""
    name = f"pgcast_v1_{uuid.uuid4().hex[:12]}"
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = psycopg.conninfo.make_conninfo(dsn, dbname=name)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(_schema._BOOTSTRAP)
            v1 = _schema.MIGRATIONS[0]
            assert v1.version == 1
            c.execute(v1.sql)
            c.execute(
                "INSERT INTO pgcast.schema_version (version, description) VALUES (%s, %s)",
                (v1.version, v1.description),
            )
        yield url
    finally:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_a_version_1_schema_works_then_upgrades(
    v1_db: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:

    def body() -> None:
        monkeypatch.setattr(_schema, "_warned_old", False)
        ch = "jobs"
        with pgcast.connect(v1_db) as ps:  # no install_schema: no DDL
            ps.listen(ch, durable=True, consumer="w", since=0)
            publish(v1_db, ch, "a", "b", "c")
            got = take(ps, "c")
            assert shape(got) == ["a", "b", "c"]
            assert [e.epoch for e in got] == [None] * 3  # type: ignore[union-attr]
            ps.ack(got[0])
        warnings = [r.getMessage() for r in caplog.records if "version 1" in r.getMessage()]
        assert len(warnings) == 1 and "`pgcast init`" in warnings[0]
        # Retention still waits for the consumer on version 1 (nothing recorded).
        assert prune_all(v1_db, ch) == {ch: 1}
        with psycopg.connect(v1_db, autocommit=True) as c:
            assert install_schema(c) == 1  # what `pgcast init` runs: 1 -> 2
            assert install_schema(c) == 2
            assert c.execute("SELECT epoch IS NULL FROM pgcast.consumers").fetchone() == (True,)
        # Upgraded: the consumer (no epoch recorded) resumes; a forced prune
        # behind it is now a gap.
        prune_all(v1_db, ch, force=True, keep_last=1)
        with pgcast.connect(v1_db) as ps:
            ps.listen(ch, durable=True, consumer="w")
            got = take(ps, "c")
            assert isinstance(got[0], pgcast.Gap) and got[0].reason == "pruned"
            assert shape(got[1:]) == ["c"]
            assert got[-1].epoch == got[0].epoch is not None  # type: ignore[union-attr]
            ps.ack(got[-1])
        with psycopg.connect(v1_db, autocommit=True) as c:
            row = c.execute(
                "SELECT epoch = (SELECT epoch FROM pgcast.meta) FROM pgcast.consumers"
            ).fetchone()
        assert row == (True,)  # its first ack records the epoch

    run_sync(body())


def test_a_replayed_message_deleted_before_its_payload_is_read_is_a_gap(db: str) -> None:
    """A large payload is fetched when handed out, after the replay read its
    id: deleted in between, it is a Gap, not a silent skip."""

    def body() -> None:
        ch = "big"
        big = "x" * 100000  # over the replay's inline limit: fetched later
        ids = publish(db, ch, "a", big, "c")
        seen: list[pgcast.Gap] = []
        with pgcast.connect(db, on_gap=seen.append) as ps:
            ps.listen(ch, durable=True, since=0)  # the first batch is read now
            with psycopg.connect(db, autocommit=True) as c:
                c.execute("DELETE FROM pgcast.log WHERE id = %s", (ids[1],))
            got = take(ps, "c")
        assert shape(got[:1]) == ["a"]
        gap = got[1]
        assert isinstance(gap, pgcast.Gap) and (gap.since, gap.reason) == (ids[0], "pruned")
        assert shape(got[2:]) == ["c"]
        assert seen == [gap]

    run_sync(body())
