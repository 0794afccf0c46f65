"""Durable channels and large payloads, next to plain NOTIFY.

Publish rates (nobody listening; fixed time per subject, median of repeats):

* plain ``notify()`` and durable ``notify(durable=True)``, one message per
  transaction: the price of the log insert and the per-channel advisory lock;
* plain and durable ``notify_many()``, 100 per call (one transaction);
* durable ``notify()`` from 4 threads on one channel (they take turns on the
  channel's lock) and on 4 channels (they do not);
* a 16 kB payload (too large for NOTIFY, so through the log).

Receive rates (the messages are committed first, then the listener's loop is
timed until user code counted all of them, as in ``bench_receive.py``):

* plain notifications; durable ones received live (the payload rides inline
  in the notification); durable ones *replayed* from the log by
  ``listen(durable=True, since=...)`` (timed from the listen); and 16 kB
  payloads, which each cost the receiver a query.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import psycopg
from _common import Row, count_events, median, prefill, row, spread, threaded_rate

import pgcast
from pgcast.durable import install_schema

BENCH = "durable"
SECONDS = 2.0
SMOKE_SECONDS = 0.3
REPEATS = 3
SMOKE_REPEATS = 1
PER_CALL = 100
THREADS = 4
N = 100_000
SMOKE_N = 2_000
LARGE = 16 * 1024
LARGE_N = 5_000
SMOKE_LARGE_N = 100
DRAIN_TIMEOUT = 300.0


def _channel() -> str:
    return f"bench_durable_{uuid.uuid4().hex[:8]}"


# -- publishing --------------------------------------------------------------------


def _timed(dsn: str, threads: int, seconds: float,
           send: Callable[[pgcast.PubSub, int, int], int]) -> float:
    """Messages per second of *threads* senders, each with its own PubSub;
    ``send(ps, thread_index, i)`` sends and returns how many it sent."""

    def worker(k: int, ready: Callable[[], None], stop: threading.Event) -> int:
        with pgcast.connect(dsn) as ps:
            send(ps, k, -1)  # warm up: the schema check, prepared statements
            ready()
            sent = i = 0
            while not stop.is_set():
                sent += send(ps, k, i)
                i += 1
        return sent

    return threaded_rate(threads, seconds, worker)


def _publish_subjects(channel: str) -> dict[str, tuple[int, Callable[..., int]]]:
    big = "x" * LARGE

    def plain(ps: pgcast.PubSub, k: int, i: int) -> int:
        ps.notify(channel, str(i))
        return 1

    def durable(ps: pgcast.PubSub, k: int, i: int) -> int:
        ps.notify(channel, str(i), durable=True)
        return 1

    def own_channel(ps: pgcast.PubSub, k: int, i: int) -> int:
        ps.notify(f"{channel}_{k}", str(i), durable=True)
        return 1

    def plain_many(ps: pgcast.PubSub, k: int, i: int) -> int:
        ps.notify_many([(channel, f"{i}.{j}") for j in range(PER_CALL)])
        return PER_CALL

    def durable_many(ps: pgcast.PubSub, k: int, i: int) -> int:
        ps.notify_many([(channel, f"{i}.{j}") for j in range(PER_CALL)], durable=True)
        return PER_CALL

    def large(ps: pgcast.PubSub, k: int, i: int) -> int:
        ps.notify(channel, big)
        return 1

    return {
        "plain notify()": (1, plain),
        "durable notify()": (1, durable),
        "plain notify_many() x100": (1, plain_many),
        "durable notify_many() x100": (1, durable_many),
        f"durable notify(), {THREADS} threads, one channel": (THREADS, durable),
        f"durable notify(), {THREADS} threads, own channels": (THREADS, own_channel),
        "16 kB payload via the log": (1, large),
    }


# -- receiving ----------------------------------------------------------------------


def _drain(ps: pgcast.PubSub, n: int) -> int:
    return count_events(ps.events(select_timeout=1.0, yield_timeouts=True), n, DRAIN_TIMEOUT)


def _fill_durable(dsn: str, channel: str, n: int, payload: str | None = None) -> int:
    """Commit *n* durable messages in batches; return the id before them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row_ = conn.execute("SELECT coalesce(max(id), 0) FROM pgcast.log").fetchone()
        before = int(row_[0]) if row_ else 0
        batch = 10_000 if payload is None else 500
        for start in range(0, n, batch):
            size = min(n, start + batch) - start
            conn.execute(
                "SELECT pgcast.notify_many(array_fill(%s::text, ARRAY[%s]), "
                "coalesce(%s, g.p), true) FROM (SELECT array_agg(x::text) AS p "
                "FROM generate_series(%s::int, %s::int) x) g",
                (channel, size, None if payload is None else [payload] * size,
                 start, start + size - 1),
            )
    return before


def _receive(dsn: str, kind: str, n: int) -> float:
    """Messages per second reaching user code; raises if any is missing."""
    channel = _channel()
    with pgcast.connect(dsn) as ps:
        if kind == "plain":
            ps.listen(channel)
            prefill(dsn, channel, n)
            started = time.perf_counter()
        elif kind == "live":
            ps.listen(channel, durable=True)
            _fill_durable(dsn, channel, n)
            started = time.perf_counter()
        elif kind == "replay":
            since = _fill_durable(dsn, channel, n)
            started = time.perf_counter()
            ps.listen(channel, durable=True, since=since)
        else:  # large
            ps.listen(channel)
            _fill_durable(dsn, channel, n, "y" * LARGE)
            started = time.perf_counter()
        got = _drain(ps, n)
        elapsed = time.perf_counter() - started
    if got != n:
        raise RuntimeError(f"{kind}: received {got} of {n}")
    return n / elapsed


def run(dsn: str, smoke: bool) -> list[Row]:
    """Measure every subject; one row per subject (median rate)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_schema(conn)
    seconds = SMOKE_SECONDS if smoke else SECONDS
    repeats = SMOKE_REPEATS if smoke else REPEATS
    rows: list[Row] = []
    subjects = _publish_subjects(_channel())
    publish: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(repeats):
        for name, (threads, send) in subjects.items():
            publish[name].append(_timed(dsn, threads, seconds, send))
    for name, rates in publish.items():
        rows.append(row(BENCH, f"publish: {name}", "rate", median(rates), "msg/s",
                        f"{seconds:g} s each, median of {repeats}; {spread(rates)}"))
    n = SMOKE_N if smoke else N
    large_n = SMOKE_LARGE_N if smoke else LARGE_N
    kinds = {
        "plain NOTIFY": ("plain", n),
        "durable, live": ("live", n),
        "durable, replayed from the log": ("replay", n),
        "16 kB payloads, fetched": ("large", large_n),
    }
    receive: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(repeats):
        for name, (kind, count) in kinds.items():
            receive[name].append(_receive(dsn, kind, count))
    for name, rates in receive.items():
        count = kinds[name][1]
        rows.append(row(BENCH, f"receive: {name}", "rate", median(rates), "msg/s",
                        f"{count:,} msgs, median of {repeats}; {spread(rates)}"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM pgcast.log WHERE channel LIKE 'bench\\_durable\\_%'")
    return rows


if __name__ == "__main__":
    from _common import main

    main(run)
