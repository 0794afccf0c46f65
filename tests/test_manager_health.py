"""Health checks of the connections a NotificationManager watches (issue 4).

A managed PubSub never runs its own wait, where a PubSub probes its
connection, so the manager runs the checks (:mod:`pgcast.manager._policy`
decides when, the drivers call ``health_tick()``). Proven here, sync and
asyncio, against real PostgreSQL through the loopback proxy of tcp_proxy.py,
whose blackhole drops a connection without a FIN or RST:

* a blackholed managed connection is noticed within about two intervals and
  goes to ``garbage`` (``reconnect=False``), or is reconnected and delivers
  a :class:`~pgcast.Reconnected` marker, then new events (``reconnect=True``),
  while another managed connection keeps delivering throughout;
* a manager with ``timeout=None`` wakes itself for the checks;
* healthy managed connections are probed, their answers read, and they stay.

The pure part shows the wake-up cost: with 500 connections, a wake-up looks
at the top of the checks' heap, not at every connection.

Every loop is bounded in time and fails loudly; managers with
``timeout=None`` are guarded by a watchdog that wakes them with a
notification (or ends their iteration) after :data:`WATCHDOG` seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest

import pgcast
import pgcast.aio
from _eventwait import arun
from pgcast._core import Core, Wait
from pgcast._health import HealthCheck, probe_channel
from pgcast.aio import AsyncPubSub
from pgcast.manager._policy import HealthTick, ManagerCore, Read, Register, Unregister
from tcp_proxy import TcpProxy

Conn = psycopg.Connection[tuple[Any, ...]]
Value = tuple[Any, list[pgcast.Event | pgcast.Reconnected]] | None

#: The health_check_interval of the connections under test.
INTERVAL = 0.5
#: A silently dropped connection is found dead at most two intervals after
#: the server was last heard from; the rest is room for a loaded machine.
NOTICED_WITHIN = 3 * INTERVAL + 1.0
#: The hard bound of every loop here: fail, never hang.
LIMIT = 4 * INTERVAL + 10
#: The watchdog's delay: far longer than any wait a passing test does.
WATCHDOG = 15.0
#: How often the other connection's sender notifies.
EVERY = 0.1


def channel() -> str:
    return f"nmh_{uuid.uuid4().hex[:12]}"


def notify(conn: Conn, channel: str, payload: str = "") -> None:
    conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def payloads(values: list[Value], ps: object) -> list[str]:
    """The payloads of *ps*'s events in *values*, in order."""
    return [e.payload for x in values if x is not None and x[0] is ps for e in x[1]
            if isinstance(e, pgcast.Event)]


def markers(values: list[Value], ps: object) -> list[pgcast.Reconnected]:
    return [e for x in values if x is not None and x[0] is ps for e in x[1]
            if isinstance(e, pgcast.Reconnected)]


class Sender:
    """Notifies *channel* from a thread every :data:`EVERY` seconds with
    ``"0"``, ``"1"``, ..., on a connection of its own, until :meth:`stop`."""

    def __init__(self, dsn: str, channel: str) -> None:
        self.dsn = dsn
        self.channel = channel
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as c:
                while not self._stop.is_set():
                    notify(c, self.channel, str(self.sent))
                    self.sent += 1
                    self._stop.wait(EVERY)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int:
        """Stop sending; how many were sent."""
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the sender did not stop within 10 s"
        assert self.error is None, f"the sender failed: {self.error!r}"
        return self.sent


@contextlib.contextmanager
def watchdog(action: Callable[[], object], after: float = WATCHDOG) -> Iterator[None]:
    """Run *action* after *after* seconds (to wake a stuck manager), unless done."""
    timer = threading.Timer(after, action)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture
def proxy(dsn: str) -> Iterator[TcpProxy]:
    with TcpProxy.for_dsn(dsn) as p:
        yield p


@pytest.fixture
def open_pubsub(dsn: str) -> Iterator[Callable[..., pgcast.PubSub]]:
    """``open_pubsub(channel, dsn=...)``: a listening PubSub with health checks
    every :data:`INTERVAL`, closed after the test."""
    opened: list[pgcast.PubSub] = []

    def open_(channel: str, dsn: str = dsn, **kwargs: Any) -> pgcast.PubSub:
        kwargs.setdefault("health_check_interval", INTERVAL)
        ps = pgcast.connect(dsn, **kwargs)
        opened.append(ps)
        ps.listen(channel)
        return ps

    yield open_
    for ps in opened:
        ps.close()


def until(nm: pgcast.NotificationManager, done: Callable[[list[Value]], bool],
          what: str) -> list[Value]:
    """Iterate *nm* until done(values so far); every value yielded."""
    got: list[Value] = []
    deadline = time.monotonic() + LIMIT
    while not done(got):
        got.append(next(nm))
        assert time.monotonic() < deadline, f"{what} within {LIMIT} s; got {got[-3:]}"
    return got


async def auntil(nm: pgcast.aio.NotificationManager, done: Callable[[list[Value]], bool],
                 what: str) -> list[Value]:
    """The asyncio twin of :func:`until`."""
    got: list[Value] = []
    deadline = time.monotonic() + LIMIT
    while not done(got):
        got.append(await anext(nm))
        assert time.monotonic() < deadline, f"{what} within {LIMIT} s; got {got[-3:]}"
    return got


def check_noticed(noticed: float) -> None:
    # Not before a probe could have been answered (a probe already on its
    # way when the blackhole began may expire a round trip short of that).
    assert INTERVAL - 0.05 <= noticed <= NOTICED_WITHIN, f"noticed after {noticed:.2f} s"


def check_other(before: list[Value], during: list[Value], after: list[Value],
                other: object, sent: int) -> None:
    """The other connection delivered before, during the outage and after,
    everything sent, once each, in order."""
    assert payloads(during, other), "the other connection delivered nothing meanwhile"
    assert payloads(before + during + after, other) == [str(i) for i in range(sent)]


# -- sync ------------------------------------------------------------------------------


def test_a_blackholed_managed_connection_goes_to_garbage(
    dsn: str, proxy: TcpProxy, open_pubsub: Any
) -> None:
    ch_a, ch_b = channel(), channel()
    a = open_pubsub(ch_a, dsn=proxy.dsn(dsn))
    b = open_pubsub(ch_b)
    with pgcast.NotificationManager(a, b, timeout=0.1) as nm, Sender(dsn, ch_b) as sender:
        before = until(nm, lambda got: len(payloads(got, b)) >= 3, "b delivered")
        assert proxy.blackhole() == 1
        started = time.monotonic()
        during = until(nm, lambda _: a in nm.garbage, "the blackhole was not noticed")
        noticed = time.monotonic() - started
        assert nm.connections == {b}
        sent = sender.stop()
        after = until(nm, lambda got: str(sent - 1) in payloads(before + during + got, b),
                      "b's last notification")
    check_noticed(noticed)
    check_other(before, during, after, b, sent)
    assert not markers(during + after, a) and a.generation == 0  # not reconnected
    assert b.generation == 0 and b not in nm.garbage  # probed, answered, healthy


def test_a_blackholed_managed_connection_is_reconnected(
    dsn: str, conn: Conn, proxy: TcpProxy, open_pubsub: Any
) -> None:
    ch_a, ch_b = channel(), channel()
    a = open_pubsub(ch_a, dsn=proxy.dsn(dsn))
    b = open_pubsub(ch_b)
    with (
        pgcast.NotificationManager(a, b, timeout=0.1, reconnect=True) as nm,
        Sender(dsn, ch_b) as sender,
    ):
        before = until(nm, lambda got: len(payloads(got, b)) >= 3, "b delivered")
        proxy.blackhole()
        started = time.monotonic()
        during = until(nm, lambda got: bool(markers(got, a)), "no Reconnected marker for a")
        noticed = time.monotonic() - started
        marker = markers(during, a)[0]
        assert "health check" in marker.error
        assert nm.connections == {a, b} and not nm.garbage
        assert a.generation == 1 and proxy.accepted == 2  # back through the proxy
        # New events after the marker, on the new connection (and socket).
        notify(conn, ch_a, "after")
        after = until(nm, lambda got: "after" in payloads(got, a), "a's event after the marker")
        sent = sender.stop()
        after += until(nm, lambda got: str(sent - 1) in payloads(before + during + after + got, b),
                       "b's last notification")
    check_noticed(noticed)
    check_other(before, during, after, b, sent)
    assert payloads(during + after, a) == ["after"]
    assert b.generation == 0


def test_a_manager_without_timeout_wakes_itself_for_the_checks(
    dsn: str, proxy: TcpProxy, open_pubsub: Any
) -> None:
    ch_a, ch_b = channel(), channel()
    a = open_pubsub(ch_a, dsn=proxy.dsn(dsn))
    b = open_pubsub(ch_b)

    def wake() -> None:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
            notify(c, ch_b, "watchdog")

    with pgcast.NotificationManager(a, b, reconnect=True) as nm, watchdog(wake):
        proxy.blackhole()
        x = next(nm)  # nothing else to wake it: only the health check
    assert x is not None and x[0] is a, f"the manager was not woken by the check: {x}"
    assert [type(e) for e in x[1]] == [pgcast.Reconnected]


def test_the_last_connection_found_dead_ends_the_iteration(
    dsn: str, proxy: TcpProxy, open_pubsub: Any
) -> None:
    a = open_pubsub(channel(), dsn=proxy.dsn(dsn))
    with pgcast.NotificationManager(a) as nm:
        # The watchdog ends a stuck iteration, and then a is not in garbage.
        with watchdog(lambda: nm.connections.discard(a)):
            proxy.blackhole()
            assert list(nm) == []
        assert a in nm.garbage and not nm.connections


def test_healthy_managed_connections_are_probed_and_stay(
    dsn: str, conn: Conn, open_pubsub: Any
) -> None:
    interval = 0.2
    pubsubs = [open_pubsub(channel(), health_check_interval=interval) for _ in range(3)]
    # Another session listening to a private probe channel sees the probes.
    conn.execute(f'LISTEN "{probe_channel(pubsubs[0].backend_pid)}"')
    with pgcast.NotificationManager(*pubsubs, timeout=0.1) as nm:
        deadline = time.monotonic() + 8 * interval
        for x in nm:
            assert x is None, f"a probe reached the user: {x}"
            if time.monotonic() > deadline:
                break
        assert nm.connections == set(pubsubs) and not nm.garbage
    # Found dead after two unanswered intervals: so the answers were read.
    assert [ps.generation for ps in pubsubs] == [0, 0, 0]
    assert len(list(conn.notifies(timeout=1.0, stop_after=3))) >= 3


# -- asyncio ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def apubsubs() -> AsyncIterator[Callable[..., Awaitable[AsyncPubSub]]]:
    """``await open_(channel, dsn, ...)``: listening AsyncPubSubs with health
    checks every :data:`INTERVAL`, closed at the end."""
    opened: list[AsyncPubSub] = []

    async def open_(channel: str, dsn: str, **kwargs: Any) -> AsyncPubSub:
        kwargs.setdefault("health_check_interval", INTERVAL)
        aps = await pgcast.aio.connect(dsn, **kwargs)
        opened.append(aps)
        await aps.listen(channel)
        return aps

    try:
        yield open_
    finally:
        for aps in opened:
            await aps.close()


def test_asyncio_a_blackholed_managed_connection_goes_to_garbage(
    dsn: str, proxy: TcpProxy
) -> None:
    async def body() -> None:
        ch_a, ch_b = channel(), channel()
        async with apubsubs() as open_:
            a = await open_(ch_a, proxy.dsn(dsn))
            b = await open_(ch_b, dsn)
            async with pgcast.aio.NotificationManager(a, b, timeout=0.1) as nm:
                with Sender(dsn, ch_b) as sender:
                    before = await auntil(nm, lambda got: len(payloads(got, b)) >= 3, "b")
                    assert proxy.blackhole() == 1
                    started = time.monotonic()
                    during = await auntil(nm, lambda _: a in nm.garbage, "not noticed")
                    noticed = time.monotonic() - started
                    assert nm.connections == {b}
                    sent = sender.stop()
                    after = await auntil(
                        nm, lambda got: str(sent - 1) in payloads(before + during + got, b),
                        "b's last notification",
                    )
            check_noticed(noticed)
            check_other(before, during, after, b, sent)
            assert a.generation == 0 and b.generation == 0

    arun(body())


def test_asyncio_a_blackholed_managed_connection_is_reconnected(
    dsn: str, conn: Conn, proxy: TcpProxy
) -> None:
    async def body() -> None:
        ch_a, ch_b = channel(), channel()
        async with apubsubs() as open_:
            a = await open_(ch_a, proxy.dsn(dsn))
            b = await open_(ch_b, dsn)
            nm = pgcast.aio.NotificationManager(a, b, timeout=0.1, reconnect=True)
            async with nm:
                with Sender(dsn, ch_b) as sender:
                    before = await auntil(nm, lambda got: len(payloads(got, b)) >= 3, "b")
                    proxy.blackhole()
                    started = time.monotonic()
                    during = await auntil(nm, lambda got: bool(markers(got, a)), "no marker")
                    noticed = time.monotonic() - started
                    assert "health check" in markers(during, a)[0].error
                    assert nm.connections == {a, b} and not nm.garbage
                    assert a.generation == 1 and proxy.accepted == 2
                    notify(conn, ch_a, "after")
                    after = await auntil(nm, lambda got: "after" in payloads(got, a), "after")
                    sent = sender.stop()
                    after += await auntil(
                        nm,
                        lambda got: str(sent - 1) in payloads(before + during + after + got, b),
                        "b's last notification",
                    )
            check_noticed(noticed)
            check_other(before, during, after, b, sent)
            assert payloads(during + after, a) == ["after"]
            assert b.generation == 0

    arun(body())


def test_asyncio_a_manager_without_timeout_wakes_itself_for_the_checks(
    dsn: str, proxy: TcpProxy
) -> None:
    async def body() -> None:
        ch_a, ch_b = channel(), channel()

        def wake() -> None:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
                notify(c, ch_b, "watchdog")

        async with apubsubs() as open_:
            a = await open_(ch_a, proxy.dsn(dsn))
            b = await open_(ch_b, dsn)
            async with pgcast.aio.NotificationManager(a, b, reconnect=True) as nm:
                with watchdog(wake):
                    proxy.blackhole()
                    x = await anext(nm)
            assert x is not None and x[0] is a, f"not woken by the check: {x}"
            assert [type(e) for e in x[1]] == [pgcast.Reconnected]

    arun(body())


def test_asyncio_healthy_managed_connections_are_probed_and_stay(
    dsn: str, conn: Conn
) -> None:
    interval = 0.2

    async def body() -> list[AsyncPubSub]:
        async with apubsubs() as open_:
            pubsubs = [
                await open_(channel(), dsn, health_check_interval=interval) for _ in range(3)
            ]
            conn.execute(f'LISTEN "{probe_channel(pubsubs[0].backend_pid)}"')
            async with pgcast.aio.NotificationManager(*pubsubs, timeout=0.1) as nm:
                deadline = time.monotonic() + 8 * interval
                async for x in nm:
                    assert x is None, f"a probe reached the user: {x}"
                    if time.monotonic() > deadline:
                        break
                assert nm.connections == set(pubsubs) and not nm.garbage
            assert [aps.generation for aps in pubsubs] == [0, 0, 0]
            return pubsubs

    arun(body())
    assert len(list(conn.notifies(timeout=1.0, stop_after=3))) >= 3


# -- the policy, pure: what a wake-up costs -----------------------------------------------


class CountingHealth(HealthCheck):
    """A real probe schedule that counts how often its due time is asked."""

    asked = 0

    def due(self) -> float | None:
        CountingHealth.asked += 1
        return super().due()


class Stand:
    """A connection for the pure policy: a real Core on a fake clock, no socket."""

    def __init__(self, clock: Callable[[], float], interval: float, listening: bool) -> None:
        self._core = Core(interval, clock)
        self._core.health = CountingHealth(interval, clock())
        if listening:
            self._core.channels.add("c")

    @property
    def closed(self) -> bool:
        return False

    def fileno(self) -> int:
        return -1

    # The rest of the supervisor interface the policy uses.
    @property
    def health_check_interval(self) -> float:
        return self._core.health.interval

    def health_check_due(self) -> float | None:
        return self._core.health.due()

    def listening_channels(self) -> frozenset[str]:
        return frozenset(self._core.channels)

    def take_pending(self) -> list[object]:
        inbox = self._core.inbox
        return [inbox.popleft() for _ in range(len(inbox))]

    @property
    def wake_callback(self) -> None:
        return None

    def set_wake_callback(self, callback: object) -> None:
        pass


def drive(
    core: ManagerCore[Stand], now: list[float], until_t: float,
    on_wait: Callable[[float], None] = lambda t: None,
) -> tuple[list[float], list[int], list[tuple[float, Stand]]]:
    """Run *core*'s policy on the fake clock *now* until *until_t*, answering
    each probe at once. Returns the waits asked for, the due times asked per
    wake-up, and the (time, connection) of every health check run."""
    waits: list[float] = []
    asked: list[int] = []
    ticks: list[tuple[float, Stand]] = []
    steps = core.steps(lambda: now[0])
    for _ in range(100_000):
        step = next(steps)
        if isinstance(step, Register):
            core.registered(step.conn, 0)
        elif isinstance(step, Unregister):
            core.unregistered(step.conn)
        elif isinstance(step, HealthTick):
            health = step.conn._core.health
            if step.conn._core.channels:
                health.heard(now[0])  # the probe went out and was answered
            ticks.append((now[0], step.conn))
        elif isinstance(step, Wait):
            asked.append(CountingHealth.asked)
            CountingHealth.asked = 0
            assert step.timeout is not None
            waits.append(step.timeout)
            if now[0] >= until_t:
                return waits, asked[1:], ticks
            on_wait(step.timeout)
        else:
            assert isinstance(step, Read) or step is None, step
    pytest.fail("the policy did not wait within 100000 steps")


def test_a_wake_up_looks_at_the_top_of_the_heap_not_at_every_connection() -> None:
    now = [0.0]
    idle = [Stand(lambda: now[0], 30.0, True) for _ in range(499)]
    active = Stand(lambda: now[0], 30.0, True)
    core: ManagerCore[Stand] = ManagerCore([*idle, active], None)

    def on_wait(timeout: float) -> None:
        # The active connection has an event every 0.1 s; the others are idle.
        step = min(timeout, 0.1)
        now[0] += step
        if step == 0.1:
            active._core.health.heard(now[0])
            core.ready(active)

    waits, asked, ticks = drive(core, now, 95.0, on_wait)
    assert waits[0] == 30.0  # never waits past the first check due
    # Each idle connection checked once an interval, the active one never.
    assert len(ticks) == 3 * 499 and active not in {c for _, c in ticks}
    assert {round(t) for t, _ in ticks} == {30, 60, 90}
    # Of the 950 wake-ups, those before the top of the heap's time ask no
    # connection anything; the three that run checks ask about two due times
    # per check (take it, reschedule it), and the active connection's entry
    # is moved about once an interval.
    assert len(asked) > 900
    assert sum(1 for n in asked if n) <= 6
    assert sum(asked) <= 2 * len(ticks) + 20


def test_a_connection_that_listens_to_nothing_is_looked_at_once_an_interval() -> None:
    now = [0.0]
    quiet = Stand(lambda: now[0], 10.0, False)
    core: ManagerCore[Stand] = ManagerCore([quiet], None)

    def on_wait(timeout: float) -> None:
        now[0] += timeout

    waits, _, ticks = drive(core, now, 30.0, on_wait)
    assert [t for t, _ in ticks] == [10.0, 20.0, 30.0]
    assert waits == [10.0, 10.0, 10.0, 10.0]


def test_no_health_checks_no_heap() -> None:
    now = [0.0]
    off = [Stand(lambda: now[0], 0.0, True) for _ in range(3)]
    core: ManagerCore[Stand] = ManagerCore(off, 5.0)
    steps = core.steps(lambda: now[0])
    kinds = []
    for _ in range(10):
        step = next(steps)
        kinds.append(type(step))
        if isinstance(step, Register):
            core.registered(step.conn, 0)
        elif isinstance(step, Wait):
            assert step.timeout == 5.0  # the idle timeout only
            break
    assert HealthTick not in kinds and not core._heap
