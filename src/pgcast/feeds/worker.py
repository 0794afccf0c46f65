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
  again with the same batch after the :class:`Retry` policy's backoff. After
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
  caught: it interrupts the process as usual.
- **Connection loss.** The worker reconnects with a growing delay (up to 30 s)
  and drains its queues again; notifications sent while it was disconnected
  are lost (queued jobs are not).

Everything here drives :class:`pgcast.PubSub` (``listen``, ``events``,
``get_event``); the batching policy is the pure :class:`Coalescer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import psycopg

from .. import client
from .._channels import check_channel
from .._core import check_timeout, connect_args, is_async_callable
from .._errors import ConnectError, ConnectionLostError
from .._event import Event
from .queue import Job, Queue

__all__ = ["Coalescer", "ErrorHook", "Retry", "Worker", "WorkerThread"]

logger = logging.getLogger("pgcast.worker")

H = TypeVar("H", bound=Callable[..., Any])
#: ``on_error(exc, batch)``: a batch (of Events or of Jobs) that failed for good.
ErrorHook = Callable[[BaseException, "list[Event] | list[Job]"], None]

#: The longest wait between two checks for new work on a queue.
DEFAULT_POLL_INTERVAL = 30.0
#: Events read without waiting in one go, so a flood cannot starve the timers.
_READ_BURST = 10_000
_RECONNECT_MAX = 30.0
#: The longest single wait, hence the longest a stop() waits to be noticed.
_STOP_SLICE = 0.2


@dataclass(frozen=True, slots=True)
class Retry:
    """How a failing handler is retried: *attempts* calls in all, waiting
    *backoff* seconds before the second, multiplied by *factor* each time up
    to *max_backoff*. ``Retry(attempts=1)`` never retries."""

    attempts: int = 3
    backoff: float = 0.5
    factor: float = 2.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) \
                or self.attempts < 1:
            raise ValueError(f"Retry.attempts must be an int >= 1, got {self.attempts!r}")
        for name in ("backoff", "factor", "max_backoff"):
            check_timeout(f"Retry.{name}", getattr(self, name))
        if self.factor < 1:
            raise ValueError(f"Retry.factor must be >= 1, got {self.factor}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the *failures*-th failure (1-based)."""
        return float(min(self.max_backoff, self.backoff * self.factor ** (failures - 1)))


@dataclass(eq=False)
class _Route:
    channel: str
    handler: Callable[..., Any]
    debounce: float
    max_batch: int
    retry: Retry
    is_async: bool

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", repr(self.handler))


@dataclass(eq=False)
class _QueueRoute:
    queue: Queue
    handler: Callable[..., Any]
    batch_size: int
    retry: Retry
    is_async: bool
    dirty: bool = True

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", repr(self.handler))


@dataclass
class _Pending:
    opened: float
    events: list[Event] = field(default_factory=list)


class Coalescer:
    """The batching policy, pure: which batch is due when.

    Routes are any hashable objects with ``debounce`` and ``max_batch``
    attributes; :meth:`add` files an event for a route at time *now*.
    """

    def __init__(self) -> None:
        self._pending: dict[Any, _Pending] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, route: Any, event: Event, now: float) -> None:
        """File *event* in *route*'s open batch, opening one if needed."""
        pending = self._pending.get(route)
        if pending is None:
            pending = self._pending[route] = _Pending(now)
        pending.events.append(event)

    def due_in(self, now: float) -> float | None:
        """Seconds until the next batch is due (0: now), or None if none waits."""
        best: float | None = None
        for route, pending in self._pending.items():
            if len(pending.events) >= route.max_batch:
                return 0.0
            left = max(0.0, pending.opened + route.debounce - now)
            if best is None or left < best:
                best = left
        return best

    def take_due(self, now: float, everything: bool = False) -> list[tuple[Any, list[Event]]]:
        """Remove and return the due batches (all of them with *everything*),
        oldest first; a batch is at most ``max_batch`` events, the rest stays."""
        out: list[tuple[Any, list[Event]]] = []
        for route, pending in sorted(self._pending.items(), key=lambda kv: kv[1].opened):
            full = len(pending.events) >= route.max_batch
            if everything or full or now >= pending.opened + route.debounce:
                batch = pending.events[: route.max_batch]
                rest = pending.events[route.max_batch:]
                out.append((route, batch))
                if rest:
                    self._pending[route] = _Pending(now, rest)
                else:
                    del self._pending[route]
        return out


class _Abandoned(Exception):
    """A retry given up because the worker is stopping."""


class Worker:
    """Run handlers for notifications and queue tables; see the module docs.

    :param dsn: the database; ``None`` or ``""``: ``DATABASE_URL``, then the
        ``PG*`` variables (the ``pgcast worker`` command fills it in from
        ``--dsn``).
    :param debounce: the default batching window of :meth:`on`, seconds.
    :param max_batch: the default largest notification batch.
    :param retry: the default :class:`Retry` policy.
    :param on_error: called with ``(exception, batch)`` for a batch that failed
        its last attempt; default: log it.
    :param poll_interval: drain the queues at least this often, seconds.
    :param name: the ``application_name`` of the worker's connections, to
        tell workers apart in ``pg_stat_activity``.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        debounce: float = 0.1,
        max_batch: int = 1000,
        retry: Retry | None = None,
        on_error: ErrorHook | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        name: str = "pgcast worker",
    ) -> None:
        self.dsn = dsn
        self.name = name
        self._debounce = _check_debounce(debounce)
        self._max_batch = _check_positive("max_batch", max_batch)
        self._retry = retry if retry is not None else Retry()
        self.on_error = on_error
        interval = check_timeout("poll_interval", poll_interval)
        if not interval:
            raise ValueError("poll_interval must be > 0 seconds")
        self._poll_interval = interval
        self._routes: dict[str, list[_Route]] = {}
        self._queues: dict[str, _QueueRoute] = {}
        self._coalescer = Coalescer()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._running = threading.Lock()
        self._pubsub: client.PubSub | None = None
        self._loop: asyncio.Runner | None = None

    def __repr__(self) -> str:
        channels = sorted(self._routes)
        queues = sorted(self._queues)
        return f"<pgcast.Worker channels={channels!r} queues={queues!r}>"

    # -- registration ------------------------------------------------------

    def on(
        self,
        channel: str,
        *,
        debounce: float | None = None,
        max_batch: int | None = None,
        retry: Retry | None = None,
    ) -> Callable[[H], H]:
        """Decorator: call the function with batches of *channel*'s events."""
        check_channel(channel)
        route_debounce = self._debounce if debounce is None else _check_debounce(debounce)
        route_max = self._max_batch if max_batch is None else _check_positive(
            "max_batch", max_batch)

        def register(handler: H) -> H:
            _check_handler(handler)
            self._check_idle()
            self._routes.setdefault(channel, []).append(_Route(
                channel, handler, route_debounce, route_max, retry or self._retry,
                is_async_callable(handler)))
            return handler

        return register

    def on_queue(
        self, queue: Queue | str, *, batch_size: int = 100, retry: Retry | None = None
    ) -> Callable[[H], H]:
        """Decorator: call the function with batches of *queue*'s jobs (a
        :class:`~pgcast.queue.Queue` or a queue name). The worker installs
        the queue table if it is missing. One handler per queue."""
        q = queue if isinstance(queue, Queue) else Queue(queue)
        size = _check_positive("batch_size", batch_size)

        def register(handler: H) -> H:
            _check_handler(handler)
            self._check_idle()
            if q.channel in self._queues:
                raise ValueError(f"{q!r} already has a handler in this worker")
            self._queues[q.channel] = _QueueRoute(
                q, handler, size, retry or self._retry, is_async_callable(handler))
            return handler

        return register

    # -- running -----------------------------------------------------------

    def run(self) -> None:
        """Work until :meth:`stop`, SIGTERM or SIGINT; see the module docs.

        :raises ValueError: no handler was registered.
        :raises RuntimeError: the worker is already running.
        :raises ConnectError: the first connection failed (later losses are
            retried).
        """
        if not self._routes and not self._queues:
            raise ValueError("this worker has no handler: use @worker.on or @worker.on_queue")
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this worker is already running")
        try:
            with self._signals(), contextlib.ExitStack() as stack:
                self._loop = None
                stack.callback(self._close_loop)
                self._supervise()
                # Graceful: what was received is handled before returning.
                self._deliver(time.monotonic(), everything=True)
        finally:
            self._ready.clear()
            self._stop.clear()
            self._running.release()

    def stop(self) -> None:
        """Ask :meth:`run` to finish its batch and return. Any thread; idempotent."""
        self._stop.set()
        ps = self._pubsub
        if ps is not None:
            ps._wake()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the worker listens and has drained its queues once."""
        return self._ready.wait(timeout)

    def run_in_thread(self) -> WorkerThread:
        """Run the worker in a new (non-daemon) thread; returns it started."""
        thread = WorkerThread(self)
        thread.start()
        return thread

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for and :meth:`run` has not returned yet."""
        return self._stop.is_set()

    # -- the loop ----------------------------------------------------------

    def _supervise(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._session()
                return
            except (ConnectionLostError, ConnectError, psycopg.OperationalError) as exc:
                if failures == 0 and not self._ready.is_set() and isinstance(exc, ConnectError):
                    raise  # a worker that never connected has a bad DSN, not bad luck
                failures += 1
                delay = min(_RECONNECT_MAX, 0.5 * 2 ** min(failures - 1, 10))
                logger.warning("pgcast worker lost its connection (%s); reconnecting in %.1f s",
                               exc, delay)
                self._ready.clear()
                self._stop.wait(delay)

    def _session(self) -> None:
        conninfo, options = connect_args(self.dsn or "", {"application_name": self.name})
        with contextlib.ExitStack() as stack:
            ps = stack.enter_context(client.connect(conninfo, **options))
            work: psycopg.Connection[Any] | None = None
            if self._queues:
                try:
                    work = stack.enter_context(psycopg.Connection.connect(conninfo, **options))
                except psycopg.OperationalError as exc:
                    raise ConnectError(f"cannot connect to PostgreSQL: {exc}") from exc
                for route in self._queues.values():
                    route.queue.install(work)
            self._pubsub = ps
            stack.callback(setattr, self, "_pubsub", None)
            # LISTEN before draining: a job queued after the drain looked is
            # announced by a notification this connection will receive.
            ps.listen(*self._routes, *self._queues)
            for route in self._queues.values():
                route.dirty = True
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
                # One wait per turn, then whatever else has arrived, unwaited.
                # The wait is sliced so that a stop() is seen within a slice.
                slice_ = min(max(timeout, 0.001), _STOP_SLICE)
                for item in ps.events(select_timeout=slice_, yield_timeouts=True):
                    self._take(item)
                    break
                for _ in range(_READ_BURST):
                    event = ps.get_event()
                    if event is None:
                        break
                    self._take(event)
                now = time.monotonic()
                if now >= next_poll:
                    for route in self._queues.values():
                        route.dirty = True
                    next_poll = now + self._poll_interval
                self._deliver(now)

    def _take(self, item: object) -> None:
        if isinstance(item, Event):
            self._route(item, time.monotonic())
        elif item is not None:
            # Not an event: the PubSub reconnected, and jobs queued meanwhile
            # were announced to nobody.
            for route in self._queues.values():
                route.dirty = True

    def _route(self, event: Event, now: float) -> None:
        queue = self._queues.get(event.channel)
        if queue is not None:
            queue.dirty = True
        for route in self._routes.get(event.channel, ()):
            self._coalescer.add(route, event, now)

    def _deliver(self, now: float, everything: bool = False) -> None:
        for route, batch in self._coalescer.take_due(now, everything):
            try:
                self._call(route.handler, route.is_async, batch, route.retry, route.name)
            except _Abandoned as stopped:
                self._give_up(stopped.__cause__ or stopped, batch, route.name)
            except Exception as exc:
                self._give_up(exc, batch, route.name)

    def _drain(self, work: psycopg.Connection[Any]) -> None:
        for route in self._queues.values():
            while route.dirty and not self._stop.is_set():
                if not self._drain_batch(work, route):
                    route.dirty = False

    def _drain_batch(self, work: psycopg.Connection[Any], route: _QueueRoute) -> bool:
        """Claim, handle and delete one batch; False when the queue was empty."""
        queue = route.queue
        try:
            with work.transaction():
                jobs = queue.claim(work, route.batch_size)
                if not jobs:
                    return False
                try:
                    self._call(route.handler, route.is_async, jobs, route.retry, route.name)
                except _Abandoned:
                    raise
                except Exception as exc:
                    self._dead_letters(work, route, jobs, exc)
                else:
                    queue.complete(work, jobs)
        except _Abandoned:
            logger.warning("pgcast worker stopping: %d jobs of %r left in the queue",
                           len(jobs), queue)
            return False
        except psycopg.OperationalError as exc:
            raise ConnectionLostError(f"connection to PostgreSQL lost: {exc}") from exc
        return True

    def _dead_letters(
        self, work: psycopg.Connection[Any], route: _QueueRoute, jobs: list[Job],
        exc: Exception,
    ) -> None:
        # One bad job should not condemn its batch: try each alone, once.
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
                    route.queue.complete(work, [job])
        for job, job_exc in failed:
            route.queue.fail(work, [job], f"{type(job_exc).__name__}: {job_exc}",
                             route.retry.attempts)
        if failed:
            self._give_up(failed[0][1], [job for job, _ in failed], route.name)

    def _call(
        self, handler: Callable[..., Any], is_async: bool, batch: Sequence[Any],
        retry: Retry, name: str,
    ) -> None:
        """Call *handler* with *batch*, retrying per *retry*; raises the last
        error, or :class:`_Abandoned` if a stop came during a backoff."""
        for attempt in range(1, retry.attempts + 1):
            try:
                result = handler(list(batch))
                if is_async:
                    self._async_loop().run(result)
                return
            except Exception as exc:
                if attempt == retry.attempts:
                    raise
                delay = retry.delay(attempt)
                logger.error(
                    "pgcast worker: %s failed on a batch of %d (attempt %d of %d, retrying "
                    "in %.2f s): %s", name, len(batch), attempt, retry.attempts, delay,
                    _describe(batch), exc_info=exc)
                if self._stop.wait(delay):
                    raise _Abandoned(f"{name}: retry abandoned, the worker is stopping") \
                        from exc

    def _give_up(self, exc: BaseException, batch: list[Any], name: str) -> None:
        hook = self.on_error
        if hook is not None:
            try:
                hook(exc, batch)
            except Exception:
                logger.exception("pgcast worker: the on_error hook failed on %s",
                                 _describe(batch))
            return
        logger.error("pgcast worker: %s failed for good on a batch of %d, dropped: %s",
                     name, len(batch), _describe(batch), exc_info=exc)

    def _async_loop(self) -> asyncio.Runner:
        if self._loop is None:
            self._loop = asyncio.Runner()
        return self._loop

    def _close_loop(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def _check_idle(self) -> None:
        if self._running.locked():
            raise RuntimeError("register handlers before the worker runs")

    # -- signals -----------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signums = (signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.getsignal(s) for s in signums}

        def graceful(signum: int, frame: FrameType | None) -> None:
            logger.info("pgcast worker: %s received, finishing the batch in hand",
                        signal.Signals(signum).name)
            # A second signal is not ours to soften: it acts as it did before.
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop()

        for s in signums:
            signal.signal(s, graceful)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class WorkerThread(threading.Thread):
    """A thread running :meth:`Worker.run`; see :meth:`Worker.run_in_thread`."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="pgcast-worker")
        self.worker = worker
        #: What :meth:`Worker.run` raised, if it did.
        self.exception: BaseException | None = None

    def run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.exception = exc
            raise

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the worker gracefully and wait up to *timeout* seconds.

        :raises TimeoutError: a handler is still running after *timeout*.
        """
        self.worker.stop()
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"pgcast worker did not stop within {timeout} s")


def _describe(batch: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(x) for x in batch[:limit])
    more = f" and {len(batch) - limit} more" if len(batch) > limit else ""
    return f"[{shown}{more}]"


def _check_debounce(value: float) -> float:
    checked = check_timeout("debounce", value)
    if checked is None:
        raise ValueError("debounce must be a number of seconds >= 0, not None")
    return checked


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_handler(handler: object) -> None:
    if not callable(handler):
        raise TypeError(f"a handler must be callable, not {type(handler).__name__}")
