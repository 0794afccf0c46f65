"""The publisher: many threads' (or tasks') notifications, few transactions.

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
* **Errors reach the caller.** The handle of the transaction the
  notification travels in (a ``concurrent.futures.Future`` or an
  ``asyncio.Future``) resolves to ``None`` at commit, or fails with
  :class:`PublishError`. Independently, :meth:`~Publisher.flush` and
  :meth:`~Publisher.close` raise a :class:`PublishError` for every failure since
  the previous flush, whose ``messages`` are all the unsent notifications, so
  ignoring the handles loses nothing. A failed batch is not retried (its
  commit may have succeeded with the answer lost; a retry could send it twice);
  the next batch reconnects if the connection broke. A connection the server
  ended while the publisher was idle is replaced before a batch is sent on
  it: nothing is lost to it.

The queue and its deadlines live in :mod:`pgcast.publisher._batcher`; this module only
waits, sends and resolves handles. Written for asyncio (``_publisher_async.py``,
:class:`AsyncPublisher`); the sync :class:`Publisher` is generated from it by
``tools/async_to_sync.py``.

In the asyncio flavour ``await publish()`` is one await: it returns once the
transaction carrying the notification committed (or raises
:class:`PublishError`), and lasts at most its ``timeout`` in all, as the sync
call does (past it: ``TimeoutError``, the notification not withdrawn);
``publish_nowait()`` queues without waiting and returns that transaction's
future. The sync ``publish()`` queues (waiting for room only) and returns a
``concurrent.futures.Future``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import select
import time
from typing import Any, Final

import psycopg
from psycopg import pq

from .._closing import AsyncClosing
from .._connect import connect_failed
from .._core import check_timeout, connect_args, wrap_error
from .._errors import ClosedError, ConnectionLostError, PublisherFullError
from .._flavour_async import Signal, StateLock, future_factory, join, start_worker
from .._notify_many import notify_many_params
from .._payload import Payload
from .._reconnect import add_keepalives
from ._batcher import Batch, Batcher, check_message

__all__ = ["AsyncPublisher"]

logger = logging.getLogger("pgcast")

#: Defaults shared by both publishers.
INTERVAL: Final = 0.005
MAX_BATCH: Final = 1000
MAX_PENDING: Final = 100_000
TIMEOUT: Final = 5.0
#: The keepalive settings of the publisher's connection: those of a PubSub's
#: default health check (30 s), so tcp_user_timeout is 60 s.
KEEPALIVE_INTERVAL: Final = 30.0

# publish(timeout=...) not given: use the publisher's own.
_DEFAULT: Final[Any] = object()
# Waits without a deadline still wake this often, so a close() is noticed.
_SLICE = 1.0


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float:
    return _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())


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


def _ended_while_idle(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server ended *conn*, idle since its last batch: its FATAL
    message or EOF waits on the socket (pg_terminate_backend,
    ``idle_session_timeout``, a failover). Nothing of the next batch was sent
    on it, so that batch can go on a new connection without a risk of twice."""
    pgconn = conn.pgconn
    try:
        for _ in range(3):  # the message, then EOF: bounded, a notice may come first
            ready, _, _ = select.select([pgconn.socket], [], [], 0)
            if not ready:
                break
            pgconn.consume_input()  # raises at EOF
            pgconn.is_busy()  # parses what came (a message while idle: a notice)
    except (OSError, psycopg.Error):
        return True
    return pgconn.status != pq.ConnStatus.OK


async def _connect(conninfo: str, options: dict[str, Any]) -> psycopg.AsyncConnection[Any]:
    try:
        return await psycopg.AsyncConnection.connect(conninfo, **options)
    except psycopg.Error as exc:
        raise connect_failed(exc) from exc


def _prepare(
    conninfo: str, kwargs: dict[str, Any], *, interval: float, max_batch: int,
    max_pending: int, timeout: float | None,
) -> tuple[str, dict[str, Any], Batcher[Any], float | None]:
    """The constructor's arguments checked: what to connect with, the queue,
    the default timeout of publish()."""
    batcher: Batcher[Any] = Batcher(
        future_factory(), interval=interval, max_batch=max_batch, max_pending=max_pending
    )
    timeout = check_timeout("timeout", timeout)
    conninfo, options = connect_args(conninfo, kwargs)
    # A batch sent into a dead network fails within a minute (TCP keepalives,
    # tcp_user_timeout), not the kernel's quarter of an hour; the DSN's own win.
    options = add_keepalives(conninfo, options, KEEPALIVE_INTERVAL)
    return conninfo, options, batcher, timeout


class AsyncPublisher(AsyncClosing):
    """Send notifications from many tasks (threads, for the sync one) in few
    transactions (see the module).

    The sync ``Publisher(conninfo, **kwargs)`` connects at once (raising
    :class:`ConnectError` if it cannot) with the arguments
    :func:`pgcast.connect` takes, and starts the sender thread; the asyncio
    one is made with ``await AsyncPublisher.connect(conninfo, **kwargs)``.
    Use it as a context manager or call ``close()``.

    :param interval: how long a batch may gather after its first message, in
        seconds.
    :param max_batch: the most notifications sent in one transaction.
    :param max_pending: the most notifications waiting unsent.
    :param timeout: how long :meth:`publish` waits for room by default.
    """

    if True:  # ASYNC

        def __init__(
            self,
            conn: psycopg.AsyncConnection[Any],
            conninfo: str,
            options: dict[str, Any],
            batcher: Batcher[asyncio.Future[None]],
            timeout: float | None,
        ) -> None:
            """Use :meth:`connect`."""
            self._setup(conn, conninfo, options, batcher, timeout)

        @classmethod
        async def connect(
            cls, conninfo: str = "", *, interval: float = INTERVAL, max_batch: int = MAX_BATCH,
            max_pending: int = MAX_PENDING, timeout: float | None = TIMEOUT, **kwargs: Any,
        ) -> AsyncPublisher:
            """Connect and start the sender task; the options are the
            sync ``Publisher``'s.

            :raises ConnectError: the server could not be reached or refused.
            """
            conninfo, options, batcher, timeout = _prepare(
                conninfo, kwargs, interval=interval, max_batch=max_batch,
                max_pending=max_pending, timeout=timeout,
            )
            return cls(await _connect(conninfo, options), conninfo, options, batcher, timeout)

        async def publish(
            self, channel: str, payload: Payload = "", *, timeout: float | None = _DEFAULT
        ) -> None:
            """Send a notification: queue it (waiting for room when
            ``max_pending`` are unsent) and return once the transaction
            carrying it committed. One await, which lasts at most *timeout*
            seconds in all (the publisher's ``timeout`` when not given;
            ``None``: no limit), as the sync ``publish()`` call does; to
            queue without waiting, see :meth:`publish_nowait`.

            :raises InvalidChannelError: bad channel name; nothing was queued.
            :raises PayloadError: a payload NOTIFY cannot carry; nothing was queued.
            :raises PublisherFullError: no room came free within *timeout* seconds.
            :raises TimeoutError: queued, but its transaction did not commit
                within *timeout* seconds; it is not withdrawn and may still be
                sent (a failure is reported by :meth:`flush` and :meth:`close`).
            :raises PublishError: the transaction carrying it failed.
            :raises ClosedError: the publisher is closed (or its sender failed).
            """
            start = time.monotonic()
            timeout = self._timeout if timeout is _DEFAULT else timeout
            handle = await self._enqueue(channel, payload, timeout)
            left = None if timeout is None else timeout - (time.monotonic() - start)
            # Shielded: the handle is the whole batch's, which a cancelled
            # (or timed out) caller must not cancel for the others.
            scope = asyncio.timeout(left)
            try:
                async with scope:
                    await asyncio.shield(handle)
            except TimeoutError:
                if not scope.expired():
                    raise  # the batch's own error
                raise TimeoutError(
                    f"publish(): the transaction carrying this notification did not "
                    f"commit within {timeout:g} s (timeout; the Publisher's own unless "
                    f"given): it is queued or in flight, not withdrawn, and may still be "
                    f"sent; if its transaction fails, flush() and close() report it"
                ) from None

        def publish_nowait(self, channel: str, payload: Payload = "") -> asyncio.Future[None]:
            """Queue a notification without waiting; return the future of the
            transaction carrying it.

            :raises PublisherFullError: ``max_pending`` notifications are unsent.
            """
            channel, text = check_message(channel, payload)
            self._check_open()
            if not self._batcher.has_room():
                raise PublisherFullError(self._batcher.max_pending, 0.0)
            handle: asyncio.Future[None] = self._add(channel, text)
            return handle

    else:

        def __init__(
            self, conninfo: str = "", *, interval: float = INTERVAL, max_batch: int = MAX_BATCH,
            max_pending: int = MAX_PENDING, timeout: float | None = TIMEOUT, **kwargs: Any,
        ) -> None:
            conninfo, options, batcher, timeout = _prepare(
                conninfo, kwargs, interval=interval, max_batch=max_batch,
                max_pending=max_pending, timeout=timeout,
            )
            self._setup(_connect(conninfo, options), conninfo, options, batcher, timeout)

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
            handle: concurrent.futures.Future[None] = self._enqueue(channel, payload, timeout)
            return handle

    def _setup(
        self,
        conn: psycopg.AsyncConnection[Any],
        conninfo: str,
        options: dict[str, Any],
        batcher: Batcher[Any],
        timeout: float | None,
    ) -> None:
        self._conn: psycopg.AsyncConnection[Any] | None = conn
        self._conninfo = conninfo
        self._options = options
        self._batcher = batcher
        self._timeout = timeout
        self._closed = False
        self._crash: BaseException | None = None
        self._lock = StateLock()
        self._work = Signal(self._lock)  # the sender waits on it
        self._progress = Signal(self._lock)  # publishers and flushes do
        self._sender = start_worker(self._run, "pgcast-publisher")

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    @property
    def pending(self) -> int:
        """Notifications queued and not yet handed to a transaction."""
        return self._batcher.pending

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pending={self._batcher.pending}"
        return f"<pgcast.{type(self).__name__} {state}>"

    async def flush(self, timeout: float | None = None) -> None:
        """Send everything published so far now, and wait until it is sent.

        :raises PublishError: a transaction failed since the previous flush
            (its ``messages`` are every notification not sent).
        :raises TimeoutError: not all sent within *timeout* seconds.
        """
        deadline = _deadline(check_timeout("timeout", timeout))
        with self._lock:
            mark = self._batcher.flush_mark()
            self._work.set()
            while self._batcher.completed < mark and self._crash is None:
                remaining = _remaining(deadline)
                if remaining <= 0:
                    raise _unsent(timeout)
                await self._progress.wait(remaining)
            failure = self._batcher.take_failure()
        if failure is not None:
            raise failure

    async def close(self, timeout: float | None = None) -> None:
        """Send what is queued, stop the sender and close the connection.

        Idempotent; later ``publish()`` calls raise :class:`ClosedError`.

        :raises PublishError: as :meth:`flush`.
        :raises TimeoutError: the sender did not finish within *timeout* s;
            the publisher is closed, and the notifications queued behind the
            batch it is stuck on fail with :class:`PublishError` (their
            handles, and the report of a later ``close()``).
        """
        timeout = check_timeout("timeout", timeout)
        with self._lock:
            if not self._closed:
                self._closed = True
                self._batcher.closing = True
                self._work.set()
                self._progress.set()
        if not await join(self._sender, timeout):
            # The sender is stuck on a batch (whether that one commits is the
            # server's): what it has not taken fails now, no handle waits for ever.
            self._fail_queued(ClosedError(
                f"the Publisher was closed before this was sent: close() gave up "
                f"after {timeout} s, the sender stuck on an earlier batch"))
            raise _unsent(timeout)
        if self._conn is not None:
            await self._conn.close()
        with self._lock:
            failure = self._batcher.take_failure()
        if failure is not None:
            raise failure

    def _check_open(self) -> None:
        if self._crash is not None:
            raise ClosedError(f"the Publisher's sender failed: {self._crash!r}")
        if self._closed:
            raise ClosedError("this Publisher is closed")

    async def _enqueue(self, channel: str, payload: Payload, timeout: float | None) -> Any:
        channel, text = check_message(channel, payload)
        timeout = self._timeout if timeout is _DEFAULT else check_timeout("timeout", timeout)
        batcher = self._batcher
        with self._lock:
            self._check_open()
            if not batcher.has_room():
                start = time.monotonic()
                deadline = _deadline(timeout)
                while not batcher.has_room():
                    remaining = _remaining(deadline)
                    if remaining <= 0:
                        raise PublisherFullError(batcher.max_pending, time.monotonic() - start)
                    await self._progress.wait(remaining)
                    self._check_open()
            return self._add(channel, text)

    def _add(self, channel: str, text: str) -> Any:
        batch, wake = self._batcher.add(channel, text, time.monotonic())
        if wake:
            self._work.set()
        return batch.handle

    # -- the sender ------------------------------------------------------------

    async def _run(self) -> None:
        batcher = self._batcher
        in_flight: Batch[Any] | None = None
        try:
            while True:  # ends: closed and drained
                with self._lock:
                    while wait := batcher.wait_time(time.monotonic(), _SLICE):
                        await self._work.wait(wait)
                    if wait is None:
                        return
                    batch = in_flight = batcher.take()
                    self._progress.set()  # room came free
                outcome = await self._send(batch)
                in_flight = None
                self._complete(batch, outcome)
        except BaseException as exc:
            # Never die silently: fail what is queued and make publish() say why.
            logger.exception("pgcast Publisher sender failed")
            if in_flight is not None:
                # Taken and maybe sent (cancelled, interrupted mid-send): its
                # handle fails too, its fate unknown, instead of pending for ever.
                lost = ConnectionLostError(
                    f"the Publisher's sender ended ({exc!r}) while this transaction was "
                    f"in flight")
                lost.__cause__ = exc
                self._complete(in_flight, lost)
            self._crashed(exc)
            raise

    async def _send(self, batch: Batch[Any]) -> BaseException | None:
        try:
            conn = self._conn
            if conn is None or conn.closed or conn.broken or _ended_while_idle(conn):
                if conn is not None:
                    await conn.close()
                self._conn = None
                self._conn = conn = await _connect(self._conninfo, self._options)
            await conn.execute(*notify_many_params(batch.channels, batch.payloads))
        except Exception as exc:
            return _send_failure(exc)
        return None

    def _complete(self, batch: Batch[Any], cause: BaseException | None) -> None:
        """The sender's report on *batch* (*cause*: why it failed): its handle
        is resolved outside the lock (its callbacks run), then it is finished."""
        with self._lock:
            error = self._batcher.outcome(batch, cause)
        _resolve(batch, error)
        with self._lock:
            self._batcher.finish(batch)
            self._progress.set()

    def _crashed(self, exc: BaseException) -> None:
        """The sender died of *exc*: fail what is queued, and make publish() say
        why. A flush that sees the crash also sees the failures."""
        with self._lock:
            self._crash = exc
        self._fail_queued(exc)

    def _fail_queued(self, exc: BaseException) -> None:
        """Fail every batch queued and not taken by the sender, because of *exc*."""
        with self._lock:
            failed = self._batcher.fail_queued(exc)
        for batch, error in failed:
            _resolve(batch, error)
        with self._lock:
            for batch, _ in failed:
                self._batcher.finish(batch)
            self._progress.set()
