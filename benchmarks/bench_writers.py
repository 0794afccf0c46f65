"""Many writers: commits per second of 32 concurrent writers.

Each writer is a thread with its own psycopg connection; each transaction
updates the writer's own row of a small table (no row-lock contention
between writers), and:

* ``NOTIFY in each writer's transaction``: ``pg_notify`` inside the
  transaction, the atomic way (:func:`pgcast.notify`);
* ``commit, then pgcast.Publisher``: the transaction commits without NOTIFY
  and the writer hands the notification to one shared :class:`pgcast.Publisher`,
  which sends what gathered in one transaction every few milliseconds;
* ``no NOTIFY at all``: the ceiling.

Two forms of the transaction: ``BEGIN; UPDATE; NOTIFY; COMMIT`` as an
application writes it (four round trips, so Python's time per transaction
weighs in), and one statement (``WITH u AS (UPDATE ... RETURNING id) SELECT
pg_notify(...) FROM u``; one round trip) where the server's commit path is
most of the cost.

PostgreSQL serialises the commits of notifying transactions on one global
lock held across the commit's WAL flush, so the first variant loses group
commit. Every variant runs for a fixed time; the median of the repeats is
reported. With the Publisher, the run ends with a flush, and the number of
notifications that reached a listener is checked against the commits.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from _common import Row, median, row, spread

import pgcast

BENCH = "writers"
WRITERS = 32
SECONDS = 4.0
SMOKE_SECONDS = 0.5
REPEATS = 3
SMOKE_REPEATS = 1


def _setup(dsn: str) -> str:
    table = f"bench_writers_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v bigint NOT NULL)")
        conn.execute(
            f"INSERT INTO {table} SELECT g, 0 FROM generate_series(0, %s) g", (WRITERS - 1,)
        )
    return table


def _drop(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {table}")


def _writers(
    dsn: str, seconds: float, body: Callable[[psycopg.Connection[Any], int, int], None]
) -> int:
    """Run *WRITERS* threads calling ``body(conn, writer, i)`` for *seconds*;
    the total number of commits."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(WRITERS)]
    stop = threading.Event()
    counts = [0] * WRITERS
    errors: list[BaseException] = []
    barrier = threading.Barrier(WRITERS + 1)

    def work(w: int) -> None:
        conn = conns[w]
        barrier.wait(30)
        i = 0
        try:
            while not stop.is_set():
                body(conn, w, i)
                i += 1
        except BaseException as exc:
            errors.append(exc)
        counts[w] = i

    threads = [threading.Thread(target=work, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    barrier.wait(30)
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    for conn in conns:
        conn.close()
    if errors:
        raise RuntimeError(f"a writer failed: {errors[0]!r}") from errors[0]
    return sum(counts)


UPDATE = "UPDATE {table} SET v = v + 1 WHERE id = %s"
# The UPDATE and the NOTIFY as one statement: one round trip, one transaction.
UPDATE_NOTIFY = (
    "WITH u AS (UPDATE {table} SET v = v + 1 WHERE id = %s RETURNING id) "
    "SELECT pg_notify(%s, %s) FROM u"
)
Body = Callable[[psycopg.Connection[Any], int, int], None]


def notify_in_tx(table: str, channel: str, multi: bool) -> Body:
    """The writer's transaction notifies itself (atomic with the UPDATE)."""
    update = UPDATE.format(table=table)
    one = UPDATE_NOTIFY.format(table=table)

    def body(conn: psycopg.Connection[Any], w: int, i: int) -> None:
        if multi:
            with conn.transaction():
                conn.execute(update, (w,))
                pgcast.notify(conn, channel, f"{w}:{i}")
        else:
            conn.execute(one, (w, channel, f"{w}:{i}"))

    return body


def update_only(table: str, multi: bool) -> Body:
    """The writer's transaction alone; *after* runs once it committed."""
    update = UPDATE.format(table=table)

    def body(conn: psycopg.Connection[Any], w: int, i: int) -> None:
        if multi:
            with conn.transaction():
                conn.execute(update, (w,))
        else:
            conn.execute(update, (w,))

    return body


def with_publisher(dsn: str, table: str, multi: bool, seconds: float) -> tuple[float, str]:
    """Writers commit the UPDATE, then hand the notification to one Publisher;
    checks that a listener got every one."""
    channel = f"bench_w_{uuid.uuid4().hex[:8]}"
    commit = update_only(table, multi)
    with pgcast.connect(dsn) as listener:
        listener.listen(channel)
        transactions: set[object] = set()
        with pgcast.Publisher(dsn) as publisher:

            def body(conn: psycopg.Connection[Any], w: int, i: int) -> None:
                commit(conn, w, i)
                transactions.add(publisher.publish(channel, f"{w}:{i}"))

            commits = _writers(dsn, seconds, body)
            publisher.flush(timeout=60)
        received = 0
        for event in listener.wait(0.5):
            if event is None:
                break
            received += 1
    if received != commits:
        raise RuntimeError(f"the Publisher lost notifications: {received} of {commits}")
    note = f"{commits / max(1, len(transactions)):.0f} notifications per Publisher transaction"
    return commits / seconds, note


FORMS = {
    "1 statement": False,  # UPDATE (+ pg_notify) in one autocommit statement
    "BEGIN; UPDATE; NOTIFY; COMMIT": True,  # what an application's code does
}
NOTIFY_IN_TX = "NOTIFY in each writer's transaction"
PUBLISHER = "commit, then pgcast.Publisher"
NO_NOTIFY = "no NOTIFY at all (ceiling)"


def run(dsn: str, smoke: bool) -> list[Row]:
    """Writer commits/s for the three variants in both forms (median of repeats)."""
    seconds = SMOKE_SECONDS if smoke else SECONDS
    repeats = SMOKE_REPEATS if smoke else REPEATS
    table = _setup(dsn)
    rows = []
    try:
        for form, multi in FORMS.items():
            rates: dict[str, list[float]] = {NOTIFY_IN_TX: [], PUBLISHER: [], NO_NOTIFY: []}
            notes: list[str] = []
            channel = f"bench_w_{uuid.uuid4().hex[:8]}"
            for _ in range(repeats):
                body = notify_in_tx(table, channel, multi)
                rates[NOTIFY_IN_TX].append(_writers(dsn, seconds, body) / seconds)
                rate, note = with_publisher(dsn, table, multi, seconds)
                rates[PUBLISHER].append(rate)
                notes.append(note)
                rates[NO_NOTIFY].append(_writers(dsn, seconds, update_only(table, multi)) / seconds)
            for name, values in rates.items():
                note = f"{WRITERS} writers, median of {repeats}; {spread(values)}"
                if name == PUBLISHER:
                    note += f"; every notification received; {sorted(notes)[len(notes) // 2]}"
                rows.append(
                    row(BENCH, f"{name} [{form}]", "commits", median(values), "commits/s", note)
                )
    finally:
        _drop(dsn, table)
    return rows


if __name__ == "__main__":
    from _common import main

    main(run)
