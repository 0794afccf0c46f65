# Generated from tests/test_aio_pubsub.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
"""A PubSub's behaviour, the same in both flavours: written once for asyncio;
tests/test_pubsub.py, the same tests for the sync flavour, is generated from
this file by tools/async_to_sync.py (edit this one, then run the script).

Each test opens its own PubSub inside its body (an asyncio fixture would need
a plugin); *conn* is a plain sync psycopg connection in both flavours: the
"other session" that sends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pgcast
import pgcast.aio
from _eventwait import collect, collect_until, run_sync

Conn = psycopg.Connection[tuple[Any, ...]]

# -- names ---------------------------------------------------------------------------------


def test_unquoted_notify_is_folded_to_lower_case(dsn: str, psql: Callable[..., str]) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            ps.listen("prices")
            psql("NOTIFY Prices, 'folded'")
            [event] = collect(ps, 1)
            assert (event.channel, event.payload) == ("prices", "folded")

    run_sync(body())


# -- payloads ------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["nul\x00inside", b"bytes", 42])
def test_pubsub_refuses_what_no_channel_can_carry(
    dsn: str, unique_channel: str, payload: Any
) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            ps.listen(unique_channel)
            with pytest.raises(pgcast.PayloadError):
                ps.notify(unique_channel, payload)
            with pytest.raises(pgcast.PayloadError):
                ps.notify_many([(unique_channel, "fine"), (unique_channel, payload)])
            ps.notify(unique_channel, "end")
            assert [e.payload for e in collect_until(ps, "end")] == ["end"]

    run_sync(body())


def test_payload_limit_inside_the_application_transaction(
    dsn: str, conn: Conn, unique_channel: str
) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            ps.listen(unique_channel)
            with conn.transaction():
                pgcast.notify(conn, unique_channel, "kept")
                with pytest.raises(pgcast.PayloadTooLargeError):
                    pgcast.notify(conn, unique_channel, "é" * 4000)
                # Refused before sending, so the transaction is not aborted.
                pgcast.notify(conn, unique_channel, "end")
            assert [e.payload for e in collect_until(ps, "end")] == ["kept", "end"]

    run_sync(body())


def test_largest_payload_is_delivered(dsn: str, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            ps.listen(unique_channel)
            text = "é" * 3999 + "a"
            ps.notify(unique_channel, text)
            assert collect(ps, 1)[0].payload == text

    run_sync(body())


# -- transactions --------------------------------------------------------------------------


def test_transaction_delivers_at_commit_only(dsn: str, conn: Conn, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps, pgcast.connect(dsn) as listener:
            listener.listen(unique_channel)
            with ps.transaction():
                ps.notify(unique_channel, "in transaction")
                ps.notify_many([(unique_channel, "batched")])
                pgcast.notify(conn, unique_channel, "outside")
                got = collect_until(listener, "outside")
                assert [e.payload for e in got] == ["outside"]
            got = collect(listener, 2)
            assert [e.payload for e in got] == ["in transaction", "batched"]

    run_sync(body())


def test_transaction_rolled_back_delivers_nothing(dsn: str, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            ps.listen(unique_channel)
            with pytest.raises(ZeroDivisionError), ps.transaction():
                ps.notify(unique_channel, "rolled back")
                1 / 0  # noqa: B018
            ps.notify(unique_channel, "end")
            assert [e.payload for e in collect_until(ps, "end")] == ["end"]

    run_sync(body())


def test_identical_notifications_in_one_transaction_arrive_once(
    dsn: str, unique_channel: str
) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            ps.listen(unique_channel)
            with ps.transaction():
                for _ in range(3):
                    ps.notify(unique_channel, "same")
                ps.notify(unique_channel, "other")
                ps.notify(unique_channel, "same")
            ps.notify_many([(unique_channel, "dup")] * 3)
            ps.notify(unique_channel, "end")
            got = [e.payload for e in collect_until(ps, "end")]
            assert got == ["same", "other", "dup", "end"]

    run_sync(body())


# -- the seeds' semantics ------------------------------------------------------------------


def test_order_is_preserved(dsn: str, conn: Conn, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            ps.listen(unique_channel)
            for i in range(1000):
                pgcast.notify(conn, unique_channel, str(i))
            got = collect(ps, 1000, timeout=30)
            assert [int(e.payload) for e in got] == list(range(1000))

    run_sync(body())


def test_notification_before_listen_is_not_received(
    dsn: str, conn: Conn, unique_channel: str
) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            pgcast.notify(conn, unique_channel, "too early")
            ps.listen(unique_channel)
            pgcast.notify(conn, unique_channel, "end")
            assert [e.payload for e in collect_until(ps, "end")] == ["end"]

    run_sync(body())


# -- notify_many ---------------------------------------------------------------------------


def test_notify_many_in_order(dsn: str, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            other = unique_channel + "_b"
            ps.listen(unique_channel, other)
            messages: list[tuple[str, pgcast.Payload]] = [
                (unique_channel if i % 3 else other, str(i)) for i in range(500)
            ]
            messages.append((other, {"json": True}))
            ps.notify_many(messages)
            got = collect(ps, 501)
            assert [(e.channel, e.payload) for e in got[:500]] == messages[:500]
            assert got[500].json() == {"json": True}
            assert ps.notify_many([]) is None  # nothing to send

    run_sync(body())


def test_notify_many_is_one_transaction(dsn: str, unique_channel: str) -> None:

    def body() -> None:
        # Identical notifications are folded only within one transaction.
        with pgcast.connect(dsn) as ps:
            ps.listen(unique_channel)
            ps.notify_many([(unique_channel, "x"), (unique_channel, "x"), (unique_channel, "end")])
            assert [e.payload for e in collect_until(ps, "end")] == ["x", "end"]

    run_sync(body())


def test_notify_many_bad_message_sends_none(dsn: str, unique_channel: str) -> None:

    def body() -> None:
        with pgcast.connect(dsn) as ps:
            ps.listen(unique_channel)
            with pytest.raises(pgcast.InvalidChannelError):
                ps.notify_many([(unique_channel, "1"), ("", "2")])
            with pytest.raises(pgcast.PayloadError):
                ps.notify_many([(unique_channel, "1"), (unique_channel, "nul\x00")])
            with pytest.raises(pgcast.PayloadError):  # type: ignore[list-item]
                ps.notify_many([(unique_channel, "1"), (unique_channel, 42)])
            ps.notify(unique_channel, "end")
            assert [e.payload for e in collect_until(ps, "end")] == ["end"]

    run_sync(body())
