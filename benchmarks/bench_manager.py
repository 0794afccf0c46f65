"""NotificationManager scaling: delivery latency with 1 and with 500 connections.

The claim of issue 3: a wake-up costs the same whatever the number of idle
connections, so a manager of 500 listening connections delivers a
notification on one of them with a p50 latency within 1.5x of a manager of
one connection.

For each driver (sync and asyncio) two managers run side by side in one
process: one watching a single listening connection, one watching 500 (each
LISTENing to a channel of its own; one of them is the *active* one). A
sender connection sends ``pg_notify`` on the active channel and the clock
stops when the manager yields the event: one sample is the notify's round
trip plus the delivery. The two managers are measured in alternation (one
sample of each per round), so drift in the machine's load hits both alike.
p50 and p99 are reported in microseconds, and the ratio of the p50s. The
single-connection manager is also measured alone, before the 500 exist.

The 499 idle listeners are connected to a second database. PostgreSQL (18
and earlier) signals every listening backend *of the notifying database* on
each NOTIFY, whatever its channels: with 499 idle listeners in the same
database, a 2-core machine spends about 15 ms per NOTIFY waking them (84 us
without), which no client can avoid and which buries the manager's own cost.
Listeners of other databases are not woken, so the comparison measures what
the issue asks about: the manager's cost of a wake-up.

500 listeners need more connections than the suite's server allows
(``max_connections=200``), so unless the given server has room for them
this module starts its own embedded server with ``max_connections=600``,
reached the same way (Unix socket or TCP) as the given DSN; the note says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from _common import Deadline, Row, percentile, row
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgcast
import pgcast.aio

BENCH = "manager"
MANY = 500
ROUNDS = 2000
SMOKE_ROUNDS = 100
WARMUP = 100
SMOKE_WARMUP = 10
SMOKE_MANY = 50  # --smoke: a quick check that it all works, not the claim
TIMEOUT = 10.0  # for any one delivery


@contextlib.contextmanager
def roomy_server(dsn: str, needed: int) -> Iterator[tuple[str, str]]:
    """*dsn* if its server takes *needed* more connections, else an embedded
    server with ``max_connections=600``; yields (dsn, note)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        )
        fetched = cur.fetchone()
        room = int(fetched[0]) if fetched else 0
    if room >= needed:
        yield dsn, "the run's server"
        return
    from pgcast.embedded import EmbeddedServer

    with EmbeddedServer(settings={"max_connections": 600}) as server:
        host = conninfo_to_dict(dsn).get("host") or ""
        unix = not host or str(host).startswith("/")
        own = server.socket_dsn if unix else server.dsn
        yield own, f"own embedded server, max_connections=600, {'Unix socket' if unix else 'TCP'}"


@contextlib.contextmanager
def second_database(dsn: str) -> Iterator[str]:
    """A database of its own for the idle listeners (dropped afterwards)."""
    name = f"pgcast_bench_idle_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(dsn, dbname=name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def channels(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"bench_nm_{tag}_{i}" for i in range(n)]


def _payload(x: Any) -> str:
    if x is None:
        raise TimeoutError(f"no delivery within {TIMEOUT} s")
    events = x[1]
    if len(events) != 1:
        raise AssertionError(f"expected one event, got {events!r}")
    return str(events[0].payload)


# -- sync ------------------------------------------------------------------------------

#: The keys of a measurement: the single-connection manager alone on the
#: server, then side by side with the big one.
ALONE = "alone"


def measure_sync(
    dsn: str, idle_dsn: str, many: int, rounds: int
) -> dict[object, list[float]]:
    """Latencies (seconds): the 1-connection manager alone, then it and the
    *many*-connection manager in alternation."""
    times: dict[object, list[float]] = {ALONE: [], 1: [], many: []}
    deadline = Deadline(900, "the sync manager benchmark")

    def sample(key: object, nm: pgcast.NotificationManager, active: str, i: int) -> None:
        start = time.perf_counter()
        sender.execute("SELECT pg_notify(%s, %s)", (active, str(i)))
        got = _payload(next(nm))
        times[key].append(time.perf_counter() - start)
        if got != str(i):
            raise AssertionError(f"expected payload {i}, got {got!r}")

    with contextlib.ExitStack() as stack:
        sender = stack.enter_context(psycopg.connect(dsn, autocommit=True))
        managers = {}
        for size in (1, many):
            names = channels(size)
            pubsubs = []
            for j, name in enumerate(names):
                # The active one (in the middle) in the sender's database.
                ps = stack.enter_context(pgcast.connect(dsn if j == size // 2 else idle_dsn))
                ps.listen(name)
                pubsubs.append(ps)
            nm = stack.enter_context(pgcast.NotificationManager(*pubsubs, timeout=TIMEOUT))
            managers[size] = (nm, names[size // 2])
            if size == 1:
                for i in range(rounds):
                    sample(ALONE, nm, names[0], i)
                    deadline.check()
        for i in range(rounds):
            for size, (nm, active) in managers.items():
                sample(size, nm, active, i)
            deadline.check()
    return times


# -- asyncio ---------------------------------------------------------------------------


def measure_async(
    dsn: str, idle_dsn: str, many: int, rounds: int
) -> dict[object, list[float]]:
    """The asyncio twin of :func:`measure_sync`."""
    times: dict[object, list[float]] = {ALONE: [], 1: [], many: []}
    deadline = Deadline(900, "the asyncio manager benchmark")

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            sender = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            stack.push_async_callback(sender.close)

            async def sample(
                key: object, nm: pgcast.aio.NotificationManager, active: str, i: int
            ) -> None:
                start = time.perf_counter()
                await sender.execute("SELECT pg_notify(%s, %s)", (active, str(i)))
                got = _payload(await anext(nm))
                times[key].append(time.perf_counter() - start)
                if got != str(i):
                    raise AssertionError(f"expected payload {i}, got {got!r}")

            managers = {}
            for size in (1, many):
                names = channels(size)
                pubsubs = []
                for j, name in enumerate(names):
                    aps = await pgcast.aio.connect(dsn if j == size // 2 else idle_dsn)
                    stack.push_async_callback(aps.close)
                    await aps.listen(name)
                    pubsubs.append(aps)
                nm = pgcast.aio.NotificationManager(*pubsubs, timeout=TIMEOUT)
                stack.push_async_callback(nm.close)
                managers[size] = (nm, names[size // 2])
                if size == 1:
                    for i in range(rounds):
                        await sample(ALONE, nm, names[0], i)
                        deadline.check()
            for i in range(rounds):
                for size, (nm, active) in managers.items():
                    await sample(size, nm, active, i)
                deadline.check()

    asyncio.run(main())
    return times


# -- the rows ----------------------------------------------------------------------------


def subject(driver: str, key: object, many: int) -> str:
    if key == ALONE:
        return f"pgcast NotificationManager {driver}, 1 connection, no other listener"
    if key == 1:
        return f"pgcast NotificationManager {driver}, 1 connection"
    return f"pgcast NotificationManager {driver}, {many} connections"


def run(dsn: str, smoke: bool) -> list[Row]:
    """p50/p99 delivery latency for 1 and MANY connections, sync and asyncio."""
    rounds = SMOKE_ROUNDS if smoke else ROUNDS
    warmup = SMOKE_WARMUP if smoke else WARMUP
    many = SMOKE_MANY if smoke else MANY
    rows: list[Row] = []
    with roomy_server(dsn, many + 10) as (bench_dsn, where), second_database(bench_dsn) as idle:
        for driver, measure in (("sync", measure_sync), ("asyncio", measure_async)):
            times = measure(bench_dsn, idle, many, rounds + warmup)
            p50 = {}
            for key in (ALONE, 1, many):
                how = (
                    f"measured before the {many} were opened"
                    if key == ALONE
                    else "alternating with the other manager"
                )
                note = (
                    f"{rounds:,} deliveries after {warmup} warm-up, {how}; "
                    f"notify round trip + delivery; idle listeners in a second database; {where}"
                )
                samples = times[key][warmup:]
                p50[key] = percentile(samples, 50) * 1e6
                rows.append(row(BENCH, subject(driver, key, many), "p50", p50[key], "us", note))
                rows.append(
                    row(BENCH, subject(driver, key, many), "p99",
                        percentile(samples, 99) * 1e6, "us", note)
                )
            ratio = p50[many] / p50[1]
            verdict = "met" if ratio <= 1.5 else "MISSED"
            rows.append(
                row(BENCH, f"pgcast NotificationManager {driver}, {many} vs 1 connections",
                    "p50 ratio", ratio, "x",
                    f"target <= 1.5x: {verdict}; both managers on the same server at once")
            )
            rows.append(
                row(BENCH,
                    f"pgcast NotificationManager {driver}, {many} vs 1 connection alone",
                    "p50 ratio", p50[many] / p50[ALONE], "x",
                    "the single manager measured before the others were opened")
            )
    return rows


if __name__ == "__main__":
    from _common import main

    main(run)
