"""Self-diagnosis: the pure checks, and the real paths: LISTEN confirmed by
pg_listening_channels(), a LISTEN that did not hold, a real hot standby,
queue usage.

A pooler in transaction mode cannot be run here; what it does to a session
(the LISTEN is not there in the next statement) is reproduced by running
UNLISTEN behind the PubSub's back on its own connection.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import pq

import pgcast
import pgcast.aio
from _eventwait import arun
from _faults import hot_standby
from pgcast import diagnostics
from pgcast._core import wrap_error
from pgcast.embedded import EmbeddedServer

Conn = psycopg.Connection[tuple[object, ...]]


# -- pure decisions -------------------------------------------------------------


def test_check_listening_passes_when_every_channel_is_listed() -> None:
    diagnostics.check_listening({"a", "b"}, ["b", "a", "other"])
    diagnostics.check_listening(set(), [])


def test_check_listening_names_the_missing_channels_and_the_pooler() -> None:
    with pytest.raises(pgcast.ListenNotEffectiveError) as info:
        diagnostics.check_listening({"a", "b", "c"}, ["b"])
    assert info.value.missing == {"a", "c"}
    message = str(info.value)
    assert "LISTEN did not take effect" in message
    assert "'a', 'c'" in message
    assert "pool_mode=transaction" in message
    assert "session-mode pool" in message


def test_check_listening_abbreviates_long_lists() -> None:
    with pytest.raises(pgcast.ListenNotEffectiveError, match="and 5 more"):
        diagnostics.check_listening({f"c{i}" for i in range(10)}, [])


def test_check_recovery() -> None:
    diagnostics.check_recovery(False)
    with pytest.raises(pgcast.HotStandbyError, match=r"hot standby.*target_session_attrs"):
        diagnostics.check_recovery(True)


def test_check_session_reads_the_verify_row() -> None:
    diagnostics.check_session({"a"}, (False, ["a"]))
    diagnostics.check_session(set(), (False, None))
    with pytest.raises(pgcast.HotStandbyError):
        diagnostics.check_session({"a"}, (True, ["a"]))
    with pytest.raises(pgcast.ListenNotEffectiveError):
        diagnostics.check_session({"a"}, (False, []))
    with pytest.raises(pgcast.ListenNotEffectiveError, match="returned no row"):
        diagnostics.check_session({"a"}, None)


def test_a_standby_refusal_is_explained() -> None:
    exc = psycopg.errors.ReadOnlySqlTransaction("cannot execute LISTEN during recovery")
    error = wrap_error(exc)
    assert isinstance(error, pgcast.HotStandbyError)
    assert "cannot execute LISTEN during recovery" in str(error)
    assert "primary" in str(error)
    other = wrap_error(psycopg.errors.ReadOnlySqlTransaction("read-only transaction"))
    assert type(other) is pgcast.DatabaseError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(None, 0.0), ("0 ms", 0.0), ("60000 ms", 60.0), ("5 s", 5.0), ("2 min", 120.0),
     ("garbage", 0.0), ("7", 7.0)],
)
def test_setting_durations(text: str | None, seconds: float) -> None:
    assert diagnostics._seconds(text) == seconds


# -- against the server -----------------------------------------------------------


def test_listen_is_confirmed_on_a_direct_connection(dsn: str, unique_channel: str) -> None:
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel, unique_channel + "_2")
        row = ps.connection.execute(diagnostics.VERIFY_SQL).fetchone()
        assert row is not None
        assert row[0] is False
        assert {unique_channel, unique_channel + "_2"} <= set(row[1])


def test_a_listen_that_did_not_hold_raises_and_is_not_counted(
    dsn: str, unique_channel: str
) -> None:
    with pgcast.connect(dsn, health_check_interval=0) as ps:
        ps.listen(unique_channel)
        # What a transaction-mode pooler does: the session that runs the next
        # statement does not listen. Here, by dropping it behind pgcast's back.
        ps.connection.execute("UNLISTEN *")
        with pytest.raises(pgcast.ListenNotEffectiveError) as info:
            ps.listen(unique_channel + "_new")
        assert info.value.missing == {unique_channel}
        assert "pool_mode=transaction" in str(info.value)
        assert unique_channel + "_new" not in ps.listening_channels()


def test_asyncio_listen_that_did_not_hold_raises(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn, health_check_interval=0) as aps:
            await aps.listen(unique_channel)
            await aps.connection.execute("UNLISTEN *")
            with pytest.raises(pgcast.ListenNotEffectiveError):
                await aps.listen(unique_channel + "_new")
            assert aps.listening_channels() == {unique_channel}

    arun(body())


# -- the check after a LISTEN does not grow with the channels listened to ---------

MANY = 2000


@contextmanager
def answer_sizes(pgconn: pq.abc.PGconn) -> Iterator[list[int]]:
    """The lengths of the rows (DataRow messages) the server sends on *pgconn*
    meanwhile, from libpq's own protocol trace."""
    sizes: list[int] = []
    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield sizes
        finally:
            pgconn.untrace()
        trace.seek(0)
        for line in trace.read().splitlines():
            fields = line.split("\t")
            if len(fields) > 2 and fields[0] == "B" and fields[2] == "DataRow":
                sizes.append(int(fields[1]))


def test_the_check_after_a_listen_reads_the_size_of_the_listen(
    dsn: str, unique_channel: str
) -> None:
    # It read every channel listened to after each LISTEN: 10,000 channels
    # LISTENed one at a time took 17 s, most of it that array.
    many = [f"{unique_channel}_{i}" for i in range(MANY)]
    with pgcast.connect(dsn) as ps:
        ps.listen(*many)
        with answer_sizes(ps.connection.pgconn) as sizes:
            ps.listen(unique_channel)
        assert sizes, "no row read: the LISTEN was not checked"
        assert max(sizes) < 200, sizes  # the whole list is over 20 kB
        assert ps.listening_channels() == {*many, unique_channel}


def test_asyncio_check_after_a_listen_reads_the_size_of_the_listen(
    dsn: str, unique_channel: str
) -> None:
    async def body() -> None:
        many = [f"{unique_channel}_{i}" for i in range(MANY)]
        async with await pgcast.aio.connect(dsn) as aps:
            await aps.listen(*many)
            with answer_sizes(aps.connection.pgconn) as sizes:
                await aps.listen(unique_channel)
            assert sizes, "no row read: the LISTEN was not checked"
            assert max(sizes) < 200, sizes
            assert aps.listening_channels() == {*many, unique_channel}

    arun(body())


def test_check_listen_and_the_shortfall() -> None:
    # Every checked channel listed, as many in all as expected: passes.
    assert diagnostics.check_listen(["a", "p"], 3, (False, ["p", "a"], 3))
    # More listed than expected (others' channels on a shared session): the
    # shared-session check is check_pinned's, not this one's.
    assert diagnostics.check_listen(["a"], 1, (False, ["a"], 5))
    # Fewer in all: some listened to before are missing.
    assert not diagnostics.check_listen(["a"], 3, (False, ["a"], 2))
    with pytest.raises(pgcast.ListenNotEffectiveError) as info:
        diagnostics.check_listen(["a", "b"], 2, (False, None, 0))
    assert info.value.missing == {"a", "b"}
    with pytest.raises(pgcast.HotStandbyError):
        diagnostics.check_listen(["a"], 1, (True, ["a"], 1))
    with pytest.raises(pgcast.ListenNotEffectiveError, match="returned no row"):
        diagnostics.check_listen(["a"], 1, None)
    # The shortfall names what the full list lacks, or the pooler when it
    # lacks nothing (the two checks ran on different server sessions).
    with pytest.raises(pgcast.ListenNotEffectiveError) as info:
        diagnostics.check_shortfall({"a", "b"}, (False, ["a"]))
    assert info.value.missing == {"b"}
    with pytest.raises(pgcast.ListenNotEffectiveError, match="fewer channels") as info:
        diagnostics.check_shortfall({"a", "b"}, (False, ["a", "b"]))
    assert "pool_mode=transaction" in str(info.value)


def test_queue_usage_is_zero_then_grows_behind_a_listener_that_does_not_read(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    with pgcast.connect(dsn) as ps:
        before = ps.queue_usage()
        assert 0.0 <= before < 0.01
        # A listener idle in a transaction reads nothing from the queue until
        # the transaction ends, so it holds the queue's tail. (One idle outside
        # a transaction drains the queue into its socket buffers even if its
        # client never reads them.)
        with psycopg.connect(dsn) as idle:
            idle.execute(f'LISTEN "{unique_channel}"')
            idle.commit()
            idle.execute("SELECT 1")  # a transaction, left open
            payload = "x" * 7000
            ps.notify_many([(unique_channel, payload + str(i)) for i in range(500)])
            deadline = time.monotonic() + 10
            usage = ps.queue_usage()
            while usage <= before and time.monotonic() < deadline:
                time.sleep(0.05)
                usage = ps.queue_usage()
            assert usage > before
            assert usage < 1.0


def test_asyncio_queue_usage(dsn: str) -> None:
    async def body() -> float:
        async with await pgcast.aio.connect(dsn) as aps:
            return await aps.queue_usage()

    assert 0.0 <= arun(body()) <= 1.0


@pytest.mark.slow
def test_a_real_hot_standby_gets_a_clear_error(pg_server: EmbeddedServer | None) -> None:
    if pg_server is None:
        pytest.skip("PGCAST_TEST_DSN is set: the standby test builds its own servers")
    with hot_standby() as standby:
        with pgcast.connect(standby.dsn, health_check_interval=0) as ps:
            with pytest.raises(pgcast.HotStandbyError, match=r"hot standby.*LISTEN"):
                ps.listen("orders")
            assert ps.listening_channels() == set()
            with pytest.raises(pgcast.HotStandbyError, match="NOTIFY during recovery"):
                ps.notify("orders", "x")

        async def body() -> None:
            async with await pgcast.aio.connect(standby.dsn, health_check_interval=0) as aps:
                with pytest.raises(pgcast.HotStandbyError):
                    await aps.listen("orders")

        arun(body())
        report = diagnostics.run_checks(standby.dsn)
        verdicts = {c.name: c.verdict for c in report.checks}
        assert verdicts["primary"] == "fail"
        assert verdicts["listen"] == "fail"
        assert not report.ok


@pytest.mark.parametrize("name", ["NULL", "null", "a,b", "{x}", 'q"uote', "back\\slash",
                                  " spaced ", "é"])
def test_the_check_after_a_listen_takes_any_name_in_its_array(dsn: str, name: str) -> None:
    # The other door into VERIFY_NEW_SQL: the names go in a text[] parameter,
    # where an unquoted NULL, a comma, a brace or a quote would change the
    # array (and the check would report a LISTEN that held as missing).
    with pgcast.connect(dsn) as ps:
        ps.listen(name)
        assert ps.listening_channels() == {name}
        ps.listen(name + "_2", name + "_3")
        assert ps.listening_channels() == {name, name + "_2", name + "_3"}
