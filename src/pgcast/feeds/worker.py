"""Workers: handlers that get notifications in batches, and drain queue tables.

::

    worker = pgcast.Worker(dsn)

    @worker.on("ports_changed", debounce=0.5)
    def clear(events):                      # a list of Events: one batch
        ...

    @worker.on_queue("ports_cache_clearing", batch_size=100)
    def clear_durably(jobs):                # a list of pgcast.queue.Job
        ...

    worker.run()                            # until SIGTERM/SIGINT or worker.stop()

The contract:

- **Batches.** The first event of a channel opens a window of *debounce*
  seconds; the handler is then called once with every event of the channel
  that arrived in the window, in arrival order (at once when *max_batch*
  events are waiting). ``debounce=0`` delivers what has arrived so far. Each
  handler of a channel gets its own batches. Handlers may be functions or
  coroutine functions (run on the worker's own event loop); one runs at a
  time, in the worker's thread.
- **Retries.** A handler that raises is logged (with the batch) and called
  again with the same batch after the :class:`Retry` policy's backoff (a
  :class:`pgcast.Backoff`). After
  the last attempt, a notification batch goes to the ``on_error(exc, batch)``
  hook if there is one, else it is logged and dropped (a notification that
  must not be lost belongs in a queue table); a queue batch is retried job by
  job, once each, and the jobs that still fail become dead letters (see
  :mod:`pgcast.queue`), then go to ``on_error`` as well.
- **Queues.** See :mod:`pgcast.queue`: jobs are claimed with ``FOR UPDATE SKIP
  LOCKED`` and deleted in the transaction that ran the handler, on a second
  connection; the backlog is drained at start, on every wake-up and every
  *poll_interval* seconds.
- **Stopping.** :meth:`Worker.stop` (from any thread) or SIGTERM/SIGINT (the
  handlers are installed only when :meth:`Worker.run` runs in the main thread)
  ends :meth:`Worker.run` gracefully: the handler running finishes its batch,
  which is committed; notification batches still waiting for their window are
  delivered at once; queue jobs not yet claimed stay in the table. If a stop
  comes during a retry's backoff, the retry is abandoned: a queue batch is
  rolled back into the queue untouched, a notification batch goes to
  ``on_error``. A second SIGINT/SIGTERM during the graceful stop is not
  caught: it interrupts the process as usual. A :meth:`Worker.run` that is
  cancelled (the asyncio task) or interrupted (``KeyboardInterrupt``) runs
  no handler: the notification batches it received and had not handled go
  to ``on_error`` (or the log) with an error saying so; a queue batch in
  hand is rolled back into its queue.
- **Connection loss.** The worker reconnects as its *reconnect_backoff* says
  (a :class:`pgcast.Backoff`, the policy of every retry in pgcast) and drains
  its queues again; notifications sent while it was disconnected
  are lost (queued jobs are not). A stop during an outage ends
  :meth:`Worker.run` at once, without waiting for the database. A worker
  whose backoff gives up raises :class:`pgcast.ConnectError` from
  :meth:`Worker.run` after handing what it received to its handlers. A
  queue connection the server ends under a batch (a terminated backend, an
  ``idle_in_transaction_session_timeout`` shorter than the handler) is such
  a loss: the batch is rolled back into the queue and runs again, and the
  log names the setting.
- **Refused statements.** A claim or delete the server refuses on a
  connection that is fine (``statement_timeout``, ``lock_timeout``: the
  table locked by someone else) rolls the batch back into the queue; the
  error is logged and that queue is drained again after its
  :class:`Retry` backoff (0.1 s at least), while the session, its LISTEN
  and the other queues go on.

The same Worker runs in asyncio programs as ``pgcast.aio.Worker``:
``await worker.run()``, ``await worker.wait_ready()``; its coroutine handlers
run on the program's loop (plain functions too, so a blocking one blocks the
loop), and it installs no signal handlers (call ``worker.stop()`` from the
program's own). The sync Worker runs coroutine handlers on an event loop of
its own.

Both drive a :class:`pgcast.PubSub` (``listen``, ``events``, ``get_event``);
the batching policy is the pure :class:`Coalescer`. Layout: the loop is
written once as asyncio code in :mod:`pgcast.feeds._worker_async`, the sync
Worker generated from it (:mod:`pgcast.feeds._worker`); what has no I/O is in
:mod:`pgcast.feeds._worker_core`.
"""

from __future__ import annotations

from ._worker import Worker
from ._worker_async import AsyncWorker
from ._worker_core import DEFAULT_POLL_INTERVAL, Coalescer, ErrorHook, Retry, WorkerThread

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "AsyncWorker",
    "Coalescer",
    "ErrorHook",
    "Retry",
    "Worker",
    "WorkerThread",
]
