"""A worker module for ``pgcast worker _queue_worker_app:worker`` in the tests.

Configured by environment variables: the queue name, a log file where each
batch writes ``start <ids>`` then ``done <ids>``, how long a batch takes, and
the batch size. Not a test module (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import pgcast
from pgcast.queue import Job, Queue

QUEUE = Queue(os.environ["PGCAST_TEST_QUEUE"])
LOG = pathlib.Path(os.environ["PGCAST_TEST_LOG"])
SLOW = float(os.environ.get("PGCAST_TEST_SLOW", "2"))
BATCH = int(os.environ.get("PGCAST_TEST_BATCH", "10"))

worker = pgcast.Worker()


def _log(word: str, ids: list[int]) -> None:
    with LOG.open("a") as f:
        f.write(f"{word} {json.dumps(ids)}\n")


@worker.on_queue(QUEUE, batch_size=BATCH)
def handle(jobs: list[Job]) -> None:
    ids = [job.id for job in jobs]
    _log("start", ids)
    time.sleep(SLOW)
    _log("done", ids)
