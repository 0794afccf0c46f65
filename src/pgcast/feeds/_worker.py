# Generated from src/pgcast/feeds/_worker_async.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
# ruff: noqa: E501
"""The Worker's loop, written once as asyncio code (``pgcast.aio.Worker``,
this file); the sync ``pgcast.Worker`` (:mod:`pgcast.feeds._worker`) is
generated from it by ``tools/async_to_sync.py``.

The contract (batches, retries, queues, stopping, connection loss) is in
:mod:`pgcast.feeds.worker`; the policies without I/O are in
:mod:`pgcast.feeds._worker_core`. What differs between the flavours:

- the asyncio Worker awaits coroutine handlers on the running loop and calls
  plain functions there too (a blocking handler blocks the loop: make it a
  coroutine, or hand the work to a thread); the sync Worker runs coroutine
  handlers on an event loop of its own (:class:`~pgcast._flavour.AwaitRunner`);
- the sync :meth:`run` installs SIGTERM/SIGINT handlers when it runs in the
  main thread; an asyncio program owns its loop's signals, so the asyncio
  Worker leaves them alone (call :meth:`stop` from your own handler).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from .._backoff import Attempts
from .._connect import connect_failed
from .._core import connect_args
from .._errors import ConnectError, ConnectionLostError
from .._flavour import AwaitRunner, call_home, home, wait_flag
from .._reconnect import RetryLog, add_keepalives, describe_attempts
from ..client._open import connect
from ..client._pubsub import PubSub
from ._queue_faults import queue_connection_lost, queue_refused
from ._worker_core import (
    READ_BURST,
    STOP_SLICE,
    Abandoned,
    Retry,
    WorkerBase,
    WorkerThread,
    _QueueRoute,
    log_retry,
    logger,
    signal_handlers,
)
from .queue import Job

__all__ = ["Worker"]


class Worker(WorkerBase):
    """Run handlers for notifications and queue tables; see
    :mod:`pgcast.feeds.worker` for the contract.

    :param dsn: the database; ``None`` or ``""``: ``DATABASE_URL``, then the
        ``PG*`` variables (the ``pgcast worker`` command fills it in from
        ``--dsn``).
    :param debounce: the default batching window of :meth:`on`, seconds.
    :param max_batch: the default largest notification batch.
    :param retry: the default :class:`~pgcast.worker.Retry` policy.
    :param on_error: called with ``(exception, batch)`` for a batch that failed
        its last attempt; default: log it.
    :param poll_interval: drain the queues at least this often, seconds.
    :param name: the ``application_name`` of the worker's connections, to
        tell workers apart in ``pg_stat_activity``.
    :param reconnect_backoff: how a lost connection is retried (a
        :class:`pgcast.Backoff`; default ``Backoff()``: at once, then 0.1 s
        growing to 10 s, with jitter, without end). A :meth:`stop` during
        an outage ends :meth:`run` at once.
    """

    _pubsub: PubSub | None = None
    #: The connection that drains the queue tables, while a session runs.
    _work: psycopg.Connection[Any] | None = None
    _runner: AwaitRunner | None = None
    #: Where run() waits (its event loop; None in the sync flavour): stop()
    #: wakes it there, whatever thread it is called from.
    _home: Any = None

    def run(self) -> None:
        """Work until :meth:`stop` (or SIGTERM/SIGINT, sync Worker in the
        main thread); see the module docs.

        :raises ValueError: no handler was registered.
        :raises RuntimeError: the worker is already running.
        :raises ConnectError: the first connection failed (later losses are
            retried).
        """
        self._check_runnable()
        self._home = home()
        try:
            with self._signals():
                self._runner = runner = AwaitRunner()
                try:
                    try:
                        self._supervise()
                    except Exception:
                        # Given up (or failed): what was received still goes
                        # to its handlers, not down with the worker.
                        self._deliver(time.monotonic(), everything=True)
                        raise
                    except BaseException as exc:
                        # Cancelled (asyncio) or interrupted (KeyboardInterrupt):
                        # no handler runs now, but what was received and not
                        # handled goes to on_error (or the log), not silently away.
                        self._abandon_pending(exc)
                        raise
                    # Graceful: what was received is handled before returning.
                    self._deliver(time.monotonic(), everything=True)
                finally:
                    self._runner = None
                    runner.close()
        finally:
            self._ready.clear()
            self._stop.clear()
            self._running.release()

    def stop(self) -> None:
        """Ask :meth:`run` to finish its batch and return. Any thread; idempotent."""
        self._stop.set()
        ps = self._pubsub
        if ps is not None:
            # Not ps.wake() here: from another thread, the asyncio PubSub's
            # wake-up (completing its loop's future) is not thread safe.
            call_home(self._home, ps.wake)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the worker listens and has drained its queues once."""
        return wait_flag(self._ready, timeout)

    # -- the loop ----------------------------------------------------------

    def _supervise(self) -> None:
        attempts: Attempts | None = None
        quiet = RetryLog()
        while not self._stop.is_set():
            try:
                self._session()
                return
            except (ConnectionLostError, ConnectError, psycopg.OperationalError) as exc:
                if (
                    attempts is None
                    and (not self._ready.is_set())
                    and isinstance(exc, ConnectError)
                ):
                    raise  # a worker that never connected has a bad DSN, not bad luck
                if attempts is None or self._ready.is_set():
                    # Up since the last loss (or never lost): a new series.
                    attempts = self._reconnect_backoff.attempts(time.monotonic())
                    quiet = RetryLog()
                delay = attempts.next_delay(time.monotonic())
                if delay is None:
                    raise ConnectError(
                        f"pgcast worker: gave up reconnecting after {attempts.count} attempt(s) (reconnect_backoff); last error: {exc}"
                    ) from exc
                # The loss, then at most one summary per RETRY_LOG_EVERY s
                # (without a delay, hundreds of attempts a second).
                covered = quiet.failed(attempts.count, time.monotonic())
                if covered is not None:
                    first, number = covered
                    what = (
                        "lost its connection"
                        if number == 1
                        else "reconnect " + describe_attempts(first - 1, number - 1) + " failed"
                    )
                    logger.warning(
                        "pgcast worker %s (%s); reconnecting in %.1f s",
                        what,
                        exc,
                        delay,
                        extra={"attempt": attempts.count},
                    )
                self._ready.clear()
                wait_flag(self._stop, delay)

    def _session(self) -> None:
        conninfo, options = connect_args(self.dsn or "", {"application_name": self.name})
        with contextlib.ExitStack() as stack:
            # The worker reconnects (by _supervise, which sees a stop); the
            # PubSub's own reconnect would not end on stop() until it gave up.
            ps = stack.enter_context(connect(conninfo, reconnect=False, **options))
            work: psycopg.Connection[Any] | None = None
            if self._queues:
                # The PubSub's TCP keepalives and tcp_user_timeout (the DSN's
                # own win): a claim or a delete sent into a dead network fails
                # within a minute, not the kernel's quarter of an hour.
                work_options = add_keepalives(conninfo, options, ps.health_check_interval)
                try:
                    work = stack.enter_context(psycopg.Connection.connect(conninfo, **work_options))
                except psycopg.OperationalError as exc:
                    raise connect_failed(exc) from exc
                self._work = work
                stack.callback(setattr, self, "_work", None)
                for route in self._queues.values():
                    self._install(work, route)
            self._pubsub = ps
            stack.callback(setattr, self, "_pubsub", None)
            # LISTEN before draining: a job queued after the drain looked is
            # announced by a notification this connection will receive.
            ps.listen(*self._routes, *self._queues)
            self._mark_dirty()
            next_poll = time.monotonic() + self._poll_interval
            first = True
            while not self._stop.is_set():
                if work is not None:
                    self._drain(work)
                    if self._stop.is_set():
                        break
                if first:
                    self._ready.set()
                    first = False
                now = time.monotonic()
                due = self._coalescer.due_in(now)
                timeout = next_poll - now if due is None else min(due, next_poll - now)
                held = self._queues_held_for(now)  # a queue to retry after a refusal
                if held is not None:
                    timeout = min(timeout, held)
                # One wait per turn, then whatever else has arrived, unwaited.
                # The wait is sliced so that a stop() is seen within a slice.
                slice_ = min(max(timeout, 0.001), STOP_SLICE)
                for item in ps.events(select_timeout=slice_, yield_timeouts=True):
                    self._take(item, time.monotonic())
                    break
                for _ in range(READ_BURST):
                    event = ps.get_event()
                    if event is None:
                        break
                    self._take(event, time.monotonic())
                now = time.monotonic()
                if now >= next_poll:
                    self._mark_dirty()
                    next_poll = now + self._poll_interval
                self._deliver(now)

    def _deliver(self, now: float, everything: bool = False) -> None:
        for route, batch in self._coalescer.take_due(now, everything):
            try:
                self._call(route.handler, route.is_async, batch, route.retry, route.name)
            except Abandoned as stopped:
                self._give_up(stopped.__cause__ or stopped, batch, route.name)
            except Exception as exc:
                self._give_up(exc, batch, route.name)

    # -- queues ------------------------------------------------------------

    def _install(self, work: psycopg.Connection[Any], route: _QueueRoute) -> None:
        queue = route.queue
        cur = work.execute(*queue.installed_query())
        row = cur.fetchone()
        if row and row[0]:
            return
        with work.transaction():
            for statement, params in queue.install_statements():
                work.execute(statement, params, prepare=False)

    def _drain(self, work: psycopg.Connection[Any]) -> None:
        for route in self._queues.values():
            while route.dirty and (not self._stop.is_set()):
                if time.monotonic() < route.held_until:
                    break  # refused lately: retried once its backoff is over
                if not self._drain_batch(work, route):
                    if time.monotonic() >= route.held_until:
                        route.dirty = False  # empty (not refused)
                    break

    def _drain_batch(self, work: psycopg.Connection[Any], route: _QueueRoute) -> bool:
        """Claim, handle and delete one batch; False when the queue was empty
        (or the server refused a statement: the queue is held for a while)."""
        queue = route.queue
        jobs: list[Job] = []
        handled = False
        began: float | None = None
        try:
            with work.transaction():
                began = time.monotonic()
                cur = work.execute(*queue.claim_query(route.batch_size))
                jobs = [Job(*r) for r in cur.fetchall()]
                if not jobs:
                    route.refused = 0
                    return False
                try:
                    self._call(route.handler, route.is_async, jobs, route.retry, route.name)
                except Abandoned:
                    raise
                except Exception as exc:
                    handled = True
                    self._dead_letters(work, route, jobs, exc)
                else:
                    handled = True
                    work.execute(*queue.complete_query(jobs))
        except Abandoned:
            logger.warning(
                "pgcast worker stopping: %d jobs of %r left in the queue", len(jobs), queue
            )
            return False
        except psycopg.Error as exc:
            if work.closed or work.broken:
                # The session ended under the batch (a terminated backend, an
                # idle_in_transaction_session_timeout, the network): a new one.
                held = None if began is None else time.monotonic() - began
                raise ConnectionLostError(
                    queue_connection_lost(route, exc, len(jobs), handled, held)
                ) from exc
            if not isinstance(exc, psycopg.OperationalError):
                raise
            # A statement refused on a connection that is fine (a
            # statement_timeout, a lock_timeout): rolled back; the session,
            # its LISTEN and the other queues go on.
            queue_refused(route, exc, len(jobs), handled, time.monotonic())
            return False
        route.refused = 0
        return True

    def _dead_letters(
        self, work: psycopg.Connection[Any], route: _QueueRoute, jobs: list[Job], exc: Exception
    ) -> None:
        # One bad job should not condemn its batch: try each alone, once.
        queue = route.queue
        failed: list[tuple[Job, Exception]] = []
        if len(jobs) == 1:
            failed.append((jobs[0], exc))
        else:
            one = Retry(attempts=1)
            for job in jobs:
                try:
                    self._call(route.handler, route.is_async, [job], one, route.name)
                except Exception as error:
                    failed.append((job, error))
                else:
                    work.execute(*queue.complete_query([job]))
        for job, job_exc in failed:
            work.execute(
                *queue.fail_query(
                    [job], f"{type(job_exc).__name__}: {job_exc}", route.retry.attempts
                )
            )
        if failed:
            self._give_up(failed[0][1], [job for job, _ in failed], route.name)

    # -- handlers ----------------------------------------------------------

    def _call(
        self,
        handler: Callable[..., Any],
        is_async: bool,
        batch: Sequence[Any],
        retry: Retry,
        name: str,
    ) -> None:
        """Call *handler* with *batch*, retrying per *retry*; raises the last
        error, or :class:`Abandoned` if a stop came during a backoff."""
        for attempt in range(1, retry.attempts + 1):
            try:
                result = handler(list(batch))
                if is_async:
                    assert self._runner is not None
                    self._runner.run(result)
                return
            except Exception as exc:
                if attempt == retry.attempts:
                    raise
                delay = retry.delay(attempt)
                log_retry(exc, name, batch, attempt=attempt, retry=retry, delay=delay)
                if wait_flag(self._stop, delay):
                    raise Abandoned(f"{name}: retry abandoned, the worker is stopping") from exc

    def _signals(self) -> contextlib.AbstractContextManager[None]:
        return signal_handlers(self.stop)

    def run_in_thread(self) -> WorkerThread:
        """Run the worker in a new (non-daemon) thread; returns it started."""
        thread = WorkerThread(self)
        thread.start()
        return thread
