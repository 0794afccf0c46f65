"""The FreshPorts cache workers: delete a port's cached page when the port changes.

Two workers, for the two ways of doing it (``run.py`` sets both up):

``worker``: a change feed. ``pgcast.watch_table(conn, "ports")`` makes the
database announce every committed change of the ``ports`` table on
``ports_changed``; the handler deletes the cache files of the changed keys. A
statement that changed too many rows to list names none, and the handler
clears the whole cache. Changes made while this worker is down are not seen:
fine for a cache that is also rebuilt at deploy time.

``durable_worker``: a queue table. A trigger on ``ports`` inserts a job into
``pgcast.queue_ports_cache_clearing`` in the changing transaction (the seed's
``ports_cache_clearing`` table); jobs wait in the table until a worker has
deleted the file, so a worker that was down catches up when it starts.

Run either from the command line, where ``PGCAST_CACHE_DIR`` is the cache::

    pgcast worker app:worker --dsn postgresql://...
    pgcast worker app:durable_worker --dsn postgresql://...
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pgcast
from pgcast.queue import Job, Queue
from pgcast.triggers import Change

logger = logging.getLogger("cache_invalidation")

#: The cache: one HTML page per port, ``<root>/<category>/<name>.html``.
CACHE_DIR = Path(os.environ.get("PGCAST_CACHE_DIR", "cache"))
CLEARING = Queue("ports_cache_clearing")


def cache_file(category: str, name: str) -> Path:
    """Where the page of port *category*/*name* is cached."""
    return CACHE_DIR / category / f"{name}.html"


def forget(category: str, name: str) -> None:
    path = cache_file(category, name)
    if path.exists():
        path.unlink()
        logger.info("cleared %s", path)


worker = pgcast.Worker(debounce=0.2, name="ports cache worker")


@worker.on("ports_changed")
def clear_changed_ports(events: list[pgcast.Event]) -> None:
    """Delete the pages of the ports in a batch of change events."""
    for event in events:
        keys = Change.from_event(event).keys()
        if keys is None:  # too many rows to list, or TRUNCATE: start afresh
            logger.info("clearing the whole cache")
            shutil.rmtree(CACHE_DIR, ignore_errors=True)
            continue
        for key in keys:
            forget(key["category"], key["name"])


durable_worker = pgcast.Worker(name="ports cache durable worker")


@durable_worker.on_queue(CLEARING, batch_size=100)
def clear_queued_ports(jobs: list[Job]) -> None:
    """Delete the pages the queued jobs name; the jobs are deleted after."""
    for job in jobs:
        forget(job.payload["category"], job.payload["name"])
