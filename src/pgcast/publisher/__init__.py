"""Coalescing publishers: many threads' (or tasks') notifications, few transactions.

Every notifying transaction takes PostgreSQL's global notify lock while it
commits, so many writers that each NOTIFY inside their own transaction commit
one at a time. A :class:`Publisher` (threads) or :class:`AsyncPublisher`
(asyncio tasks) takes that off the writers: they commit their data without
NOTIFY and hand the notification over; a background sender sends whatever has
gathered in one transaction (``notify_many``) every ``interval`` seconds.

The contract:

* **Not atomic with your data.** The notification travels in the publisher's
  own transaction, after yours. Publish after your commit: a notification for a
  transaction that then rolls back is still sent, and a failed send leaves your
  data committed without its notification (reported, see below). Use
  :func:`pgcast.notify` inside the transaction when you need both or neither.
* **Coalescing.** Identical ``(channel, payload)`` pairs that end up in one
  batch arrive once: PostgreSQL folds duplicates within a transaction.
* **Order.** Batches are sent one at a time in the order they were filled, so
  one thread's notifications arrive in the order it published them.
* **Checked at once.** :meth:`~Publisher.publish` validates the channel and
  payload in the caller and raises there (nothing queued), like
  :meth:`pgcast.PubSub.notify`.
* **Bounded.** At most ``max_pending`` notifications wait unsent. When full,
  ``publish()`` waits up to its ``timeout`` (the publisher's, 5 s by default)
  for room, then raises :class:`PublisherFullError`; ``timeout=0`` raises at
  once, ``None`` waits as long as it takes.
* **Errors reach the caller.** ``publish()`` returns the handle of the
  transaction the notification will travel in (a ``concurrent.futures.Future``
  or an ``asyncio.Future``): it resolves to ``None`` at commit, or fails with
  :class:`PublishError`. Independently, :meth:`~Publisher.flush` and
  :meth:`~Publisher.close` raise a :class:`PublishError` for every failure since
  the previous flush, whose ``messages`` are all the unsent notifications, so
  ignoring the handles loses nothing. A failed batch is not retried (its
  commit may have succeeded with the answer lost; a retry could send it twice);
  the next batch reconnects if the connection broke.

The queue and its deadlines live in :mod:`pgcast.publisher._batcher`; this module only
waits, sends and resolves handles.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Final, Generic, TypeVar

import psycopg

from .._closing import AsyncClosing, Closing
from .._core import check_timeout, connect_args, wrap_error
from .._errors import ClosedError, ConnectError, PublisherFullError
from .._notify_many import notify_many_params
from .._payload import Payload
from ._batcher import Batch, Batcher, check_message

__all__ = ["AsyncPublisher", "Publisher"]

logger = logging.getLogger("pgcast")

#: Defaults shared by both publishers.
INTERVAL: Final = 0.005
MAX_BATCH: Final = 1000
MAX_PENDING: Final = 100_000
TIMEOUT: Final = 5.0

# publish(timeout=...) not given: use the publisher's own.
_DEFAULT: Final[Any] = object()
# Waits without a deadline still wake this often, so a close() is noticed.
_SLICE = 1.0


def _full(batcher: Batcher[Any], waited: float) -> PublisherFullError:
    return PublisherFullError(batcher.max_pending, waited)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float:
    return _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())


def _usable(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any] | None) -> bool:
    return conn is not None and not conn.closed and not conn.broken


def _unsent(timeout: float | None) -> TimeoutError:
    return TimeoutError(f"the Publisher did not send its queue within {timeout} s")


def _send_failure(exc: Exception) -> BaseException:
    """What a batch whose send raised *exc* fails with: a pgcast error for a
    database error; anything else (a bug) as it is, so the batch is still
    reported through its handle and flush() instead of vanishing."""
    if isinstance(exc, psycopg.Error):
        error = wrap_error(exc)
        error.__cause__ = exc
        return error
    return exc


H = TypeVar("H", concurrent.futures.Future[None], asyncio.Future[None])


class _PublisherBase(Generic[H]):
    """What both publishers share to the letter: state, checks, the close flag,
    the sender's reports. A driver sets ``_guard`` (its lock, or a null
    context) and ``_progressed`` (wakes whoever waits for the sender; called
    under the guard)."""

    _NAME: ClassVar[str]
    _batcher: Batcher[H]
    _closed: bool
    _crash: BaseException | None
    _guard: contextlib.AbstractContextManager[Any]
    _progressed: Callable[[], None]

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def pending(self) -> int:
        """Notifications queued and not yet handed to a transaction."""
        return self._batcher.pending

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pending={self._batcher.pending}"
        return f"<pgcast.{self._NAME} {state}>"

    def _check_open(self) -> None:
        if self._crash is not None:
            raise ClosedError(f"the Publisher's sender failed: {self._crash!r}")
        if self._closed:
            raise ClosedError("this Publisher is closed")

    def _start_closing(self) -> bool:
        """Mark the publisher closed; True the first time (wake the sender)."""
        if self._closed:
            return False
        self._closed = True
        self._batcher.closing = True
        return True

    def _complete(self, batch: Batch[H], cause: BaseException | None) -> None:
        """The sender's report on *batch* (*cause*: why it failed): its handle
        is resolved outside the guard (its callbacks run), then it is finished."""
        with self._guard:
            error = self._batcher.outcome(batch, cause)
        _resolve(batch, error)
        with self._guard:
            self._batcher.finish(batch)
            self._progressed()

    def _crashed(self, exc: BaseException) -> None:
        """The sender died of *exc*: fail what is queued, and make publish() say
        why. A flush that sees the crash also sees the failures."""
        with self._guard:
            self._crash = exc
            failed = self._batcher.fail_queued(exc)
        for batch, error in failed:
            _resolve(batch, error)
        with self._guard:
            for batch, _ in failed:
                self._batcher.finish(batch)
            self._progressed()


class Publisher(_PublisherBase[concurrent.futures.Future[None]], Closing):
    """Send notifications from many threads in few transactions (see the module).

    ``Publisher(conninfo, **kwargs)`` connects at once (raising
    :class:`ConnectError` if it cannot) with the arguments
    :func:`pgcast.connect` takes, and starts the sender thread. Use it as a
    context manager or call :meth:`close`.

    :param interval: how long a batch may gather after its first message, in
        seconds.
    :param max_batch: the most notifications sent in one transaction.
    :param max_pending: the most notifications waiting unsent.
    :param timeout: how long :meth:`publish` waits for room by default.
    """

    _NAME: ClassVar[str] = "Publisher"

    def __init__(
        self,
        conninfo: str = "",
        *,
        interval: float = INTERVAL,
        max_batch: int = MAX_BATCH,
        max_pending: int = MAX_PENDING,
        timeout: float | None = TIMEOUT,
        **kwargs: Any,
    ) -> None:
        self._batcher: Batcher[concurrent.futures.Future[None]] = Batcher(
            concurrent.futures.Future,
            interval=interval,
            max_batch=max_batch,
            max_pending=max_pending,
        )
        self._timeout = check_timeout("timeout", timeout)
        self._conninfo, self._options = connect_args(conninfo, kwargs)
        self._conn: psycopg.Connection[Any] | None = self._connect()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the sender waits on it
        self._progress = threading.Condition(self._lock)  # publishers and flushes do
        self._guard = self._lock
        self._progressed = self._progress.notify_all
        self._closed = False
        self._crash: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pgcast-publisher", daemon=True)
        self._thread.start()

    def publish(
        self, channel: str, payload: Payload = "", *, timeout: float | None = _DEFAULT
    ) -> concurrent.futures.Future[None]:
        """Queue a notification; return the future of the transaction carrying it.

        Thread safe. Dicts and lists are sent as JSON.

        :raises InvalidChannelError: bad channel name; nothing was queued.
        :raises PayloadError: a payload NOTIFY cannot carry; nothing was queued.
        :raises PublisherFullError: ``max_pending`` notifications were waiting
            and no room came free within *timeout* seconds.
        :raises ClosedError: the publisher is closed (or its sender failed).
        """
        channel, text = check_message(channel, payload)
        batcher = self._batcher
        with self._lock:
            self._check_open()
            if not batcher.has_room():
                self._wait_for_room(self._timeout if timeout is _DEFAULT else timeout)
            batch, wake = batcher.add(channel, text, time.monotonic())
            if wake:
                self._work.notify()
            return batch.handle

    def flush(self, timeout: float | None = None) -> None:
        """Send everything published so far now, and wait until it is sent.

        :raises PublishError: a transaction failed since the previous flush
            (its ``messages`` are every notification not sent).
        :raises TimeoutError: not all sent within *timeout* seconds.
        """
        deadline = _deadline(check_timeout("timeout", timeout))
        with self._lock:
            mark = self._batcher.flush_mark()
            self._work.notify()
            self._wait_completed(mark, deadline, timeout)
            failure = self._batcher.take_failure()
        if failure is not None:
            raise failure

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued, stop the sender and close the connection.

        Idempotent; later :meth:`publish` calls raise :class:`ClosedError`.

        :raises PublishError: as :meth:`flush`.
        :raises TimeoutError: the sender did not finish within *timeout* s;
            the publisher is closed, unsent notifications are then lost.
        """
        deadline = _deadline(check_timeout("timeout", timeout))
        with self._lock:
            if self._start_closing():
                self._work.notify()
                self._progress.notify_all()
        while self._thread.is_alive():
            self._thread.join(_remaining(deadline))
            if deadline is not None and time.monotonic() >= deadline:
                break
        alive = self._thread.is_alive()
        if not alive and self._conn is not None:
            self._conn.close()
        if alive:
            raise _unsent(timeout)
        with self._lock:
            failure = self._batcher.take_failure()
        if failure is not None:
            raise failure

    # -- under the lock --------------------------------------------------------

    def _wait_for_room(self, timeout: float | None) -> None:
        batcher = self._batcher
        start = time.monotonic()
        deadline = _deadline(timeout)
        while not batcher.has_room():
            remaining = _remaining(deadline)
            if remaining <= 0:
                raise _full(batcher, time.monotonic() - start)
            self._progress.wait(remaining)
            self._check_open()

    def _wait_completed(self, mark: int, deadline: float | None, timeout: float | None) -> None:
        while self._batcher.completed < mark and self._crash is None:
            remaining = _remaining(deadline)
            if remaining <= 0:
                raise _unsent(timeout)
            self._progress.wait(remaining)

    # -- the sender thread ---------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.Connection.connect(self._conninfo, **self._options)
        except psycopg.Error as exc:
            raise ConnectError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc

    def _run(self) -> None:
        batcher = self._batcher
        try:
            while True:
                with self._lock:
                    while wait := batcher.wait_time(time.monotonic(), _SLICE):
                        self._work.wait(wait)
                    if wait is None:
                        return
                    batch = batcher.take()
                    self._progress.notify_all()  # room came free
                self._complete(batch, self._send(batch))
        except BaseException as exc:
            # Never die silently: fail what is queued and make publish() say why.
            logger.exception("pgcast Publisher sender failed")
            self._crashed(exc)
            raise

    def _send(self, batch: Batch[Any]) -> BaseException | None:
        try:
            if not _usable(self._conn):
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                self._conn = self._connect()
            assert self._conn is not None
            self._conn.execute(*notify_many_params(batch.channels, batch.payloads))
        except Exception as exc:
            return _send_failure(exc)
        return None


def _resolve(batch: Batch[Any], error: BaseException | None) -> None:
    handle = batch.handle
    if error is None:
        handle.set_result(None)
    else:
        handle.set_exception(error)
        if isinstance(handle, asyncio.Future):
            # flush() and close() report every failure, so a handle nobody
            # awaited is no lost error; spare asyncio's "never retrieved" log.
            handle.exception()


class AsyncPublisher(_PublisherBase[asyncio.Future[None]], AsyncClosing):
    """The asyncio twin of :class:`Publisher`, for many tasks of one event loop.

    Create it with ``await AsyncPublisher.connect(conninfo, **kwargs)`` (same
    options as :class:`Publisher`); use ``async with`` or ``await close()``.
    """

    _NAME: ClassVar[str] = "AsyncPublisher"

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        conninfo: str,
        options: dict[str, Any],
        batcher: Batcher[asyncio.Future[None]],
        timeout: float | None,
    ) -> None:
        """Use :meth:`connect`."""
        self._conn: psycopg.AsyncConnection[Any] | None = conn
        self._conninfo = conninfo
        self._options = options
        self._batcher = batcher
        self._timeout = timeout
        self._closed = False
        self._crash: BaseException | None = None
        self._kick = asyncio.Event()  # the sender waits on it
        self._progress = asyncio.Event()  # replaced each time it is set
        self._guard = contextlib.nullcontext()  # one event loop: nothing to lock
        self._progressed = self._signal
        self._task = asyncio.get_running_loop().create_task(self._run())

    @classmethod
    async def connect(
        cls,
        conninfo: str = "",
        *,
        interval: float = INTERVAL,
        max_batch: int = MAX_BATCH,
        max_pending: int = MAX_PENDING,
        timeout: float | None = TIMEOUT,
        **kwargs: Any,
    ) -> AsyncPublisher:
        """Connect and start the sender task; see :class:`Publisher` for the options.

        :raises ConnectError: the server could not be reached or refused.
        """
        loop = asyncio.get_running_loop()
        batcher: Batcher[asyncio.Future[None]] = Batcher(
            loop.create_future, interval=interval, max_batch=max_batch, max_pending=max_pending
        )
        timeout = check_timeout("timeout", timeout)
        conninfo, options = connect_args(conninfo, kwargs)
        conn = await _aconnect(conninfo, options)
        return cls(conn, conninfo, options, batcher, timeout)

    async def publish(
        self, channel: str, payload: Payload = "", *, timeout: float | None = _DEFAULT
    ) -> asyncio.Future[None]:
        """Queue a notification; return the future of the transaction carrying it.

        Awaits only when the buffer is full; see :meth:`Publisher.publish`.
        """
        channel, text = check_message(channel, payload)
        batcher = self._batcher
        self._check_open()
        if not batcher.has_room():
            await self._wait_for_room(self._timeout if timeout is _DEFAULT else timeout)
        batch, wake = batcher.add(channel, text, time.monotonic())
        if wake:
            self._kick.set()
        return batch.handle

    async def flush(self, timeout: float | None = None) -> None:
        """Send everything published so far now and wait; see :meth:`Publisher.flush`."""
        deadline = _deadline(check_timeout("timeout", timeout))
        mark = self._batcher.flush_mark()
        self._kick.set()
        while self._batcher.completed < mark and self._crash is None:
            if not await self._wait_progress(deadline):
                raise _unsent(timeout)
        failure = self._batcher.take_failure()
        if failure is not None:
            raise failure

    async def close(self, timeout: float | None = None) -> None:
        """Send what is queued, stop the sender, close; see :meth:`Publisher.close`."""
        if self._start_closing():
            self._kick.set()
            self._signal()
        try:
            async with asyncio.timeout(check_timeout("timeout", timeout)):
                await asyncio.shield(self._task)
        except TimeoutError:
            raise _unsent(timeout) from None
        except Exception:
            pass  # the crash was logged; its failures are reported below
        if self._conn is not None:
            await self._conn.close()
        failure = self._batcher.take_failure()
        if failure is not None:
            raise failure

    def _signal(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def _wait_progress(self, deadline: float | None) -> bool:
        """Wait for the sender to make progress; False once *deadline* passed."""
        remaining = _remaining(deadline)
        if remaining <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await self._progress.wait()
        return True

    async def _wait_for_room(self, timeout: float | None) -> None:
        start = time.monotonic()
        deadline = _deadline(timeout)
        while not self._batcher.has_room():
            if not await self._wait_progress(deadline):
                raise _full(self._batcher, time.monotonic() - start)
            self._check_open()

    async def _run(self) -> None:
        batcher = self._batcher
        kick = self._kick
        try:
            while True:
                wait = batcher.wait_time(time.monotonic(), _SLICE)
                if wait is None:
                    return
                if wait > 0:
                    kick.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await kick.wait()
                    continue
                batch = batcher.take()
                self._signal()  # room came free
                self._complete(batch, await self._send(batch))
        except Exception as exc:
            logger.exception("pgcast AsyncPublisher sender failed")
            self._crashed(exc)
            raise

    async def _send(self, batch: Batch[Any]) -> BaseException | None:
        try:
            conn = self._conn
            if conn is None or not _usable(conn):
                if conn is not None:
                    await conn.close()
                self._conn = None
                self._conn = conn = await _aconnect(self._conninfo, self._options)
            await conn.execute(*notify_many_params(batch.channels, batch.payloads))
        except Exception as exc:
            return _send_failure(exc)
        return None


async def _aconnect(conninfo: str, options: dict[str, Any]) -> psycopg.AsyncConnection[Any]:
    try:
        return await psycopg.AsyncConnection.connect(conninfo, **options)
    except psycopg.Error as exc:
        raise ConnectError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc
