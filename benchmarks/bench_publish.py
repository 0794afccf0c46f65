"""Publish rate: notifications sent per second, next to pgbench's ceiling.

Nobody listens while publishing is timed (the same for every subject), so
this is the cost of getting NOTIFYs committed. Payloads are distinct within a
transaction (PostgreSQL folds identical ones). Each subject runs for a fixed
time; the median of the repeats is reported.

* pgcast ``notify()``: one notification per transaction (autocommit).
* pgcast ``notify_many()``: 100 per call, one round trip and one transaction.
* the same with 4 threads, each with its own PubSub.
* raw psycopg 3 ``execute("SELECT pg_notify(...)")``: what pgcast adds to it.
* pgbench (the embedded server's own binary, ``-M prepared``): a custom
  script ``SELECT pg_notify('c', 'x')``, and a 100-per-transaction one
  ``SELECT pg_notify('c', g::text) FROM generate_series(1, 100) g``, with 1
  and 4 clients: the server's ceiling, with no Python in the way.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
from _common import Row, median, row, spread, threaded_rate

import pgcast

BENCH = "publish"
SECONDS = 3.0
SMOKE_SECONDS = 0.5
REPEATS = 3
SMOKE_REPEATS = 1
THREADS = 4
PER_CALL = 100


def _channel() -> str:
    return f"bench_pub_{uuid.uuid4().hex[:8]}"


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


def _on_each(conns: list[C], seconds: float, send: Callable[[C, threading.Event], int]) -> float:
    """``send(conn, stop)`` in a thread per connection, all released together,
    for *seconds* (:func:`threaded_rate`); the connections are closed after."""

    def worker(k: int, ready: Callable[[], None], stop: threading.Event) -> int:
        ready()
        return send(conns[k], stop)

    try:
        return threaded_rate(len(conns), seconds, worker)
    finally:
        for conn in conns:
            conn.close()


# Each subject's sending loop is its own, inline: it is what is timed.


def pgcast_notify(dsn: str, threads: int, seconds: float) -> float:
    channel = _channel()

    def send(ps: pgcast.PubSub, stop: threading.Event) -> int:
        sent = 0
        notify = ps.notify
        while not stop.is_set():
            notify(channel, str(sent))
            sent += 1
        return sent

    return _on_each([pgcast.connect(dsn) for _ in range(threads)], seconds, send)


def pgcast_notify_many(dsn: str, threads: int, seconds: float) -> float:
    channel = _channel()
    messages = [(channel, str(i)) for i in range(PER_CALL)]

    def send(ps: pgcast.PubSub, stop: threading.Event) -> int:
        sent = 0
        while not stop.is_set():
            ps.notify_many(messages)
            sent += PER_CALL
        return sent

    return _on_each([pgcast.connect(dsn) for _ in range(threads)], seconds, send)


def raw_psycopg3_notify(dsn: str, threads: int, seconds: float) -> float:
    channel = _channel()

    def send(conn: psycopg.Connection[Any], stop: threading.Event) -> int:
        sent = 0
        while not stop.is_set():
            conn.execute("SELECT pg_notify(%s, %s)", (channel, str(sent)))
            sent += 1
        return sent

    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(threads)]
    return _on_each(conns, seconds, send)


def pgbench(dsn: str, bin_dir: Path, per_tx: int, clients: int, seconds: float) -> float:
    """Notifications per second pgbench reaches with its custom script."""
    if per_tx == 1:
        script = "SELECT pg_notify('bench_pgbench', 'x');\n"
    else:
        script = (
            f"SELECT pg_notify('bench_pgbench', g::text) FROM generate_series(1, {per_tx}) g;\n"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        os.chmod(f.name, 0o644)  # the script is read by pgbench, as whoever runs it
        done = subprocess.run(
            [
                str(bin_dir / "pgbench"),
                "--no-vacuum",
                "--protocol=prepared",
                f"--client={clients}",
                f"--jobs={clients}",
                f"--time={max(1, round(seconds))}",
                f"--file={f.name}",
                dsn,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed: {done.stderr.strip()}")
    found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", done.stdout)
    if found is None:
        raise RuntimeError(f"no tps in pgbench's output: {done.stdout}")
    return float(found.group(1)) * per_tx


def _bin_dir() -> Path | None:
    from pgcast.embedded import BIN_DIR

    return BIN_DIR if (BIN_DIR / "pgbench").exists() else None


def run(dsn: str, smoke: bool) -> list[Row]:
    """Measure every publishing subject; one row each (median rate)."""
    seconds = SMOKE_SECONDS if smoke else SECONDS
    repeats = SMOKE_REPEATS if smoke else REPEATS
    bin_dir = _bin_dir()
    subjects: dict[str, Callable[[], float]] = {
        "pgcast notify() 1/tx": lambda: pgcast_notify(dsn, 1, seconds),
        f"pgcast notify_many() {PER_CALL}/tx": lambda: pgcast_notify_many(dsn, 1, seconds),
        f"pgcast notify() 1/tx, {THREADS} threads": lambda: pgcast_notify(dsn, THREADS, seconds),
        f"pgcast notify_many() {PER_CALL}/tx, {THREADS} threads": lambda: pgcast_notify_many(
            dsn, THREADS, seconds
        ),
        "raw psycopg 3 pg_notify 1/tx": lambda: raw_psycopg3_notify(dsn, 1, seconds),
    }
    if bin_dir is not None:
        for per_tx in (1, PER_CALL):
            for clients in (1, THREADS):
                subjects[f"pgbench {per_tx}/tx, {clients} client{'s' * (clients > 1)}"] = (
                    lambda p=per_tx, c=clients: pgbench(dsn, bin_dir, p, c, seconds)
                )
    rates: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(repeats):
        for name, measure in subjects.items():
            rates[name].append(measure())
    rows = [
        row(BENCH, name, "rate", median(values), "notify/s", f"median of {repeats}; {spread(values)}")  # noqa: E501
        for name, values in rates.items()
    ]
    if bin_dir is None:
        rows.append(row(BENCH, "pgbench", "rate", float("nan"), "notify/s", "pgbench not found"))
    return rows


if __name__ == "__main__":
    from _common import main

    main(run)
