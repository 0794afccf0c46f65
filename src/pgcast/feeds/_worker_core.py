"""What both Workers share, without I/O: the retry policy, the batching
policy (:class:`Coalescer`), the routes, the registration of handlers and
what happens to a batch that failed for good.

The loops that drive them are written once, as asyncio code, in
:mod:`pgcast.feeds._worker_async` (``pgcast.aio.Worker``); the sync
:class:`pgcast.Worker` in :mod:`pgcast.feeds._worker` is generated from it by
``tools/async_to_sync.py``. The contract is in :mod:`pgcast.feeds.worker`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

from .._background import BackgroundThread
from .._backoff import Backoff
from .._channels import check_channel
from .._core import check_timeout, is_async_callable
from .._event import Event
from .queue import Job, Queue

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "READ_BURST",
    "RECONNECT_BACKOFF",
    "RETRY_BACKOFF",
    "STOP_SLICE",
    "Abandoned",
    "Coalescer",
    "ErrorHook",
    "Retry",
    "WorkerBase",
    "WorkerThread",
    "log_retry",
    "signal_handlers",
]

logger = logging.getLogger("pgcast.worker")

H = TypeVar("H", bound=Callable[..., Any])
#: ``on_error(exc, batch)``: a batch (of Events or of Jobs) that failed for good.
ErrorHook = Callable[[BaseException, "list[Event] | list[Job]"], None]

#: The longest wait between two checks for new work on a queue.
DEFAULT_POLL_INTERVAL = 30.0
#: Events read without waiting in one go, so a flood cannot starve the timers.
READ_BURST = 10_000
#: The longest single wait, hence the longest a stop() waits to be noticed.
STOP_SLICE = 0.2


#: A handler's retries by default: 0.5 s growing to 30 s, with full jitter.
RETRY_BACKOFF = Backoff(initial=0.5, maximum=30.0)
#: A Worker's reconnects by default: pgcast's own default policy.
RECONNECT_BACKOFF = Backoff()


@dataclass(frozen=True, slots=True)
class Retry:
    """How a failing handler is retried: *attempts* calls in all, each retry
    after a delay of the :class:`pgcast.Backoff` *backoff* (0.5 s growing to
    30 s with full jitter by default; a number is taken as its ``initial``).
    ``Retry(attempts=1)`` never retries.

    The number of calls is *attempts*: a *backoff* with ``max_attempts`` or
    ``max_time`` is refused rather than half obeyed.
    """

    attempts: int = 3
    backoff: Backoff | float = RETRY_BACKOFF

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) \
                or self.attempts < 1:
            raise ValueError(f"Retry.attempts must be an int >= 1, got {self.attempts!r}")
        backoff = self.backoff
        if not isinstance(backoff, Backoff):
            initial = check_timeout("Retry.backoff", backoff)
            if initial is None:
                raise TypeError("Retry.backoff must be a pgcast.Backoff or a number of seconds, "
                                "not None")
            backoff = Backoff(initial=initial, maximum=max(initial, RETRY_BACKOFF.maximum))
            object.__setattr__(self, "backoff", backoff)
        if backoff.max_attempts is not None or backoff.max_time is not None:
            raise ValueError(
                "Retry counts its calls with attempts=...: give it a Backoff without "
                "max_attempts or max_time"
            )

    @property
    def policy(self) -> Backoff:
        """*backoff*, as a :class:`pgcast.Backoff`."""
        backoff = self.backoff
        assert isinstance(backoff, Backoff)  # made one in __post_init__
        return backoff

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the *failures*-th failure (1-based)."""
        return self.policy.delay(failures, rand)


@dataclass(eq=False, kw_only=True)
class _Handled:
    """A registered handler: how it is retried, whether it is a coroutine function."""

    handler: Callable[..., Any]
    retry: Retry
    is_async: bool

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", repr(self.handler))


@dataclass(eq=False, kw_only=True)
class _Route(_Handled):
    channel: str
    debounce: float
    max_batch: int


@dataclass(eq=False, kw_only=True)
class _QueueRoute(_Handled):
    queue: Queue
    batch_size: int
    dirty: bool = True
    #: Statements the server refused in a row (a statement_timeout...).
    refused: int = 0
    #: Not drained again before this time (time.monotonic()) after a refusal.
    held_until: float = 0.0


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


class Abandoned(Exception):
    """A retry given up because the worker is stopping."""


class WorkerBase:
    """Settings, handlers and the flavour-free steps of a Worker (see
    :class:`pgcast.Worker` for the parameters)."""

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
        reconnect_backoff: Backoff | None = None,
    ) -> None:
        """See :class:`pgcast.Worker`."""
        self.dsn = dsn
        self.name = name
        if reconnect_backoff is not None and not isinstance(reconnect_backoff, Backoff):
            raise TypeError(f"reconnect_backoff must be a pgcast.Backoff or None, not "
                            f"{type(reconnect_backoff).__name__}")
        self._reconnect_backoff = reconnect_backoff or RECONNECT_BACKOFF
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
        # threading's, in both flavours: stop() may come from any thread.
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._running = threading.Lock()

    def __repr__(self) -> str:
        channels = sorted(self._routes)
        queues = sorted(self._queues)
        run = getattr(type(self), "run", None)
        name = "pgcast.aio.Worker" if inspect.iscoroutinefunction(run) else "pgcast.Worker"
        return f"<{name} channels={channels!r} queues={queues!r}>"

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
                channel=channel, handler=handler, debounce=route_debounce, max_batch=route_max,
                retry=retry or self._retry, is_async=is_async_callable(handler)))
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
                queue=q, handler=handler, batch_size=size, retry=retry or self._retry,
                is_async=is_async_callable(handler))
            return handler

        return register

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for and ``run()`` has not returned yet."""
        return self._stop.is_set()

    # -- steps of the loop -------------------------------------------------

    def _check_runnable(self) -> None:
        if not self._routes and not self._queues:
            raise ValueError("this worker has no handler: use @worker.on or @worker.on_queue")
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this worker is already running")

    def _check_idle(self) -> None:
        if self._running.locked():
            raise RuntimeError("register handlers before the worker runs")

    def _queues_held_for(self, now: float) -> float | None:
        """Seconds until a queue held after a refusal is due again, if any."""
        held = [r.held_until - now for r in self._queues.values()
                if r.dirty and r.held_until > now]
        return min(held) if held else None

    def _mark_dirty(self) -> None:
        for route in self._queues.values():
            route.dirty = True

    def _take(self, item: object, now: float) -> None:
        if isinstance(item, Event):
            queue = self._queues.get(item.channel)
            if queue is not None:
                queue.dirty = True
            for route in self._routes.get(item.channel, ()):
                self._coalescer.add(route, item, now)
        elif item is not None:
            # Not an event: the PubSub reconnected, and jobs queued meanwhile
            # were announced to nobody.
            self._mark_dirty()

    def _abandon_pending(self, why: BaseException) -> None:
        """The worker ends without running its handlers (*why*: a
        cancellation, an interrupt): every batch received and not handled
        goes to ``on_error`` (or the log) with an :class:`Abandoned` saying so."""
        for route, batch in self._coalescer.take_due(0.0, everything=True):
            error = Abandoned(
                f"pgcast worker: {type(why).__name__} ended run() before {route.name} "
                f"ran: this batch of {len(batch)} was received and not handled")
            error.__cause__ = why
            self._give_up(error, batch, route.name)

    def _give_up(self, exc: BaseException, batch: list[Any], name: str) -> None:
        hook = self.on_error
        if hook is not None:
            try:
                hook(exc, batch)
            except Exception:
                logger.exception("pgcast worker: the on_error hook failed on %s",
                                 _describe(batch), extra={"handler": name})
            return
        logger.error("pgcast worker: %s failed for good on a batch of %d, dropped: %s",
                     name, len(batch), _describe(batch), exc_info=exc,
                     extra={"handler": name, "batch_size": len(batch)})


@contextlib.contextmanager
def signal_handlers(stop: Callable[[], None]) -> Iterator[None]:
    """While in the block, SIGTERM and SIGINT call *stop* (once: a second
    signal acts as it did before); only in the main thread, else nothing."""
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
        stop()

    for s in signums:
        signal.signal(s, graceful)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def log_retry(exc: Exception, name: str, batch: Sequence[Any], *, attempt: int, retry: Retry,
              delay: float) -> None:
    """Log a handler's failure that will be retried."""
    logger.error(
        "pgcast worker: %s failed on a batch of %d (attempt %d of %d, retrying "
        "in %.2f s): %s", name, len(batch), attempt, retry.attempts, delay,
        _describe(batch), exc_info=exc,
        extra={"handler": name, "batch_size": len(batch), "attempt": attempt})


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


class WorkerThread(BackgroundThread):
    """A thread running a sync Worker's ``run()``; see ``Worker.run_in_thread``."""

    _what = "pgcast worker"

    def __init__(self, worker: Any) -> None:
        super().__init__(name="pgcast-worker", daemon=None)  # as the caller
        #: The :class:`pgcast.Worker` it runs.
        self.worker = worker

    def _body(self) -> None:
        self.worker.run()

    def _ask_to_stop(self) -> None:
        self.worker.stop()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the worker gracefully and wait up to *timeout* seconds (from
        a handler of the worker itself: only ask it to stop).

        :raises TimeoutError: a handler is still running after *timeout*.
        """
        super().stop(timeout)
