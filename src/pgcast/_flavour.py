"""What the sync drivers do differently from the asyncio ones, and nothing else.

The sync drivers are generated from the asyncio ones by
``tools/async_to_sync.py``, which imports this module where the asyncio code
imports :mod:`pgcast._flavour_async`: every name there has its namesake
here, with the same meaning (read that module's docstring for the list). What
differs in the sync flavour:

* :class:`SocketWaiter` waits with ``poll()`` on the connection's socket and
  a socket pair that other threads write a byte to in order to wake it. A
  thread inside ``select()`` must find that byte even when the PubSub is
  closed meanwhile (closing the pair would drop it from epoll's ready list
  and leave the thread asleep), so the waiting thread releases them on its
  way out when it was waiting at :meth:`SocketWaiter.close`.
* :class:`StateLock` is a real lock: threads share the PubSub's counters.
* :func:`resolve` and :class:`AwaitRunner` run a coroutine a callback returned
  on an event loop of their own, since there is no running one.
* :func:`start_task` runs a daemon thread that :func:`gather_cancelled` can
  stop, as asyncio cancels a task, but only where it sleeps: its next
  :func:`sleep_unless` (a reconnect's backoff) raises instead of sleeping
  on. Work that cannot be interrupted (a connection attempt) ends first, so
  :func:`gather_cancelled` waits for it within a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import select
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import pq

from ._errors import ConnectionLostError
from ._flavour_async import check_flavour

# The names are those of pgcast._flavour_async.__all__ (tests/test_flavours.py).

K = TypeVar("K")

_logger = logging.getLogger("pgcast")

#: Who runs things, for messages ("another thread is reconnecting").
ACTOR = "thread"

Lock = threading.Lock
Event = threading.Event
StateLock = threading.Lock


class SocketWaiter:
    """Waits for a connection's socket to be readable; :meth:`wake` (from any
    thread) ends a wait."""

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self._lock = threading.Lock()
        self._selecting = False  # a thread is inside select(); see close()
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # select.poll, not a selectors.Selector: it costs the round trip
        # less (benchmarks/bench_latency.py); one fd pair is all it watches.
        self._poll = select.poll()
        self._poll.register(self._wake_r, select.POLLIN)
        self._wake_fd = self._wake_r.fileno()
        # Registered lazily by the waiting thread: a reconnect in another
        # thread only bumps the count.
        self._replaced = 0
        self._registered: tuple[int, int] | None = None

    def fileno(self, pgconn: pq.abc.PGconn) -> int:
        """The descriptor to wait on from outside: *pgconn*'s socket."""
        try:
            return pgconn.socket
        except psycopg.Error as exc:
            raise ConnectionLostError(f"connection to PostgreSQL lost: {exc}") from exc

    def replace(self, pgconn: pq.abc.PGconn) -> None:
        """Wait on *pgconn*'s socket from now on (a reconnect's new connection);
        a thread waiting on the old one is woken, to wait on the new one."""
        self._replaced += 1
        self.wake()

    def wait(self, pgconn: pq.abc.PGconn, timeout: float | None, pending: bool) -> bool:
        """Wait until the socket is readable or :meth:`wake` is called (True),
        or *timeout* seconds passed (False); no wait at all if *pending*."""
        sock = self.fileno(pgconn)
        with self._lock:
            if self._closed:
                return False
            if self._selecting:
                # It was poll()'s own "concurrent poll() invocation".
                raise RuntimeError(
                    "another thread is already receiving from this PubSub (events(), wait(), "
                    "a run_in_thread() runner): one receiver at a time; hand events to your "
                    "threads with a queue.Queue, or open one PubSub per thread")
            self._selecting = True
        try:
            if self._registered != (self._replaced, sock):
                self._register(sock)
            # Events that reached the inbox before _selecting was set woke
            # nobody (see waiting()): hand them out, do not wait.
            wait = 0 if pending else None if timeout is None else timeout * 1000.0
            ready = self._poll.poll(wait)
        finally:
            with self._lock:
                self._selecting = False
                release = self._closed
            if release:
                self._release()
        if release or not ready:
            return False
        for fd, _ in ready:
            if fd == self._wake_fd:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
        return True

    def waiting(self) -> bool:
        """Whether a thread is inside poll() now. Only that thread needs the
        wake byte: a byte nobody waits for costs the next wait a spurious
        wake-up and read, which showed in the ping-pong round trip
        (benchmarks/bench_latency.py)."""
        with self._lock:
            return self._selecting

    def wake(self) -> None:
        """End the current wait, if any (and the next one, if none)."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def close(self) -> None:
        """Release the selector and the socket pair, now or, when a thread is
        waiting, when it leaves select() (woken by :meth:`wake` first)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            selecting = self._selecting
        if not selecting:
            self._release()

    def _register(self, sock: int) -> None:
        if self._registered is not None:
            with contextlib.suppress(KeyError, OSError, ValueError):
                self._poll.unregister(self._registered[1])
        self._poll.register(sock, select.POLLIN)
        self._registered = (self._replaced, sock)

    def _release(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


def acquire(lock: threading.Lock, timeout: float | None) -> bool:
    """Acquire *lock*, waiting at most *timeout* seconds (None: no limit);
    False if that passed first."""
    return lock.acquire(timeout=-1 if timeout is None else timeout)


def readable(fd: int, timeout: float | None) -> None:
    """Wait until *fd* is readable, at most *timeout* seconds."""
    select.select([fd], [], [], timeout)


def sleep_unless(event: threading.Event, seconds: float) -> bool:
    """Sleep *seconds*, or less if *event* is set meanwhile; whether it is.

    In a :func:`start_task` thread, raise :class:`_Cancelled` once
    :func:`gather_cancelled` stopped the thread (what a cancelled asyncio
    task's sleep does)."""
    task = threading.current_thread()
    if type(task) is not _Task:
        return event.wait(seconds)
    # A thread cannot wait on two events: the stop is looked at between slices.
    deadline = time.monotonic() + seconds
    while True:  # ends: the event, the stop, or the deadline
        if task.stop.is_set():
            raise _Cancelled(f"{task.name} was stopped")
        left = deadline - time.monotonic()
        if left <= 0:
            return event.is_set()
        if event.wait(min(left, _STOP_POLL)):
            return True


def wait_flag(flag: threading.Event, timeout: float | None) -> bool:
    """Wait up to *timeout* seconds for *flag*, which any thread may set;
    whether it is set."""
    return flag.wait(timeout)


def current() -> object:
    """The thread running now."""
    return threading.get_ident()


def home() -> object:
    """Where the caller's waits live, for :func:`call_home`: threads wait
    anywhere, so nowhere in particular."""
    return None


def call_home(where: object, call: Callable[[], object]) -> None:
    """Run *call* (a wake-up) now: the sync waiters are woken from any thread."""
    call()


def resolve(result: object) -> None:
    """Finish a callback's *result*: a coroutine is run on a loop of its own."""
    if inspect.iscoroutine(result):
        asyncio.run(result)


class AwaitRunner:
    """Runs the awaitables user handlers return, in order, on one event loop
    started at the first; :meth:`close` closes it."""

    def __init__(self) -> None:
        self._runner: asyncio.Runner | None = None

    def run(self, awaitable: Awaitable[object]) -> None:
        """Run *awaitable* to completion."""
        if self._runner is None:
            self._runner = asyncio.Runner()
        self._runner.run(awaitable)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the event loop, if one was started."""
        if self._runner is not None:
            self._runner.close()


#: How long :func:`gather_cancelled` waits for the threads it stopped, in all.
_CANCEL_TIMEOUT = 5.0
#: How often a :func:`start_task` thread's sleep looks at its stop.
_STOP_POLL = 0.05


class _Cancelled(BaseException):
    """asyncio's CancelledError for a :func:`start_task` thread: raised by its
    :func:`sleep_unless` once stopped; the thread ends quietly with it."""


class _Task(threading.Thread):
    """A :func:`start_task` thread: kept in *tracked* until it ends; set
    :attr:`stop` to end it at its next :func:`sleep_unless`."""

    def __init__(self, target: Callable[[], None], name: str, tracked: set[Any]) -> None:
        super().__init__(name=name, daemon=True)
        self.stop = threading.Event()
        self._work = target
        self._tracked = tracked

    def run(self) -> None:
        try:
            self._work()
        except _Cancelled:
            pass
        finally:
            self._tracked.discard(self)


def start_task(target: Callable[[], None], name: str, tracked: set[Any]) -> _Task:
    """Run ``target()`` in the background: a daemon thread, kept in *tracked*
    until it ends (to stop with its owner: :func:`gather_cancelled`)."""
    task = _Task(target, name, tracked)
    tracked.add(task)  # before it starts: it removes itself when done
    task.start()
    return task


def cancel(task: _Task) -> None:
    """Stop one :func:`start_task` thread at its next sleep, without waiting."""
    task.stop.set()


def check_connection(conn: object, sync_name: str, async_name: str) -> None:
    """Raise TypeError unless *conn* is a sync ``psycopg.Connection``; for an
    asyncio one, name the asyncio API (*async_name*) to use instead of *sync_name*."""
    check_flavour(conn, psycopg.Connection, (sync_name, async_name))


def _release(selector: selectors.BaseSelector, rfd: int, wfd: int) -> None:
    selector.close()
    os.close(rfd)
    os.close(wfd)


class SocketsWaiter(Generic[K]):
    """Waits for many sockets at once (a NotificationManager's): one
    ``selectors.DefaultSelector`` (epoll on Linux), each socket registered
    once, and a pipe that :meth:`wake` (any thread) writes to. A pipe rather
    than a socketpair: plain descriptors, so a waiter dropped without
    :meth:`close` is cleaned up by its finalizer silently."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # no write to the pipe once closed
        self._closed = False
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self._rfd, self._wfd = rfd, wfd
        self._selector = selectors.DefaultSelector()
        self._selector.register(rfd, selectors.EVENT_READ, None)
        self._finalizer = weakref.finalize(self, _release, self._selector, rfd, wfd)
        self._fds: dict[K, int] = {}

    def add(self, fd: int, key: K) -> list[K]:
        """Watch *fd* for *key*; returns the keys whose registration it
        displaced: a descriptor number still registered for a socket that was
        closed, and that the system reused."""
        stale: list[K] = []
        try:
            self._selector.register(fd, selectors.EVENT_READ, key)
        except KeyError:
            old: K = self._selector.get_key(fd).data
            self.remove(old)
            stale.append(old)
            self._selector.register(fd, selectors.EVENT_READ, key)
        self._fds[key] = fd
        return stale

    def remove(self, key: K) -> None:
        """Stop watching *key*'s descriptor."""
        fd = self._fds.pop(key, None)
        if fd is not None:
            found = self._selector.get_map().get(fd)
            if found is not None and found.data is key:
                # EpollSelector ignores the error of a descriptor already closed.
                self._selector.unregister(fd)

    def closing(self, key: K) -> None:
        """*key*'s descriptor is about to be closed: nothing to do (epoll
        forgets a closed descriptor by itself)."""

    def wait(self, timeout: float | None) -> tuple[list[K], list[tuple[K, Exception]]]:
        """Wait up to *timeout* seconds for a socket or :meth:`wake`; return
        the keys ready (and, as the asyncio one, those that failed: none)."""
        ready: list[K] = []
        for found, _ in self._selector.select(timeout):
            if found.data is None:
                with contextlib.suppress(OSError):
                    os.read(self._rfd, 4096)
            else:
                ready.append(found.data)
        return ready, []

    def wake(self) -> None:
        """End the current wait, if any (and the next one, if none)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                    os.write(self._wfd, b"\0")

    def close(self) -> None:
        """Stop watching every descriptor and release the selector."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for key in list(self._fds):
            self.remove(key)
        self._finalizer()


def gather_cancelled(tasks: Iterable[_Task]) -> None:
    """Stop the :func:`start_task` threads *tasks* (background work that ends
    with its owner) and wait for them, at most ``_CANCEL_TIMEOUT`` seconds in
    all. A thread stops at its next :func:`sleep_unless`; one busy with work
    that cannot be interrupted (a connection attempt) still running then is
    left to end by itself at its next sleep, and a warning names it."""
    me = threading.current_thread()
    pending = [task for task in list(tasks) if task is not me]
    for task in pending:
        task.stop.set()
    deadline = time.monotonic() + _CANCEL_TIMEOUT
    for task in pending:
        join(task, max(0.0, deadline - time.monotonic()))
    left = [task.name for task in pending if task.is_alive()]
    if left:
        _logger.warning(
            "pgcast: %d thread(s) %s did not stop within %.0f s (busy with a "
            "connection attempt?); they end when it does", len(left), left, _CANCEL_TIMEOUT,
        )


class Signal:
    """Wakes every thread waiting for a change of shared state: a
    :class:`threading.Condition` on *lock*, waited on with it held."""

    def __init__(self, lock: threading.Lock) -> None:
        self._condition = threading.Condition(lock)

    def set(self) -> None:
        """Wake whoever waits now (call with the lock held)."""
        self._condition.notify_all()

    def wait(self, timeout: float) -> None:
        """Wait for :meth:`set`, at most *timeout* seconds (lock held)."""
        self._condition.wait(timeout)


def start_worker(target: Callable[[], None], name: str) -> threading.Thread:
    """Run ``target()`` in the background until it returns: a daemon thread."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def join(worker: threading.Thread, timeout: float | None) -> bool:
    """Wait up to *timeout* seconds for *worker* to end; False if it has not."""
    if threading.current_thread() is not worker:
        deadline = None if timeout is None else time.monotonic() + timeout
        while worker.is_alive():  # in slices, so Ctrl-C works
            remaining = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if remaining <= 0:
                break
            worker.join(remaining)
    return not worker.is_alive()


def future_factory() -> Callable[[], concurrent.futures.Future[None]]:
    """What makes the handles a publisher returns: concurrent futures."""
    return concurrent.futures.Future
