"""A PubSub's behaviour, the same in both flavours: written once for asyncio;
tests/test_pubsub.py, the same tests for the sync flavour, is generated from
this file by tools/async_to_sync.py (edit this one, then run the script).

Each test opens its own PubSub inside its body (an asyncio fixture would need
a plugin); *conn* is a plain sync psycopg connection in both flavours: the
"other session" that sends.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import pgcast
import pgcast.aio
from _eventwait import acollect, acollect_until, ajoin, apause, arun, astart

Conn = psycopg.Connection[tuple[Any, ...]]


async def server_channels(ps: pgcast.AsyncPubSub) -> set[str]:
    """The PubSub's session's LISTENs, less the health check's own probe channel."""
    cur = await ps.connection.execute("SELECT pg_listening_channels()")
    rows = await cur.fetchall()
    return {r[0] for r in rows if not r[0].startswith("pgcast.probe.")}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def send_later(dsn: str, channel: str, *payloads: str, delay: float = 0.3) -> threading.Timer:
    """Send *payloads* from another session and thread, *delay* seconds from now."""

    def send() -> None:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
            for payload in payloads:
                pgcast.notify(c, channel, payload)

    timer = threading.Timer(delay, send)
    timer.start()
    return timer


# -- connect -------------------------------------------------------------------------------


def test_pubsub_needs_autocommit(dsn: str) -> None:
    async def body() -> None:
        c = await psycopg.AsyncConnection.connect(dsn)
        try:
            with pytest.raises(ValueError, match="autocommit"):
                pgcast.aio.AsyncPubSub(c)
        finally:
            await c.close()

    arun(body())


def test_bad_dsn_raises_connect_error() -> None:
    async def body() -> None:
        with pytest.raises(pgcast.ConnectError, match='missing "=" after "nonsense"') as info:
            await pgcast.aio.connect("nonsense dsn")
        assert isinstance(info.value.__cause__, psycopg.Error)

    arun(body())


def test_server_gone_raises_connect_error() -> None:
    async def body() -> None:
        port = closed_port()
        start = time.monotonic()
        with pytest.raises(pgcast.ConnectError, match="Connection refused") as info:
            await pgcast.aio.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        assert time.monotonic() - start < 10
        assert f"port {port} failed" in str(info.value)

    arun(body())


def test_unknown_database_raises_connect_error_with_server_message(dsn: str) -> None:
    async def body() -> None:
        kwargs: dict[str, Any] = dict(conninfo_to_dict(dsn))
        kwargs["dbname"] = "pgcast_no_such_db"
        advice = '"pgcast_no_such_db" does not exist; create it'
        with pytest.raises(pgcast.ConnectError, match=advice):
            await pgcast.aio.connect(**kwargs)

    arun(body())


def test_connect_given_a_psycopg_connection_says_to_wrap_it(dsn: str) -> None:
    # A newcomer's first guess; it failed with "'Connection' object has no
    # attribute 'encode'" from deep inside libpq's parser.
    async def body() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        try:
            with pytest.raises(TypeError) as raised:
                await pgcast.aio.connect(conn)  # type: ignore[arg-type]
            assert f"not {type(conn).__name__}; " in str(raised.value)
            assert "PubSub(conn)" in str(raised.value)
            async with pgcast.aio.AsyncPubSub(conn) as ps:  # the advice works
                await ps.notify("pgcast_wrapped", "x")
        finally:
            await conn.close()

    arun(body())

def test_close_is_idempotent_and_context_manager_closes(dsn: str) -> None:
    async def body() -> None:
        ps = await pgcast.aio.connect(dsn)
        await ps.close()
        await ps.close()
        assert ps.closed
        async with await pgcast.aio.connect(dsn) as ps2:
            assert not ps2.closed
        assert ps2.closed and ps2.connection.closed
        assert "closed" in repr(ps2)

    arun(body())


# -- listen / unlisten / listening_channels ------------------------------------------------


def test_listen_after_the_backend_was_terminated_listens_on_the_new_session(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    """The loss is noticed before the LISTEN is sent: the connection is
    restored and the LISTEN (planned again for the new session and its probe
    channel) takes effect; never a pooler diagnosis on a direct connection."""

    async def body() -> None:
        for _ in range(10):
            ps = await pgcast.aio.connect(dsn)
            try:
                conn.execute("SELECT pg_terminate_backend(%s)", (ps.backend_pid,))
                time.sleep(0.05)  # the server has closed the session
                await ps.listen(unique_channel)
                assert ps.generation == 1
                assert unique_channel in await server_channels(ps)
            finally:
                await ps.close()

    arun(body())


def test_listen_many_channels_in_one_and_several_calls(dsn: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            assert ps.listening_channels() == frozenset()
            await ps.listen("orders", "Prices")
            await ps.listen("third")
            await ps.listen("orders", "fourth")  # again: no error, no duplicate
            expected = frozenset({"orders", "Prices", "third", "fourth"})
            assert ps.listening_channels() == expected
            assert isinstance(ps.listening_channels(), frozenset)
            assert await server_channels(ps) == expected
            await ps.listen()  # nothing: nothing to do

    arun(body())


def test_unlisten_one_and_all(dsn: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen("a", "b", "c")
            await ps.unlisten("b")
            assert ps.listening_channels() == {"a", "c"}
            assert await server_channels(ps) == {"a", "c"}
            await ps.unlisten("not-listened")  # no error
            await ps.unlisten()
            assert ps.listening_channels() == frozenset()
            assert await server_channels(ps) == set()

    arun(body())


def test_listening_channels_is_a_snapshot(dsn: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen("a")
            snapshot = ps.listening_channels()
            await ps.listen("b")
            assert snapshot == {"a"}

    arun(body())


def test_notify_through_an_application_connection(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            pgcast.notify(conn, unique_channel, {"k": 1})
            pgcast.notify(conn, unique_channel)
            events = await acollect(ps, 2)
            assert [e.payload for e in events] == ['{"k":1}', ""]
            assert events[0].pid == conn.info.backend_pid

    arun(body())


# -- receiving -----------------------------------------------------------------------------


def test_events_yield_timeouts(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            start = time.monotonic()
            values: list[object] = []
            async for value in ps.events(select_timeout=0.1, yield_timeouts=True):
                values.append(value)
                if len(values) == 3:
                    break
            elapsed = time.monotonic() - start
            assert values == [None, None, None]
            assert 0.25 < elapsed < 5

    arun(body())


@pytest.mark.parametrize("bad", [0, -1, "5"])
def test_events_refuses_bad_select_timeout(dsn: str, bad: Any) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            with pytest.raises((ValueError, TypeError)):
                ps.events(select_timeout=bad)

    arun(body())


def test_wait_none_yields_events_only(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            sender = send_later(dsn, unique_channel, "a", "b")
            try:
                got: list[str] = []
                async for value in ps.wait(timeout=None):
                    assert isinstance(value, pgcast.Event)
                    got.append(value.payload)
                    if len(got) == 2:
                        break
            finally:
                sender.join(10)
            assert got == ["a", "b"]

    arun(body())


def test_wait_refuses_a_negative_timeout(dsn: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            with pytest.raises(ValueError):
                ps.wait(timeout=-1)

    arun(body())


def test_wait_positive_yields_idle_events(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            pgcast.notify(conn, unique_channel, "x")
            values: list[object] = []
            start = time.monotonic()
            async for value in ps.wait(timeout=0.1):
                values.append(value)
                if len(values) == 3:
                    break
            assert time.monotonic() - start < 5
            assert isinstance(values[0], pgcast.Event) and values[0].payload == "x"
            assert values[1:] == [None, None]

    arun(body())


# -- names ---------------------------------------------------------------------------------


def test_unquoted_notify_is_folded_to_lower_case(dsn: str, psql: Callable[..., str]) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen("prices")
            psql("NOTIFY Prices, 'folded'")
            [event] = await acollect(ps, 1)
            assert (event.channel, event.payload) == ("prices", "folded")

    arun(body())


# -- payloads ------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["nul\x00inside", b"bytes", 42])
def test_pubsub_refuses_what_no_channel_can_carry(
    dsn: str, unique_channel: str, payload: Any
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            with pytest.raises(pgcast.PayloadError):
                await ps.notify(unique_channel, payload)
            with pytest.raises(pgcast.PayloadError):
                await ps.notify_many([(unique_channel, "fine"), (unique_channel, payload)])
            await ps.notify(unique_channel, "end")
            assert [e.payload for e in await acollect_until(ps, "end")] == ["end"]

    arun(body())


def test_payload_limit_inside_the_application_transaction(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            with conn.transaction():
                pgcast.notify(conn, unique_channel, "kept")
                with pytest.raises(pgcast.PayloadTooLargeError):
                    pgcast.notify(conn, unique_channel, "é" * 4000)
                # Refused before sending, so the transaction is not aborted.
                pgcast.notify(conn, unique_channel, "end")
            assert [e.payload for e in await acollect_until(ps, "end")] == ["kept", "end"]

    arun(body())


def test_largest_payload_is_delivered(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            text = "é" * 3999 + "a"
            await ps.notify(unique_channel, text)
            assert (await acollect(ps, 1))[0].payload == text

    arun(body())


# -- transactions --------------------------------------------------------------------------


def test_transaction_delivers_at_commit_only(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps, await pgcast.aio.connect(dsn) as listener:
            await listener.listen(unique_channel)
            async with ps.transaction():
                await ps.notify(unique_channel, "in transaction")
                await ps.notify_many([(unique_channel, "batched")])
                pgcast.notify(conn, unique_channel, "outside")
                got = await acollect_until(listener, "outside")
                assert [e.payload for e in got] == ["outside"]
            got = await acollect(listener, 2)
            assert [e.payload for e in got] == ["in transaction", "batched"]

    arun(body())


def test_transaction_rolled_back_delivers_nothing(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            with pytest.raises(ZeroDivisionError):
                async with ps.transaction():
                    await ps.notify(unique_channel, "rolled back")
                    1 / 0  # noqa: B018
            await ps.notify(unique_channel, "end")
            assert [e.payload for e in await acollect_until(ps, "end")] == ["end"]

    arun(body())


def test_identical_notifications_in_one_transaction_arrive_once(
    dsn: str, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            async with ps.transaction():
                for _ in range(3):
                    await ps.notify(unique_channel, "same")
                await ps.notify(unique_channel, "other")
                await ps.notify(unique_channel, "same")
            await ps.notify_many([(unique_channel, "dup")] * 3)
            await ps.notify(unique_channel, "end")
            got = [e.payload for e in await acollect_until(ps, "end")]
            assert got == ["same", "other", "dup", "end"]

    arun(body())


# -- the seeds' semantics ------------------------------------------------------------------


def test_order_is_preserved(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            for i in range(1000):
                pgcast.notify(conn, unique_channel, str(i))
            got = await acollect(ps, 1000, timeout=30)
            assert [int(e.payload) for e in got] == list(range(1000))

    arun(body())


def test_notification_before_listen_is_not_received(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            pgcast.notify(conn, unique_channel, "too early")
            await ps.listen(unique_channel)
            pgcast.notify(conn, unique_channel, "end")
            assert [e.payload for e in await acollect_until(ps, "end")] == ["end"]

    arun(body())


# -- notify_many ---------------------------------------------------------------------------


def test_notify_many_in_order(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            other = unique_channel + "_b"
            await ps.listen(unique_channel, other)
            messages: list[tuple[str, pgcast.Payload]] = [
                (unique_channel if i % 3 else other, str(i)) for i in range(500)
            ]
            messages.append((other, {"json": True}))
            await ps.notify_many(messages)
            got = await acollect(ps, 501)
            assert [(e.channel, e.payload) for e in got[:500]] == messages[:500]
            assert got[500].json() == {"json": True}
            assert await ps.notify_many([]) is None  # nothing to send

    arun(body())


def test_notify_many_is_one_transaction(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        # Identical notifications are folded only within one transaction.
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            await ps.notify_many(
                [(unique_channel, "x"), (unique_channel, "x"), (unique_channel, "end")]
            )
            assert [e.payload for e in await acollect_until(ps, "end")] == ["x", "end"]

    arun(body())


def test_notify_many_bad_message_sends_none(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            with pytest.raises(pgcast.InvalidChannelError):
                await ps.notify_many([(unique_channel, "1"), ("", "2")])
            with pytest.raises(pgcast.PayloadError):
                await ps.notify_many([(unique_channel, "1"), (unique_channel, "nul\x00")])
            with pytest.raises(pgcast.PayloadError):
                await ps.notify_many(
                    [(unique_channel, "1"), (unique_channel, 42)]  # type: ignore[list-item]
                )
            await ps.notify(unique_channel, "end")
            assert [e.payload for e in await acollect_until(ps, "end")] == ["end"]

    arun(body())


#: Rounds of the close-while-notifying race: each closes after a different
#: delay, from before the first notify to well inside the loop.
CLOSE_RACE_ROUNDS = 40


async def close_while_notifying(dsn: str, channel: str, delay: float) -> Exception | None:
    """Notify in a loop in another task (thread, in the sync twin), close the
    PubSub after *delay* s; what the notify loop raised (None: it finished)."""
    ps = await pgcast.aio.connect(dsn)
    outcomes: list[Exception | None] = []

    async def publish() -> None:
        try:
            for i in range(10_000):
                await ps.notify(channel, str(i))
            outcomes.append(None)
        except Exception as exc:
            outcomes.append(exc)

    publisher = astart(publish)
    try:
        await apause(delay)
    finally:
        await ps.close()
    await ajoin(publisher)
    assert ps.closed
    assert len(outcomes) == 1
    return outcomes[0]


def test_close_racing_notify_raises_closed_error(dsn: str, unique_channel: str) -> None:
    """A PubSub closed by another task (thread, in the sync twin) while
    notify() runs: the notify raises ClosedError, never a psycopg exception
    (a CI run on PostgreSQL 15 once saw a bare DatabaseError, "got no result
    from the query"), nor an OSError of a wait on the closed socket."""

    async def body() -> None:
        for attempt in range(CLOSE_RACE_ROUNDS):
            delay = 0.0005 * (attempt % 20)
            outcome = await close_while_notifying(dsn, unique_channel, delay)
            assert outcome is None or type(outcome) is pgcast.ClosedError, repr(outcome)

    arun(body())


def test_commands_from_two_tasks_at_once_each_run_once_in_order(
    dsn: str, unique_channel: str
) -> None:
    """Commands that return nothing share one cursor per connection (a fresh
    one per NOTIFY cost a third of psycopg's client work): notify() from two
    tasks (threads, in the sync twin) at once, with a command that fetches in
    between, sends every message once, in each sender's order."""
    count = 150

    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as sender, \
                await pgcast.aio.connect(dsn) as receiver:
            await receiver.listen(unique_channel)
            usages: list[float] = []

            async def publish() -> None:
                for i in range(count):
                    await sender.notify(unique_channel, f"other {i}")
                    if i % 10 == 0:
                        usages.append(await sender.queue_usage())

            other = astart(publish)
            for i in range(count):
                await sender.notify(unique_channel, f"main {i}")
            await ajoin(other)
            got = [e.payload for e in await acollect(receiver, 2 * count)]
            for who in ("main", "other"):
                mine = [p for p in got if p.startswith(who)]
                assert mine == [f"{who} {i}" for i in range(count)]
            assert len(usages) == count // 10 and 0.0 <= min(usages) <= max(usages) < 1.0
            await sender.notify(unique_channel, "still usable")
            assert [e.payload for e in await acollect(receiver, 1)] == ["still usable"]

    arun(body())


# -- connecting: the arguments psycopg takes, and pgcast's defaults -------------


def test_connect_with_a_dsn(dsn: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            assert isinstance(ps, pgcast.AsyncPubSub)
            assert not ps.closed
            cur = await ps.connection.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None and row[0] == ps.backend_pid
            assert ps.connection.autocommit

    arun(body())


def test_connect_with_psycopg_keyword_args(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        kwargs = dict(conninfo_to_dict(dsn))
        async with await pgcast.aio.connect(**kwargs) as ps:
            await ps.listen(unique_channel)
            await ps.notify(unique_channel, "by keywords")
            got = await acollect(ps, 1)
            assert got[0].payload == "by keywords"

    arun(body())


def test_connect_with_no_args_uses_database_url(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", dsn)
    # DATABASE_URL comes first: PG* variables pointing nowhere are not used.
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(closed_port()))

    async def body() -> None:
        async with await pgcast.aio.connect() as ps:
            assert ps.backend_pid > 0

    arun(body())


def test_connect_with_no_args_uses_pg_variables(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER",
             "dbname": "PGDATABASE", "password": "PGPASSWORD"}
    for key, value in conninfo_to_dict(dsn).items():
        if key in names:
            monkeypatch.setenv(names[key], str(value))

    async def body() -> None:
        async with await pgcast.aio.connect() as ps:
            assert ps.backend_pid > 0
            assert ps.connection.info.port == int(conninfo_to_dict(dsn).get("port") or 5432)

    arun(body())


def test_connection_settings(dsn: str) -> None:
    """connect_timeout 10, application_name pgcast, UTF-8, unless told otherwise."""

    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            params = ps.connection.info.get_parameters()
            assert params["connect_timeout"] == "10"
            assert params["application_name"] == "pgcast"
            assert ps.connection.info.encoding == "utf-8"

    arun(body())


def test_settings_in_the_dsn_are_not_overridden(dsn: str) -> None:
    sep = "&" if "?" in dsn else "?"

    async def body() -> None:
        async with await pgcast.aio.connect(
            f"{dsn}{sep}connect_timeout=3&application_name=mine"
        ) as ps:
            params = ps.connection.info.get_parameters()
            assert params["connect_timeout"] == "3"
            assert params["application_name"] == "mine"
        async with await pgcast.aio.connect(
            dsn, connect_timeout=4, application_name="kw"
        ) as ps:
            params = ps.connection.info.get_parameters()
            assert (params["connect_timeout"], params["application_name"]) == ("4", "kw")

    arun(body())
