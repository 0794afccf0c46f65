"""Helpers shared by the benchmark modules: rows, statistics, peers, sending.

Every ``bench_<name>.py`` module exposes ``run(dsn, smoke) -> list[dict]``;
each row has the keys ``benchmark``, ``subject``, ``metric``, ``value``,
``unit`` and optionally ``note``. :func:`row` builds one. :func:`main` is the
standalone entry point each module calls under ``if __name__ == "__main__"``:
with no ``--dsn`` it starts an embedded PostgreSQL for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg

Row = dict[str, Any]

#: Redis on loopback, the peer the issue names; skipped with a note when absent.
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379


def row(  # noqa: PLR0917 - the six fields of a row, in their order
    benchmark: str, subject: str, metric: str, value: float, unit: str, note: str = ""
) -> Row:
    """One result row in the shape benchmarks/run.py collects."""
    out: Row = {
        "benchmark": benchmark,
        "subject": subject,
        "metric": metric,
        "value": value,
        "unit": unit,
    }
    if note:
        out["note"] = note
    return out


def median(values: Sequence[float]) -> float:
    """The median (the statistic every rate is reported with)."""
    return statistics.median(values)


def percentile(values: Sequence[float], p: float) -> float:
    """The *p*-th percentile (nearest rank) of *values*."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def spread(values: Sequence[float]) -> str:
    """A note listing every run, so the noise is visible next to the median."""
    return "runs: " + ", ".join(f"{v:,.0f}" for v in values)


def prefill(dsn: str, channel: str, n: int, batch: int = 10_000) -> None:
    """Send *n* small notifications (payloads ``'0'``..``str(n-1)``) in
    transactions of *batch*, from a connection of its own."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, n, batch):
            conn.execute(
                "SELECT count(pg_notify(%s, g::text)) FROM generate_series(%s::int, %s::int) g",
                (channel, start, min(n, start + batch) - 1),
            )


# The listeners' receive loops: a PubSub's ``events(select_timeout=1.0,
# yield_timeouts=True)`` counted until *n* events came (*on_count*, if given,
# sees each count) or, at an idle tick, *timeout* seconds passed. The loop is
# the timed part of bench_receive, so it is written out in both helpers (one
# sync, one async, line for line the same) rather than calling a shared
# per-event function: that call would be measured as the library's cost.


def count_events(
    events: Iterable[object | None],
    n: int,
    timeout: float,
    on_count: Callable[[int], object] | None = None,
) -> int:
    """Count a sync PubSub's events up to *n* (see above); how many came."""
    count = 0
    deadline = time.monotonic() + timeout
    for event in events:
        if event is None:
            if time.monotonic() > deadline:
                break
        else:
            count += 1
            if on_count is not None:
                on_count(count)
            if count == n:
                break
    return count


async def acount_events(
    events: AsyncIterable[object | None],
    n: int,
    timeout: float,
    on_count: Callable[[int], object] | None = None,
) -> int:
    """:func:`count_events` for an AsyncPubSub's events."""
    count = 0
    deadline = time.monotonic() + timeout
    async for event in events:
        if event is None:
            if time.monotonic() > deadline:
                break
        else:
            count += 1
            if on_count is not None:
                on_count(count)
            if count == n:
                break
    return count


def listen_raw(dsn: str, channel: str) -> psycopg.Connection[Any]:
    """A plain psycopg autocommit connection LISTENing on *channel*."""
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(f'LISTEN "{channel}"')
    return conn


#: A publishing thread of :func:`threaded_rate`: ``worker(k, ready, stop)``
#: prepares (connects, warms up), calls ``ready()``, sends until ``stop`` is
#: set and returns how many notifications it sent.
Worker = Callable[[int, Callable[[], None], threading.Event], int]


def threaded_rate(count: int, seconds: float, worker: Worker) -> float:
    """Run *count* workers, released together once all are ready, for
    *seconds*; notifications per second over the time until all finished."""
    stop = threading.Event()
    barrier = threading.Barrier(count + 1)
    totals: list[int] = []
    lock = threading.Lock()

    def ready() -> None:
        barrier.wait(30)

    def work(k: int) -> None:
        sent = worker(k, ready, stop)
        with lock:
            totals.append(sent)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    barrier.wait(30)
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - start
    if len(totals) != count:
        raise RuntimeError("a publishing thread failed")
    return sum(totals) / elapsed


def redis_client() -> Any | None:
    """A redis-py client for the loopback Redis, or None if none answers."""
    try:
        import redis
    except ImportError:
        return None
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        return None
    return client


def redis_parser() -> str:
    """Which RESP parser redis-py uses here (hiredis is much faster)."""
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return "redis-py's pure-Python parser (hiredis not installed)"
    return "hiredis parser"


class Deadline:
    """A bounded wait: ``check()`` raises TimeoutError once *seconds* passed."""

    def __init__(self, seconds: float, what: str) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError(f"{self.what} did not finish within {self.seconds} s")


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    """*dsn* itself, or an embedded server's Unix-socket DSN for the block."""
    if dsn:
        yield dsn
        return
    from pgcast.embedded import EmbeddedServer

    with EmbeddedServer(settings=SERVER_SETTINGS) as server:
        yield server.socket_dsn


#: Settings of the embedded server a benchmark run starts: room for the
#: writers and the pgbench clients, and defaults otherwise (fsync on).
SERVER_SETTINGS: dict[str, str | int | bool] = {"max_connections": 200}


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table of *rows*."""
    lines = [
        "| benchmark | subject | metric | value | unit | note |",
        "|---|---|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['subject']} | {r['metric']} | {fmt(r['value'])} "
            f"| {r['unit']} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def fmt(value: float) -> str:
    """Thousands separators for big numbers, two decimals for small ones."""
    if math.isnan(value):  # not measured
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def main(run: Callable[[str, bool], list[Row]], argv: Sequence[str] | None = None) -> None:
    """The standalone entry point of a benchmark module."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    parser.add_argument("--dsn", help="an existing server (default: start an embedded one)")
    args = parser.parse_args(argv)
    with database(args.dsn) as dsn:
        rows = run(dsn, args.smoke)
    print(format_table(rows))
