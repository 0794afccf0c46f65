"""Health checks: the pure probe schedule (pgcast._health), and against real
PostgreSQL through a loopback TCP proxy that can silently drop a connection.
"""

from __future__ import annotations

import asyncio
import select
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgcast
import pgcast.aio
from _eventwait import arun
from _faults import auntil, markers, payloads, until
from pgcast._health import HealthCheck, check_interval, keepalive_options, probe_channel
from tcp_proxy import TcpProxy

Conn = psycopg.Connection[tuple[object, ...]]

INTERVAL = 0.5


# -- the pure schedule -----------------------------------------------------------


def test_probe_after_an_interval_of_silence_and_death_one_interval_later() -> None:
    h = HealthCheck(10.0, last_heard=100.0)
    assert not h.should_probe(109.9)
    assert h.next_check(105.0) == 5.0
    assert h.should_probe(110.0)
    h.probe_sent(110.0)
    assert not h.should_probe(115.0)  # one probe at a time
    assert h.deadline() == 120.0
    assert h.next_check(112.0) == 8.0
    assert not h.is_dead(119.9)
    assert h.is_dead(120.0)  # two intervals after the last word from the server
    assert h.silence(120.0) == 20.0


def test_an_answer_clears_the_probe() -> None:
    h = HealthCheck(1.0, last_heard=0.0)
    h.probe_sent(1.0)
    h.heard(1.2)
    assert h.probe_sent_at is None and h.last_heard == 1.2
    assert not h.is_dead(5.0)
    assert h.should_probe(2.2)
    h.heard(0.5)  # a stale report never moves the clock back
    assert h.last_heard == 1.2


def test_interval_zero_turns_it_off() -> None:
    h = HealthCheck(0.0, last_heard=0.0)
    assert not h.enabled
    assert not h.should_probe(1e9)
    h.probe_sent(0.0)
    assert not h.is_dead(1e9)
    assert h.next_check(5.0) is None and h.deadline() is None


def test_reset_starts_afresh() -> None:
    h = HealthCheck(1.0, last_heard=0.0)
    h.probe_sent(1.0)
    h.reset(50.0)
    assert h.probe_sent_at is None and h.last_heard == 50.0


@given(interval=st.floats(0.01, 1000), start=st.floats(0, 1e6))
def test_death_is_declared_exactly_two_intervals_after_silence_began(
    interval: float, start: float
) -> None:
    """A driver that probes when due and checks after each wait declares a
    silent connection dead no sooner than 2 intervals and no later."""
    h = HealthCheck(interval, last_heard=start)
    now = start
    for _ in range(10):
        if h.should_probe(now):
            h.probe_sent(now)
        if h.is_dead(now):
            break
        wait = h.next_check(now)
        assert wait is not None
        now += wait
    assert h.is_dead(now)
    assert now - start == pytest.approx(2 * interval)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, 0.0), (0, 0.0), (30, 30.0), (0.25, 0.25)]
)
def test_check_interval_accepts(value: float | None, expected: float) -> None:
    assert check_interval(value) == expected


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf")])
def test_check_interval_refuses_bad_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="health_check_interval must be >= 0 seconds"):
        check_interval(value)


def test_check_interval_refuses_non_numbers() -> None:
    with pytest.raises(TypeError, match="health_check_interval must be a number"):
        check_interval("30")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        check_interval(True)


def test_keepalive_options_follow_the_interval() -> None:
    assert keepalive_options(30) == {
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 60_000,
    }
    off = keepalive_options(0)
    assert off["keepalives_idle"] == 30 and "tcp_user_timeout" not in off
    assert keepalive_options(0.2)["keepalives_idle"] == 1
    assert keepalive_options(0.2)["tcp_user_timeout"] == 1000


def test_probe_channel_names_the_backend() -> None:
    assert probe_channel(1234) == "pgcast.probe.1234"


# -- against the server ------------------------------------------------------------


def test_keepalives_are_set_on_the_connection_unless_given(dsn: str) -> None:
    with pgcast.connect(dsn, health_check_interval=10) as ps:
        params = ps.connection.info.get_parameters()
        assert params["keepalives_idle"] == "10"
        assert params["tcp_user_timeout"] == "20000"
    with pgcast.connect(dsn, keepalives_idle=77) as ps:
        assert ps.connection.info.get_parameters()["keepalives_idle"] == "77"


def test_probes_are_sent_and_never_reach_the_user(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    with pgcast.connect(dsn, health_check_interval=0.1) as ps:
        ps.listen(unique_channel)
        # Another session listening to the private probe channel sees them.
        conn.execute(f'LISTEN "{probe_channel(ps.backend_pid)}"')
        deadline = time.monotonic() + 1.0
        for item in ps.events(select_timeout=0.05, yield_timeouts=True):
            assert item is None, f"a probe reached the user: {item}"
            if time.monotonic() > deadline:
                break
        seen = list(conn.notifies(timeout=1.0, stop_after=3))
        assert len(seen) >= 3
        assert {n.channel for n in seen} == {probe_channel(ps.backend_pid)}
        assert ps.listening_channels() == {unique_channel}
        assert ps.generation == 0  # healthy: never reconnected


def test_probes_and_concurrent_commands_do_not_collide(
    dsn: str, conn: Conn, unique_channel: str
) -> None:
    # A short interval makes probes overlap with another thread's notifies:
    # libpq runs one command at a time, so each notify waits for the probe.
    # (Not shorter: on a starved CI machine a probe answered later than one
    # interval counts as a dead connection, which is not what is tested here.)
    count = 300
    with pgcast.connect(dsn, health_check_interval=0.05) as ps:
        ps.listen(unique_channel)
        errors: list[BaseException] = []

        def publish() -> None:
            try:
                for i in range(count):
                    ps.notify(unique_channel, str(i))
                    if i % 50 == 0:
                        time.sleep(0.1)  # let probes fall due
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=publish)
        thread.start()
        try:
            got = until(ps, str(count - 1), timeout=60)
        finally:
            thread.join(60)
        assert errors == []
        assert payloads(got) == [str(i) for i in range(count)]
        assert markers(got) == []


@pytest.fixture
def proxy(dsn: str) -> Iterator[TcpProxy]:
    with TcpProxy.for_dsn(dsn) as p:
        yield p


def test_a_blackholed_connection_is_noticed_and_replaced(
    dsn: str, conn: Conn, proxy: TcpProxy, unique_channel: str
) -> None:
    with pgcast.connect(proxy.dsn(dsn), health_check_interval=INTERVAL) as ps:
        ps.listen(unique_channel)
        assert proxy.blackhole() == 1
        started = time.monotonic()
        got = until(ps, pgcast.Reconnected, timeout=4 * INTERVAL + 5)
        elapsed = time.monotonic() - started
        marker = markers(got)[0]
        assert "health check" in marker.error
        assert elapsed >= INTERVAL  # not before a probe could have been answered
        assert proxy.accepted == 2  # the new connection went through the proxy
        conn.execute("SELECT pg_notify(%s, 'after')", (unique_channel,))
        assert payloads(until(ps, "after")) == ["after"]


def test_without_health_checks_a_blackhole_goes_unnoticed(
    dsn: str, proxy: TcpProxy, unique_channel: str
) -> None:
    with pgcast.connect(proxy.dsn(dsn), health_check_interval=0) as ps:
        ps.listen(unique_channel)
        proxy.blackhole()
        deadline = time.monotonic() + 4 * INTERVAL
        for item in ps.events(select_timeout=0.05, yield_timeouts=True):
            assert item is None
            if time.monotonic() > deadline:
                break
        assert ps.generation == 0


def test_a_notify_stuck_in_a_blackhole_fails_clearly_and_the_listener_recovers(
    dsn: str, conn: Conn, proxy: TcpProxy, unique_channel: str
) -> None:
    with pgcast.connect(proxy.dsn(dsn), health_check_interval=INTERVAL) as ps:
        ps.listen(unique_channel)
        outcome: list[BaseException | None] = []
        got: list[pgcast.Event | pgcast.Reconnected] = []

        def listen() -> None:
            got.extend(until(ps, pgcast.Reconnected, timeout=4 * INTERVAL + 5))

        listener = threading.Thread(target=listen)
        listener.start()
        time.sleep(0.1)
        proxy.blackhole()
        try:
            ps.notify(unique_channel, "into-the-void")
            outcome.append(None)
        except pgcast.ConnectionLostError as exc:
            outcome.append(exc)
        listener.join(4 * INTERVAL + 10)
        assert not listener.is_alive()
        # The notify went out on the dead connection: it cannot know whether
        # the server ran it, and says so instead of hanging or pretending.
        assert outcome and isinstance(outcome[0], pgcast.ConnectionLostError)
        assert "may or may not have run it" in str(outcome[0])
        assert len(markers(got)) == 1
        ps.notify(unique_channel, "after")
        assert payloads(until(ps, "after")) == ["after"]


def test_asyncio_blackholed_connection_is_noticed_and_replaced(
    dsn: str, conn: Conn, proxy: TcpProxy, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(
            proxy.dsn(dsn), health_check_interval=INTERVAL
        ) as aps:
            await aps.listen(unique_channel)
            proxy.blackhole()
            got = await auntil(aps, pgcast.Reconnected, timeout=4 * INTERVAL + 5)
            assert "health check" in markers(got)[0].error
            conn.execute("SELECT pg_notify(%s, 'after')", (unique_channel,))
            assert payloads(await auntil(aps, "after")) == ["after"]

    arun(body())


def test_asyncio_notify_stuck_in_a_blackhole_fails_clearly(
    dsn: str, proxy: TcpProxy, unique_channel: str
) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(
            proxy.dsn(dsn), health_check_interval=INTERVAL
        ) as aps:
            await aps.listen(unique_channel)
            listener = asyncio.create_task(
                auntil(aps, pgcast.Reconnected, timeout=4 * INTERVAL + 5)
            )
            await asyncio.sleep(0.1)
            proxy.blackhole()
            with pytest.raises(pgcast.ConnectionLostError, match="may or may not have run it"):
                await asyncio.wait_for(aps.notify(unique_channel, "void"), 4 * INTERVAL + 10)
            got = await asyncio.wait_for(listener, 4 * INTERVAL + 10)
            assert len(markers(got)) == 1
            await aps.notify(unique_channel, "after")
            assert payloads(await auntil(aps, "after")) == ["after"]

    arun(body())


def test_asyncio_probes_never_reach_the_user(dsn: str, conn: Conn, unique_channel: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn, health_check_interval=0.1) as aps:
            await aps.listen(unique_channel)
            conn.execute(f'LISTEN "{probe_channel(aps.backend_pid)}"')
            deadline = time.monotonic() + 1.0
            async for item in aps.events(select_timeout=0.05, yield_timeouts=True):
                assert item is None, f"a probe reached the user: {item}"
                if time.monotonic() > deadline:
                    break
            return None

    arun(body())
    seen = list(conn.notifies(timeout=1.0, stop_after=3))
    assert len(seen) >= 3


def test_health_tick_lets_a_supervisor_run_the_check(
    dsn: str, conn: Conn, proxy: TcpProxy, unique_channel: str
) -> None:
    with pgcast.connect(proxy.dsn(dsn), health_check_interval=INTERVAL) as ps:
        assert ps.health_tick() is None  # not listening: nothing to check
        ps.listen(unique_channel)
        proxy.blackhole()
        deadline = time.monotonic() + 4 * INTERVAL + 5
        with pytest.raises(pgcast.ConnectionLostError, match="health check"):
            while time.monotonic() < deadline:
                wait = ps.health_tick()
                assert wait is not None and wait <= INTERVAL
                ready, _, _ = select.select([ps.fileno()], [], [], wait)
                if ready:
                    ps.read_ready()
        marker = ps.reconnect()
        assert "health check" in marker.error
        conn.execute("SELECT pg_notify(%s, 'after')", (unique_channel,))
        assert payloads(until(ps, "after")) == ["after"]
