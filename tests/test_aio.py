"""A PubSub's connection and its end, the same in both flavours: written once
for asyncio; tests/test_client.py, the same tests for the sync flavour, is
generated from this file by tools/async_to_sync.py (edit this one, then run
the script).

Connect errors that are a pgcast error with the server's message and never
a hang, iteration that yields only events, a closed PubSub refusing every
use, waking on the socket, and close() racing notify(). The rest of the
PubSub's contract is in test_aio_pubsub.py, test_aio_wire.py and
test_aio_receive.py (the same way).
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

import _faults
import _hba
import pgcast
import pgcast.aio
from _eventwait import ajoin, apause, arun, astart
from pgcast.embedded import EmbeddedServer

Conn = psycopg.Connection[tuple[Any, ...]]
password_role = _hba.password_role  # a fixture


def send(dsn: str, channel: str, *payloads: str) -> None:
    """Send *payloads* on *channel* from a session of its own."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
        for payload in payloads:
            pgcast.notify(c, channel, payload)


# -- connect errors: a pgcast error with the server's message, never a hang ----


def test_server_that_never_answers_times_out() -> None:
    # A socket that accepts TCP connections but never speaks: without
    # connect_timeout, libpq would wait for the server's reply forever.
    async def body(port: int) -> None:
        start = time.monotonic()
        with pytest.raises(pgcast.ConnectError, match="timeout"):
            await pgcast.aio.connect(
                f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=1
            )
        assert time.monotonic() - start < 10

    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        arun(body(mute.getsockname()[1]), timeout=15)


def test_wrong_password_raises_connect_error(
    server: EmbeddedServer, password_role: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    role, password = password_role
    monkeypatch.delenv("PGPASSWORD", raising=False)
    base = f"127.0.0.1:{server.port}/postgres"

    async def body() -> None:
        with pytest.raises(
            pgcast.ConnectError, match=f'password authentication failed for user "{role}"'
        ) as raised:
            await pgcast.aio.connect(f"postgresql://{role}:wrong@{base}")
        assert "; check the password (in the DSN, PGPASSWORD or ~/.pgpass)" in str(raised.value)
        with pytest.raises(pgcast.ConnectError, match="no password supplied") as raised:
            await pgcast.aio.connect(f"postgresql://{role}@{base}", passfile="/dev/null")
        assert "; give one in the DSN" in str(raised.value)
        async with await pgcast.aio.connect(f"postgresql://{role}:{password}@{base}") as ps:
            assert ps.backend_pid > 0

    arun(body())


# -- receiving ---------------------------------------------------------------------


def test_events_without_yield_timeouts_only_yields_events(dsn: str, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            for iterate in (lambda: ps.events(select_timeout=0.05), lambda: ps.wait(None)):
                sender = threading.Timer(0.3, send, (dsn, unique_channel, "late"))
                sender.start()
                try:
                    async for event in iterate():
                        first = event
                        break
                finally:
                    sender.join(10)
                assert isinstance(first, pgcast.Event) and first.payload == "late"

    arun(body())


def test_receiving_wakes_on_the_socket(dsn: str, unique_channel: str) -> None:
    # select_timeout=30: an event can only arrive promptly if the wait ends
    # on the socket becoming readable, not on a timer. The sender is a
    # thread with a session of its own in both flavours.
    rounds = 50
    ready = threading.Event()
    sent_at: list[float] = []
    latencies: list[float] = []

    def sender() -> None:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
            for i in range(rounds):
                if not ready.wait(10):
                    return
                ready.clear()
                time.sleep(0.002)  # let the listener block on its socket
                sent_at.append(time.perf_counter())
                pgcast.notify(c, unique_channel, str(i))

    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(unique_channel)
            thread = threading.Thread(target=sender, daemon=True)
            thread.start()
            ready.set()
            async for event in ps.events(select_timeout=30, yield_timeouts=True):
                assert isinstance(event, pgcast.Event), "no event within 30 s"
                latencies.append(time.perf_counter() - sent_at[int(event.payload)])
                if len(latencies) == rounds:
                    break
                ready.set()
            thread.join(10)

    arun(body())
    assert statistics.median(latencies) < 0.020, sorted(latencies)


# -- close ---------------------------------------------------------------------


USES: list[Callable[[pgcast.AsyncPubSub], Awaitable[object]]] = [
    lambda ps: ps.listen("x"),
    lambda ps: ps.unlisten("x"),
    lambda ps: ps.unlisten(),
    lambda ps: ps.notify("x", "p"),
    lambda ps: ps.notify_many([("x", "p")]),
    lambda ps: ps.get_event(),
    lambda ps: ps.events().__anext__(),
    lambda ps: ps.wait(0).__anext__(),
    lambda ps: ps.transaction().__aenter__(),
    lambda ps: ps.subscribe("x", print),
]
if True:  # ASYNC
    USES.append(lambda ps: ps.run())
else:
    USES.append(lambda ps: ps.run_in_thread())


@pytest.mark.parametrize("use", USES)
def test_using_a_closed_pubsub_raises_closed_error(
    dsn: str, use: Callable[[pgcast.AsyncPubSub], Awaitable[object]]
) -> None:
    async def body() -> None:
        ps = await pgcast.aio.connect(dsn)
        await ps.listen("x")
        await ps.close()
        with pytest.raises(pgcast.ClosedError, match="closed"):
            await use(ps)

    arun(body())


@pytest.mark.parametrize("delay_ms", [0, 1, 2, 5, 10, 20, 50])
def test_close_while_notifying_raises_closed_error(
    dsn: str, unique_channel: str, delay_ms: int
) -> None:
    """close() from the test body while another task (a thread, in the sync
    flavour) runs notify(): every notify after the close started raises
    ClosedError, never a psycopg or a database error made up from the torn
    connection (the race hammered at several delays)."""
    outcomes: list[str] = []

    async def body() -> None:
        ps = await pgcast.aio.connect(dsn)

        async def publish() -> None:
            try:
                for i in range(5_000):
                    await ps.notify(unique_channel, str(i))
                outcomes.append("finished")
            except pgcast.PgcastError as exc:
                outcomes.append(type(exc).__name__)

        publisher = astart(publish)
        await apause(delay_ms / 1000)
        await ps.close()
        await ajoin(publisher, 10)  # fails if notify() did not end within 10 s

    arun(body())
    assert outcomes in (["finished"], ["ClosedError"])


# -- the server's notification queue full ------------------------------------------

small_queue_server = _faults.small_queue_server  # a fixture


def test_a_full_notification_queue_is_a_clear_error_not_a_lost_connection(
    small_queue_server: EmbeddedServer, unique_channel: str
) -> None:
    # NOTIFY with the server's queue full fails with "too many notifications
    # in the NOTIFY queue" (54000): nothing was sent, and the connection is
    # fine. It used to raise ConnectionLostError ("connection to PostgreSQL
    # lost ... the server may or may not have run it") and drop the
    # connection, to be reconnected.
    dsn = small_queue_server.dsn

    async def body() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            holder = _faults.fill_notify_queue(dsn)
            try:
                with pytest.raises(pgcast.DatabaseError) as info:
                    await ps.notify(unique_channel, "refused")
                assert not isinstance(info.value, pgcast.ConnectionLostError)
                assert "too many notifications in the NOTIFY queue" in str(info.value)
                # The connection is still the same, and usable.
                await ps.listen(unique_channel)
                assert ps.generation == 0
            finally:
                holder.close()

    arun(body())
