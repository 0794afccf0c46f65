"""Surviving failures: how fast a listener is back, and what the checks cost.

- *reconnect after pg_terminate_backend*: from the terminate call to the
  :class:`pgcast.Reconnected` marker in the listener's event stream (every
  channel LISTENed again and confirmed), sync and asyncio; p50 and p99, ms.
- *blackhole detection*: a loopback TCP proxy stops forwarding without
  closing; from then to the marker, with ``health_check_interval=0.5`` (the
  design says about two intervals, 1.0 s). Over TCP only: when the DSN is a
  Unix socket, a server of its own is started for this part.
- *notify rate, health check on/off*: a notify first reads what is pending
  (to notice a connection the server closed, so the notify can wait for the
  reconnect instead of failing); this shows that cost next to the plain rate.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from _common import Deadline, Row, percentile, row

import pgcast
import pgcast.aio

# The loopback proxy lives with the tests that use it most.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tcp_proxy import TcpProxy

BENCH = "reconnect"
TIMEOUT = 30.0


def _sync_reconnects(dsn: str, rounds: int) -> list[float]:
    channel = f"bench_rc_{uuid.uuid4().hex[:8]}"
    times: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as admin, pgcast.connect(
        dsn, health_check_interval=0
    ) as ps:
        ps.listen(channel)
        for _ in range(rounds):
            started = time.perf_counter()
            admin.execute("SELECT pg_terminate_backend(%s)", (ps.backend_pid,))
            deadline = Deadline(TIMEOUT, "a reconnect")
            for item in ps.events(select_timeout=0.5, yield_timeouts=True):
                if isinstance(item, pgcast.Reconnected):
                    times.append((time.perf_counter() - started) * 1000)
                    break
                deadline.check()
    return times


def _async_reconnects(dsn: str, rounds: int) -> list[float]:
    async def body() -> list[float]:
        channel = f"bench_rc_{uuid.uuid4().hex[:8]}"
        times: list[float] = []
        with psycopg.connect(dsn, autocommit=True) as admin:
            async with await pgcast.aio.connect(dsn, health_check_interval=0) as aps:
                await aps.listen(channel)
                for _ in range(rounds):
                    started = time.perf_counter()
                    admin.execute("SELECT pg_terminate_backend(%s)", (aps.backend_pid,))
                    deadline = Deadline(TIMEOUT, "a reconnect")
                    async for item in aps.events(select_timeout=0.5, yield_timeouts=True):
                        if isinstance(item, pgcast.Reconnected):
                            times.append((time.perf_counter() - started) * 1000)
                            break
                        deadline.check()
        return times

    return asyncio.run(body())


def _blackhole_detections(tcp_dsn: str, rounds: int, interval: float) -> list[float]:
    channel = f"bench_bh_{uuid.uuid4().hex[:8]}"
    times: list[float] = []
    with TcpProxy.for_dsn(tcp_dsn) as proxy, pgcast.connect(
        proxy.dsn(tcp_dsn), health_check_interval=interval
    ) as ps:
        ps.listen(channel)
        for _ in range(rounds):
            started = time.perf_counter()
            proxy.blackhole()
            deadline = Deadline(TIMEOUT, "a blackhole detection")
            for item in ps.events(select_timeout=0.05, yield_timeouts=True):
                if isinstance(item, pgcast.Reconnected):
                    times.append(time.perf_counter() - started)
                    break
                deadline.check()
    return times


def _notify_rate(dsn: str, n: int, interval: float) -> float:
    channel = f"bench_nr_{uuid.uuid4().hex[:8]}"
    with pgcast.connect(dsn, health_check_interval=interval) as ps:
        for i in range(min(200, n)):  # warm-up
            ps.notify(channel, str(i))
        started = time.perf_counter()
        for i in range(n):
            ps.notify(channel, str(i))
        return n / (time.perf_counter() - started)


def _is_tcp(dsn: str) -> bool:
    host = urlsplit(dsn).hostname or ""
    return dsn.startswith("postgres") and host in ("127.0.0.1", "localhost", "::1")


def run(dsn: str, smoke: bool) -> list[Row]:
    """The rows of this benchmark (see the module docstring)."""
    rounds = 5 if smoke else 40
    rows: list[Row] = []
    # Every reconnect is logged as a warning; here they are the point.
    logging.getLogger("pgcast").setLevel(logging.ERROR)
    for subject, measure in (("pgcast sync", _sync_reconnects),
                             ("pgcast asyncio", _async_reconnects)):
        times = measure(dsn, rounds)
        note = f"{rounds} terminations"
        rows.append(row(BENCH, subject, "reconnect after terminate p50",
                        statistics.median(times), "ms", note))
        rows.append(row(BENCH, subject, "reconnect after terminate p99",
                        percentile(times, 99), "ms", note))

    interval = 0.5
    bh_rounds = 2 if smoke else 5
    if _is_tcp(dsn):
        detections = _blackhole_detections(dsn, bh_rounds, interval)
    else:
        from pgcast.embedded import EmbeddedServer

        with EmbeddedServer() as server:
            detections = _blackhole_detections(server.dsn, bh_rounds, interval)
    rows.append(row(BENCH, "pgcast sync", "blackhole detected and replaced",
                    statistics.median(detections), "s",
                    f"health_check_interval={interval} s, {bh_rounds} runs, "
                    f"max {max(detections):.2f} s"))

    n = 1000 if smoke else 20_000
    for label, value in (("on (30 s)", 30.0), ("off", 0.0)):
        rates = [_notify_rate(dsn, n, value) for _ in range(1 if smoke else 3)]
        rows.append(row(BENCH, f"pgcast sync, health check {label}", "notify rate",
                        statistics.median(rates), "msg/s",
                        "runs: " + ", ".join(f"{r:,.0f}" for r in rates)))
    return rows


if __name__ == "__main__":
    from _common import main

    main(run)
