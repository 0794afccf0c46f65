"""Queue tables: work that must not be lost, shared by any number of workers.

NOTIFY alone is fire-and-forget: a listener that is down when a notification
is sent never sees it. For work that must happen (clearing a cache entry,
sending a mail), the work is a *row* in a queue table, inserted in the same
transaction as the change that calls for it, and NOTIFY only wakes the
workers. This replaces the FreshPorts recipe's ``SERIALIZABLE`` select-then-
delete, which races with concurrent inserts and serialises the workers.

The contract:

- :meth:`Queue.install` creates ``<schema>.queue_<name>`` (schema ``pgcast`` by
  default) with an ``AFTER INSERT ... FOR EACH STATEMENT`` trigger that sends
  an empty notification on :attr:`Queue.channel`. Any INSERT wakes the workers:
  :meth:`Queue.enqueue` from Python, or plain SQL from the application or from
  a trigger (``INSERT INTO pgcast.queue_x (payload) VALUES ('{"id": 1}')``).
  Notifications from one transaction collapse into one, so a bulk insert
  sends one wake-up.
- :meth:`Queue.enqueue` is an INSERT in the caller's transaction: on rollback
  the job is gone with the change that called for it; on commit it stays until
  a worker has processed it. Payloads are any JSON value, of any size (they
  never travel through NOTIFY).
- A worker (:meth:`pgcast.Worker.on_queue`) claims a batch with ``SELECT ...
  ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED`` in a transaction, runs the
  handler, and deletes the batch in that same transaction. Concurrent workers
  skip each other's locked rows, so each job is handled by one worker; a
  worker that dies mid-batch (crash, kill, lost connection) leaves its jobs in
  the table, unlocked, for the next worker. A job can thus run twice only when
  a worker died after its handler finished but before the commit: handlers
  should be idempotent (deleting a cache file is).
- A batch whose handler keeps failing (after the worker's retry policy) is
  retried job by job; the jobs that still fail are kept as *dead letters*:
  ``failed_at`` and ``last_error`` are set and no worker claims them again.
  :meth:`Queue.failed` lists them and :meth:`Queue.retry_failed` puts them
  back in line.
- Workers LISTEN before they drain, and drain the backlog when they start,
  after every wake-up and at least every ``poll_interval`` seconds, so a worker
  that starts late or restarts processes what was queued meanwhile.

Queue objects hold no connection; every method takes the caller's psycopg
connection, so it joins the caller's transaction if there is one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from .._errors import QueueError

__all__ = ["Job", "Queue", "Statement"]

#: A statement and its parameters, ready for ``execute`` on either flavour.
Statement = tuple["sql.SQL | sql.Composed | bytes", "tuple[Any, ...] | None"]

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}\Z")
# Serialises concurrent installers, as for the trigger functions.
_LOCK_KEY = "pgcast.queue"

_WAKE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION pgcast.queue_wake() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    -- An empty payload: identical notifications of one transaction collapse,
    -- and the workers read the jobs from the table, not from the notification.
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$fn$
"""


class Job(NamedTuple):
    """One row of a queue table, as a worker's handler receives it."""

    id: int
    """The job's id, increasing in insertion order."""
    payload: Any
    """The JSON value enqueued, decoded."""
    enqueued_at: datetime
    """When the enqueuing transaction ran (``now()``)."""
    attempts: int
    """How many times a worker already failed this job (0 for a fresh one)."""


class Queue:
    """A queue table named *name*: ``<schema>.queue_<name>``.

    :param name: 1 to 48 characters among ``a-z 0-9 _``, not starting with a
        digit, so that the table and the channel names stay plain identifiers.
    :param schema: where the table lives (default ``pgcast``).
    :raises QueueError: the name is not usable.
    """

    def __init__(self, name: str, *, schema: str = "pgcast") -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise QueueError(
                f"queue name must be 1 to 48 of a-z, 0-9 and _ (not starting with a "
                f"digit), got {name!r}"
            )
        if not isinstance(schema, str) or not schema or "\x00" in schema:
            raise QueueError(f"schema must be a non-empty name, got {schema!r}")
        self.name = name
        self.schema = schema
        #: The table's name inside :attr:`schema`.
        self.table = f"queue_{name}"
        #: The channel the workers are woken on.
        self.channel = f"pgcast_queue_{name}"
        self._ident = sql.Identifier(schema, self.table)

    def __repr__(self) -> str:
        return f"Queue({self.name!r}, schema={self.schema!r})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Queue) and other.name == self.name
                and other.schema == self.schema)

    def __hash__(self) -> int:
        return hash((self.name, self.schema))

    # -- setting up --------------------------------------------------------

    def install(self, conn: psycopg.Connection[Any]) -> None:
        """Create the table, the wake-up function and trigger; idempotent.

        When everything exists it only reads the catalog: every worker calls
        it at start, and re-creating the trigger would wait for the batches
        in progress and make the application's INSERTs queue up behind it.
        """
        if self.installed(conn):
            return
        with conn.transaction():
            for statement, params in self.install_statements():
                conn.execute(statement, params, prepare=False)

    def installed(self, conn: psycopg.Connection[Any]) -> bool:
        """True if the table, its wake-up trigger and the function exist."""
        row = conn.execute(*self.installed_query()).fetchone()
        return bool(row and row[0])

    # The statements, for drivers of either flavour (the asyncio Worker runs
    # them on an AsyncConnection); the methods above and below run them on a
    # sync connection.

    def installed_query(self) -> Statement:
        """The query whose one value is :meth:`installed`'s answer."""
        return (
            sql.SQL(
                "SELECT to_regprocedure('pgcast.queue_wake()') IS NOT NULL AND EXISTS ("
                " SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(%s)"
                " AND tgname = 'pgcast_wake')"
            ),
            (self._ident.as_string(),),
        )

    def install_statements(self) -> list[Statement]:
        """What :meth:`install` runs, in one transaction, when not installed."""
        return [
            (sql.SQL("SELECT pg_advisory_xact_lock(hashtext({}))").format(
                sql.Literal(_LOCK_KEY)), None),
            (sql.SQL("CREATE SCHEMA IF NOT EXISTS pgcast"), None),
            (sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)),
             None),
            (_WAKE_FUNCTION.encode(), None),
            (sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " payload jsonb NOT NULL DEFAULT 'null',"
                " enqueued_at timestamptz NOT NULL DEFAULT now(),"
                " attempts int NOT NULL DEFAULT 0,"
                " failed_at timestamptz,"
                " last_error text)"
            ).format(self._ident), None),
            (sql.SQL(
                "CREATE OR REPLACE TRIGGER pgcast_wake AFTER INSERT ON {}"
                " FOR EACH STATEMENT EXECUTE FUNCTION pgcast.queue_wake({})"
            ).format(self._ident, sql.Literal(self.channel)), None),
        ]

    def claim_query(self, limit: int) -> Statement:
        """What :meth:`claim` runs: rows of ``Job`` fields."""
        return (
            sql.SQL(
                "SELECT id, payload, enqueued_at, attempts FROM {}"
                " WHERE failed_at IS NULL ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
            ).format(self._ident),
            (limit,),
        )

    def complete_query(self, jobs: Sequence[Job]) -> Statement:
        """What :meth:`complete` runs."""
        return (
            sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(self._ident),
            ([j.id for j in jobs],),
        )

    def fail_query(self, jobs: Sequence[Job], error: str, tries: int) -> Statement:
        """What :meth:`fail` runs."""
        return (
            sql.SQL(
                "UPDATE {} SET failed_at = now(), last_error = %s, attempts = attempts + %s"
                " WHERE id = ANY(%s)"
            ).format(self._ident),
            (error, tries, [j.id for j in jobs]),
        )

    def uninstall(self, conn: psycopg.Connection[Any]) -> None:
        """Drop the table, and every job in it."""
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._ident))

    # -- producing ---------------------------------------------------------

    def enqueue(self, conn: psycopg.Connection[Any], payload: Any = None) -> int:
        """Queue one job in *conn*'s transaction (or at once in autocommit);
        returns its id. *payload* is any JSON-serialisable value.

        :raises QueueError: the payload cannot be encoded as JSON.
        """
        return self.enqueue_many(conn, [payload])[0]

    def enqueue_many(self, conn: psycopg.Connection[Any], payloads: Iterable[Any]) -> list[int]:
        """Queue many jobs in one statement (one wake-up); returns their ids in order."""
        values = [_json(p) for p in payloads]
        if not values:
            return []
        rows = conn.execute(
            sql.SQL(
                "INSERT INTO {} (payload) SELECT p::jsonb FROM unnest(%s::text[])"
                " WITH ORDINALITY AS t(p, n) ORDER BY n RETURNING id"
            ).format(self._ident),
            (values,),
        ).fetchall()
        return sorted(r[0] for r in rows)

    # -- inspecting --------------------------------------------------------

    def pending(self, conn: psycopg.Connection[Any]) -> int:
        """How many jobs wait for a worker (dead letters not counted)."""
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE failed_at IS NULL").format(self._ident)
        ).fetchone()
        return int(row[0]) if row else 0

    def failed(self, conn: psycopg.Connection[Any]) -> list[tuple[Job, str]]:
        """The dead letters, oldest first, each with the error that failed it."""
        rows = conn.execute(
            sql.SQL(
                "SELECT id, payload, enqueued_at, attempts, coalesce(last_error, '') FROM {}"
                " WHERE failed_at IS NOT NULL ORDER BY id"
            ).format(self._ident)
        ).fetchall()
        return [(Job(*r[:4]), r[4]) for r in rows]

    def retry_failed(self, conn: psycopg.Connection[Any]) -> int:
        """Put every dead letter back in line and wake the workers; returns how many."""
        with conn.transaction():
            cur = conn.execute(
                sql.SQL("UPDATE {} SET failed_at = NULL WHERE failed_at IS NOT NULL").format(
                    self._ident)
            )
            if cur.rowcount:
                conn.execute("SELECT pg_notify(%s, '')", (self.channel,))
        return cur.rowcount

    # -- consuming (the worker's side) -------------------------------------

    def claim(self, conn: psycopg.Connection[Any], limit: int) -> list[Job]:
        """Lock and return up to *limit* waiting jobs, oldest first, skipping
        those other transactions hold. Call inside a transaction."""
        rows = conn.execute(*self.claim_query(limit)).fetchall()
        return [Job(*r) for r in rows]

    def complete(self, conn: psycopg.Connection[Any], jobs: Sequence[Job]) -> None:
        """Delete *jobs*: done. Call in the transaction that claimed them."""
        conn.execute(*self.complete_query(jobs))

    def fail(
        self, conn: psycopg.Connection[Any], jobs: Sequence[Job], error: str, tries: int
    ) -> None:
        """Keep *jobs* as dead letters with *error*; *tries* is added to ``attempts``."""
        conn.execute(*self.fail_query(jobs, error, tries))


def _json(payload: Any) -> str:
    try:
        # NaN and Infinity are not JSON, and jsonb refuses them.
        return json.dumps(payload, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise QueueError(f"job payload cannot be encoded as JSON: {exc}") from exc
