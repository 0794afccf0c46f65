"""Table change feeds and queue workers: what a feed costs the writer, what a worker drains.

* **feed cost**: one ``UPDATE`` of every row of a table (100,000 rows; 10,000
  with ``--smoke``) with no trigger, with a row-level feed, with a statement-
  level feed at its default limit (one truncated notification) and with room
  for every key; reported as the statement's duration and the notifications
  it sent (counted by a listener). This is the price of ``per="row"`` and the
  reason for ``per="statement"`` on bulk writes.
* **queue drain**: jobs queued beforehand (20,000; 2,000 with ``--smoke``),
  drained by one and by two :class:`pgcast.Worker` s with a no-op handler in
  batches of 100: jobs per second, claim + delete included.
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
from _common import Row, median, row, spread

import pgcast
from pgcast.queue import Job, Queue

BENCH = "tables"
REPEATS = 3
SMOKE_REPEATS = 1
SENTINEL = "--end--"


def _count_until_sentinel(ps: pgcast.PubSub, timeout: float = 120.0) -> int:
    n = 0
    deadline = time.monotonic() + timeout
    for event in ps.events(select_timeout=0.5, yield_timeouts=True):
        if isinstance(event, pgcast.Event):
            if event.payload == SENTINEL:
                return n
            n += 1
        if time.monotonic() > deadline:
            raise TimeoutError("the sentinel notification did not arrive")
    raise RuntimeError("the listener closed")


def _feed_cost(dsn: str, rows: int, repeats: int) -> list[Row]:
    out: list[Row] = []
    table = f"bench_{uuid.uuid4().hex[:8]}"
    subjects = [
        ("no trigger", None),
        ("per='row'", {"per": "row"}),
        ("per='statement' (default max_parts)", {"per": "statement"}),
        ("per='statement', max_parts=1000", {"per": "statement", "max_parts": 1000}),
    ]
    with psycopg.connect(dsn, autocommit=True) as conn, pgcast.connect(dsn) as ps:
        conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, v int)')
        conn.execute(f'INSERT INTO "{table}" SELECT g, 0 FROM generate_series(1, %s) g',
                     (rows,))
        try:
            for subject, options in subjects:
                pgcast.unwatch_table(conn, table)
                channel = f"{table}_changed"
                if options is not None:
                    channel = pgcast.watch_table(conn, table, **options).channel  # type: ignore[arg-type]
                ps.listen(channel)
                times, counts = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    conn.execute(f'UPDATE "{table}" SET v = v + 1')
                    times.append((time.perf_counter() - t0) * 1000)
                    conn.execute("SELECT pg_notify(%s, %s)", (channel, SENTINEL))
                    counts.append(_count_until_sentinel(ps))
                out.append(row(BENCH, subject, f"UPDATE of {rows:,} rows", median(times), "ms",
                               spread(times)))
                out.append(row(BENCH, subject, "notifications per UPDATE", median(counts),
                               "notifications"))
        finally:
            conn.execute(f'DROP TABLE "{table}"')
    return out


def _drain_rate(dsn: str, jobs: int, workers: int) -> float:
    queue = Queue(f"bench_{uuid.uuid4().hex[:8]}")
    done = 0
    lock = threading.Lock()
    with psycopg.connect(dsn, autocommit=True) as conn:
        queue.install(conn)
        try:
            for start in range(0, jobs, 10_000):
                queue.enqueue_many(conn, range(start, min(jobs, start + 10_000)))
            pool = []
            for _ in range(workers):
                w = pgcast.Worker(dsn)

                @w.on_queue(queue, batch_size=100)
                def handle(batch: list[Job]) -> None:
                    nonlocal done
                    with lock:
                        done += len(batch)

                pool.append(w)
            t0 = time.perf_counter()
            threads = [w.run_in_thread() for w in pool]
            try:
                deadline = time.monotonic() + 300
                while done < jobs and time.monotonic() < deadline:
                    time.sleep(0.01)
                elapsed = time.perf_counter() - t0
            finally:
                for t in threads:
                    t.stop()
            if done < jobs:
                raise TimeoutError(f"drained {done} of {jobs} jobs in 300 s")
        finally:
            queue.uninstall(conn)
    return jobs / elapsed


def run(dsn: str, smoke: bool) -> list[Row]:
    """The feed-cost and queue-drain rows."""
    repeats = SMOKE_REPEATS if smoke else REPEATS
    rows = _feed_cost(dsn, 10_000 if smoke else 100_000, repeats)
    jobs = 2_000 if smoke else 20_000
    for workers in (1, 2):
        rates = [_drain_rate(dsn, jobs, workers) for _ in range(repeats)]
        rows.append(row(BENCH, f"{workers} worker{'s' if workers > 1 else ''}, batches of 100",
                        f"queue drain ({jobs:,} jobs)", median(rates), "jobs/s", spread(rates)))
    return rows


if __name__ == "__main__":
    from _common import main

    main(run)
