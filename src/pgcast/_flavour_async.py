"""What the asyncio drivers do differently from the sync ones, and nothing else.

The drivers are written once, as asyncio code (``*_async.py``), and their
sync twins generated from them by ``tools/async_to_sync.py``, which drops
``async``/``await`` and imports :mod:`pgcast._flavour` where this module is
imported. So every name here has a sync namesake there, with the same
meaning; only what cannot be written the same way in both lives here:

* :class:`SocketsWaiter`: a NotificationManager's waiting on many sockets.
* :class:`SocketWaiter`: waiting for a connection's socket while other tasks
  (threads, in the sync flavour) may wake the waiter. Here the event loop's
  reader on a duplicate of the socket, so that it never competes with
  psycopg's own reader on the original descriptor while a query runs.
* :func:`acquire`: a lock acquired with a timeout.
* :func:`readable`: wait for a descriptor, without a waiter to wake.
* :func:`sleep_unless`: sleep, ending early when an event is set.
* :func:`wait_flag`: wait for a flag any thread may set (a Worker's stop).
* :func:`current`: who is running (a task here, a thread there).
* :func:`home` and :func:`call_home`: run a call where the waiter it wakes
  lives, from any thread (the event loop's thread here, through
  ``call_soon_threadsafe``; at once there).
* :class:`StateLock`: guards counters that threads share; an asyncio program
  has one thread, so here it does nothing.
* :func:`resolve` and :class:`AwaitRunner`: a callback's result that may be
  awaitable (awaited here; run to completion on an event loop of its own there).
* :func:`start_task` / :func:`gather_cancelled`, :func:`start_worker` /
  :func:`join`: background work (a task here, a thread there), cancelled
  with its owner or waited for.
* :class:`Signal` and :func:`future_factory`: a publisher's wake-ups and the
  handles it returns (asyncio or concurrent futures).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import pq

__all__ = [
    "ACTOR",
    "AwaitRunner",
    "Event",
    "Lock",
    "Signal",
    "SocketWaiter",
    "SocketsWaiter",
    "StateLock",
    "acquire",
    "call_home",
    "cancel",
    "check_connection",
    "check_flavour",
    "current",
    "future_factory",
    "gather_cancelled",
    "home",
    "join",
    "readable",
    "resolve",
    "sleep_unless",
    "start_task",
    "start_worker",
    "wait_flag",
]

K = TypeVar("K")

#: Who runs things, for messages ("another task is reconnecting").
ACTOR = "task"

Lock = asyncio.Lock
Event = asyncio.Event


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


class SocketWaiter:
    """Waits for a connection's socket to be readable; :meth:`wake` ends a wait.

    It waits on its own duplicate of the socket (the loop keys readers by
    descriptor, and psycopg adds its reader to the original one while a query
    runs), so it owns a descriptor until :meth:`close`.
    """

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self._fd = os.dup(pgconn.socket)
        self._future: asyncio.Future[bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_fd = -1
        self._closed = False

    def fileno(self, pgconn: pq.abc.PGconn) -> int:
        """The descriptor to wait on from outside (a duplicate of *pgconn*'s)."""
        return self._fd

    def replace(self, pgconn: pq.abc.PGconn) -> None:
        """Wait on *pgconn*'s socket from now on (a reconnect's new connection);
        a task waiting on the old one is woken, to wait on the new one."""
        self.wake()
        self._unhook()
        old = self._fd
        self._fd = os.dup(pgconn.socket)
        os.close(old)

    async def wait(self, pgconn: pq.abc.PGconn, timeout: float | None, pending: bool) -> bool:
        """Wait until the socket is readable or :meth:`wake` is called (True),
        or *timeout* seconds passed (False); no wait at all if *pending*."""
        if self._closed:
            return False
        loop = asyncio.get_running_loop()
        fut = self._future = loop.create_future()
        self._reader_fd = self._fd
        loop.add_reader(self._reader_fd, _resolve, fut, True)
        self._loop = loop
        if pending:
            timeout = 0
        timer = None if timeout is None else loop.call_later(timeout, _resolve, fut, False)
        try:
            ready: bool = await fut
        finally:
            self._future = None
            if timer is not None:
                timer.cancel()
            self._unhook()
        return ready

    def waiting(self) -> bool:
        """Whether a task waits now (only then does :meth:`wake` matter)."""
        return self._future is not None

    def wake(self) -> None:
        """End the current wait, if any."""
        if self._future is not None:
            _resolve(self._future, True)

    def close(self) -> None:
        """Wake the waiter and release the descriptor."""
        if self._closed:
            return
        self._closed = True
        self.wake()
        self._unhook()
        os.close(self._fd)

    def _unhook(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._reader_fd)
            self._loop = None


async def acquire(lock: asyncio.Lock, timeout: float | None) -> bool:
    """Acquire *lock*, waiting at most *timeout* seconds (None: no limit);
    False if that passed first."""
    if timeout is None:
        await lock.acquire()
        return True
    try:
        # asyncio.timeout, not wait_for: wait_for makes a task per call,
        # which cost the receive path about a fifth of its rate.
        async with asyncio.timeout(timeout):
            await lock.acquire()
    except TimeoutError:
        return False
    return True


async def readable(fd: int, timeout: float | None) -> None:
    """Wait until *fd* is readable, at most *timeout* seconds."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bool] = loop.create_future()
    loop.add_reader(fd, _resolve, fut, True)
    timer = None if timeout is None else loop.call_later(timeout, _resolve, fut, False)
    try:
        await fut
    finally:
        if timer is not None:
            timer.cancel()
        loop.remove_reader(fd)


async def sleep_unless(event: asyncio.Event, seconds: float) -> bool:
    """Sleep *seconds*, or less if *event* is set meanwhile; whether it is."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


#: How often :func:`wait_flag` looks at its flag.
FLAG_POLL = 0.02


async def wait_flag(flag: threading.Event, timeout: float | None) -> bool:
    """Wait up to *timeout* seconds (None: forever) for *flag*, which any
    thread may set (so not an asyncio.Event, which only its loop's tasks
    may); whether it is set. It is looked at every ``FLAG_POLL`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not flag.is_set():  # ends: the flag, or the deadline
        left = FLAG_POLL if deadline is None else deadline - time.monotonic()
        if left <= 0:
            await asyncio.sleep(0)  # even a zero wait gives the loop a turn
            return flag.is_set()
        await asyncio.sleep(min(left, FLAG_POLL))
    return True


def current() -> object:
    """The task running now."""
    return asyncio.current_task()


def home() -> asyncio.AbstractEventLoop:
    """Where the caller's waits live, for :func:`call_home`: the running loop."""
    return asyncio.get_running_loop()


def call_home(where: asyncio.AbstractEventLoop | None, call: Callable[[], object]) -> None:
    """Run *call* (a wake-up) on the event loop *where*, from any thread: at
    once in the loop's own thread, else through ``call_soon_threadsafe``
    (completing a loop's future from another thread is not thread safe: it
    may not wake the loop, and in debug mode it raises, the wake-up lost).
    *where* None: no loop known, *call* runs at once; a loop closed
    meanwhile: nothing waits there any more, nothing to do."""
    if where is None:
        call()
        return
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is where:
        call()
        return
    with contextlib.suppress(RuntimeError):  # closed meanwhile: nobody to wake
        where.call_soon_threadsafe(call)


#: A lock for state that threads share; an asyncio program has one thread,
#: so this one holds nothing (the sync flavour's is a threading.Lock).
StateLock = contextlib.nullcontext


async def resolve(result: object) -> None:
    """Finish a callback's *result*: awaited when it is awaitable."""
    if inspect.isawaitable(result):
        await result


class AwaitRunner:
    """Runs the awaitables user handlers return, in order (here: awaits
    them); :meth:`close` when done."""

    async def run(self, awaitable: Awaitable[object]) -> None:
        """Run *awaitable* to completion."""
        await awaitable

    def close(self) -> None:
        """Release what it holds (nothing here)."""


def start_task(
    target: Callable[[], Coroutine[Any, Any, None]], name: str, tracked: set[Any]
) -> asyncio.Task[None]:
    """Run ``target()`` in the background: a task of the running loop, kept
    in *tracked* until it ends (to cancel with its owner: :func:`gather_cancelled`)."""
    task = asyncio.get_running_loop().create_task(target(), name=name)
    tracked.add(task)
    task.add_done_callback(tracked.discard)
    return task


def cancel(task: asyncio.Task[None]) -> None:
    """Cancel one :func:`start_task` task, without waiting for it."""
    task.cancel()


def check_connection(conn: object, sync_name: str, async_name: str) -> None:
    """Raise TypeError unless *conn* is a ``psycopg.AsyncConnection``; for a
    sync one, name the sync API (*sync_name*) to use instead of *async_name*."""
    check_flavour(conn, psycopg.AsyncConnection, (async_name, sync_name))


def check_flavour(conn: object, want: type, names: tuple[str, str]) -> None:
    """Both flavours' :func:`check_connection`: *conn* must be a *want*;
    *names* are the API called and the one that takes the other flavour."""
    if isinstance(conn, want):
        return
    called, other = names
    kind = "psycopg.AsyncConnection" if want is psycopg.AsyncConnection else "psycopg.Connection"
    if isinstance(conn, psycopg.Connection | psycopg.AsyncConnection):
        raise TypeError(
            f"{called} takes a {kind}, and this is a {type(conn).__name__} of the other "
            f"flavour (sync or asyncio): use {other} with it"
        )
    raise TypeError(f"{called} takes a {kind}, not {type(conn).__name__}")
class SocketsWaiter(Generic[K]):
    """Waits for many sockets at once (a NotificationManager's): each
    descriptor gets one reader on the loop, added once. A reader that fires
    marks its key ready and is paused until the next :meth:`wait`, so the
    loop never spins on a socket nobody has got round to reading, and a
    wake-up costs the same whatever the number of idle sockets.

    It belongs to the event loop it first waits in.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: dict[K, int] = {}
        self._paused: set[K] = set()
        self._ready: list[K] = []
        self._future: asyncio.Future[bool] | None = None

    def add(self, fd: int, key: K) -> list[K]:
        """Watch *fd* for *key*; returns the keys whose registration it
        displaced (none here: the loop replaces a reader of the same fd)."""
        self._get_loop().add_reader(fd, self._readable, key)
        self._fds[key] = fd
        return []

    def remove(self, key: K) -> None:
        """Stop watching *key*'s descriptor."""
        fd = self._fds.pop(key, None)
        if fd is not None and key not in self._paused and self._loop is not None:
            self._loop.remove_reader(fd)
        self._paused.discard(key)

    def closing(self, key: K) -> None:
        """*key*'s descriptor is about to be closed: its reader leaves the
        loop now, not when the manager next waits."""
        self._pause(key)

    async def wait(self, timeout: float | None) -> tuple[list[K], list[tuple[K, Exception]]]:
        """Wait up to *timeout* seconds for a socket or :meth:`wake`; return
        the keys ready, and those whose descriptor failed (closed) with why."""
        loop = self._get_loop()
        failed: list[tuple[K, Exception]] = []
        # Every paused key has been read since (or left): watch it again.
        for key in list(self._paused):
            self._paused.discard(key)
            fd = self._fds.get(key)
            if fd is None:
                continue
            try:
                loop.add_reader(fd, self._readable, key)
            except Exception as exc:  # its descriptor was closed
                self._paused.add(key)
                failed.append((key, exc))
        if not failed and not self._ready:
            fut = self._future = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _resolve, fut, False)
            try:
                await fut
            finally:
                self._future = None
                if timer is not None:
                    timer.cancel()
        ready, self._ready = self._ready, []
        return ready, failed

    def wake(self) -> None:
        """End the current wait, if any."""
        if self._future is not None:
            _resolve(self._future, True)

    def close(self) -> None:
        """Stop watching every descriptor."""
        for key in list(self._fds):
            self.remove(key)
        self.wake()

    def _readable(self, key: K) -> None:
        self._ready.append(key)
        self._pause(key)
        self.wake()

    def _pause(self, key: K) -> None:
        fd = self._fds.get(key)
        if fd is not None and key not in self._paused and self._loop is not None:
            self._loop.remove_reader(fd)
            self._paused.add(key)

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this NotificationManager belongs to another event loop")
        return loop


async def gather_cancelled(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel *tasks* (background work that ends with its owner) and wait for them."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class Signal:
    """Wakes every task waiting for a change of shared state (a
    :class:`threading.Condition` in the sync flavour, used under *lock*;
    here *lock* is the null :class:`StateLock`, as one loop needs none)."""

    def __init__(self, lock: object) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        """Wake whoever waits now."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Wait for :meth:`set`, at most *timeout* seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()


def start_worker(target: Callable[[], Coroutine[Any, Any, None]], name: str) -> asyncio.Task[None]:
    """Run ``target()`` in the background until it returns: a task."""
    return asyncio.get_running_loop().create_task(target(), name=name)


async def join(worker: asyncio.Task[None], timeout: float | None) -> bool:
    """Wait up to *timeout* seconds for *worker* to end (whatever it raised,
    which it reported itself); False if it has not."""
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(worker)
    except TimeoutError:
        return False
    except Exception:
        pass
    return True


def future_factory() -> Callable[[], asyncio.Future[None]]:
    """What makes the handles a publisher returns: futures of the running loop."""
    return asyncio.get_running_loop().create_future
