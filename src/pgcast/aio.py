"""The asyncio PubSub: the same names as :mod:`pgcast.client`, awaitable.

It drives the same core (:mod:`pgcast._core`) as the sync client. Waiting is
done by the event loop's reader on a duplicate of the connection's socket, so
it never competes with psycopg's own reader on the original descriptor while a
query runs; the connection's lock is held only to read what arrived, which
never blocks. Other tasks may notify, listen and unlisten while one task
iterates :meth:`AsyncPubSub.events`.

An AsyncPubSub belongs to the event loop it was created in and is not thread
safe, like every asyncio object.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Self

import psycopg

from ._core import (
    Core,
    ExceptionHandler,
    Handler,
    Wait,
    check_timeout,
    connect_args,
    notify_many_query,
    notify_query,
    plan,
    wrap_error,
)
from ._errors import ClosedError, ConnectError, ConnectionLostError
from ._event import Event
from ._payload import Payload
from .aio_manager import NotificationManager

__all__ = ["AsyncPubSub", "NotificationManager", "connect", "notify"]


async def connect(conninfo: str = "", **kwargs: Any) -> AsyncPubSub:
    """Open an :class:`AsyncPubSub`; the arguments are those of
    :func:`pgcast.connect`."""
    conninfo, options = connect_args(conninfo, kwargs)
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, **options)
    except psycopg.Error as exc:
        raise ConnectError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc
    return AsyncPubSub(conn)


async def notify(
    conn: psycopg.AsyncConnection[Any], channel: str, payload: Payload = ""
) -> None:
    """Send a notification through an application's own async connection,
    inside its current transaction if any (see :func:`pgcast.notify`)."""
    sql, params = notify_query(channel, payload)
    await conn.execute(sql, params)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncPubSub:
    """Listen to and notify PostgreSQL channels over one async connection.

    Create it with ``await pgcast.aio.connect(...)``; use ``async with`` or
    ``await close()``.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not conn.autocommit:
            raise ValueError("an AsyncPubSub needs a connection in autocommit mode")
        self._conn = conn
        self._pgconn = conn.pgconn
        self._core = Core()
        self._closed = False
        self._stopping = False
        self._waiter: asyncio.Future[None] | None = None
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        # Our own descriptor for the socket: the loop keys readers by fd, and
        # psycopg adds its reader to the original one while a query runs.
        self._fd = os.dup(self._pgconn.socket)
        # Set by a NotificationManager: called whenever this AsyncPubSub wakes
        # its own waiter, i.e. on events taken in off the socket and on close.
        self._on_wake: Callable[[], object] | None = None
        conn.add_notify_handler(self._core.on_notify)

    # -- connection --------------------------------------------------------

    @property
    def connection(self) -> psycopg.AsyncConnection[Any]:
        """The psycopg connection underneath. Run no queries on it yourself."""
        return self._conn

    @property
    def backend_pid(self) -> int:
        """The server process id of this connection, the one :meth:`notify` uses."""
        return self._conn.info.backend_pid

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the connection broke."""
        return self._closed or self._conn.closed

    def fileno(self) -> int:
        """A descriptor of the connection's socket (a duplicate, owned by this
        AsyncPubSub and valid until :meth:`close`), to wait on with
        ``loop.add_reader`` as :class:`pgcast.aio.NotificationManager` does."""
        self._check_open()
        return self._fd

    async def close(self) -> None:
        """Close the connection. Idempotent; iterating tasks stop iterating."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._unhook()
        await self._conn.close()
        os.close(self._fd)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pid={self.backend_pid}"
        return f"<pgcast.AsyncPubSub {state} channels={sorted(self._core.channels)!r}>"

    # -- subscriptions -----------------------------------------------------

    async def listen(self, *channels: str) -> None:
        """Start receiving on *channels*; see :meth:`pgcast.PubSub.listen`."""
        if self._closed:  # even when there is nothing to send
            raise ClosedError("this AsyncPubSub is closed")
        new, sql = self._core.plan_listen(channels)
        if sql is not None:
            await self._execute(sql)
            self._core.did_listen(new)

    async def unlisten(self, *channels: str) -> None:
        """Stop receiving on *channels*, or on all; see :meth:`pgcast.PubSub.unlisten`."""
        if self._closed:  # even when there is nothing to send
            raise ClosedError("this AsyncPubSub is closed")
        gone, sql = self._core.plan_unlisten(channels)
        if sql is not None:
            await self._execute(sql)
            self._core.did_unlisten(gone)

    def listening_channels(self) -> frozenset[str]:
        """The exact names of the channels listened to now."""
        return frozenset(self._core.channels)

    # -- publishing --------------------------------------------------------

    async def notify(self, channel: str, payload: Payload = "") -> None:
        """Send *payload* on *channel*; see :meth:`pgcast.PubSub.notify`."""
        sql, params = notify_query(channel, payload)
        await self._execute(sql, params)

    async def notify_many(self, messages: Iterable[tuple[str, Payload]]) -> None:
        """Send many messages in one round trip; see :meth:`pgcast.PubSub.notify_many`."""
        query = notify_many_query(messages)
        if query is not None:
            await self._execute(*query)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Notifications sent inside are delivered at commit, none on rollback."""
        self._check_open()
        try:
            async with self._conn.transaction():
                yield
        except psycopg.Error as exc:
            raise wrap_error(exc) from exc
        finally:
            await self._after_query()

    # -- receiving ---------------------------------------------------------

    async def get_event(self) -> Event | None:
        """The next event, or None. Never waits for the network."""
        inbox = self._core.inbox
        if not inbox:
            await self._read()
        return inbox.popleft() if inbox else None

    def events(
        self,
        select_timeout: float | None = 5.0,
        yield_timeouts: bool = False,
        ignore_own: bool = False,
    ) -> AsyncIterator[Event | None]:
        """``async for`` over events as they arrive; see :meth:`pgcast.PubSub.events`."""
        timeout = check_timeout("select_timeout", select_timeout)
        if timeout == 0:
            raise ValueError("select_timeout must be > 0 (use get_event() to poll)")
        skip = self.backend_pid if ignore_own else None
        return self._drive(
            plan(self._core.inbox, timeout=timeout, idle=yield_timeouts, skip_pid=skip)
        )

    def wait(self, timeout: float | None = None) -> AsyncIterator[Event | None]:
        """``async for`` over events and idle ``None``; see :meth:`pgcast.PubSub.wait`."""
        t = check_timeout("timeout", timeout)
        return self._drive(plan(self._core.inbox, timeout=t, idle=t is not None, once=t == 0))

    async def _drive(
        self, steps: Iterator[Wait | Event | None], stoppable: bool = False
    ) -> AsyncIterator[Event | None]:
        self._check_open()
        for step in steps:
            if type(step) is Wait:
                if self._closed or (stoppable and self._stopping):
                    return
                await self._fill(step.timeout)
            else:
                yield step  # type: ignore[misc]

    # -- callbacks ---------------------------------------------------------

    async def subscribe(self, channel: str, handler: Handler) -> None:
        """Call *handler* with every event on *channel*; delivered by :meth:`run`.

        Coroutine functions are awaited, plain functions called in the event
        loop (keep them quick); handlers of one channel see its events in order.
        """
        self._core.add_handler(channel, handler)
        await self.listen(channel)

    async def unsubscribe(self, channel: str) -> None:
        """Remove every handler of *channel* and stop listening to it."""
        self._core.remove_handlers(channel)
        await self.unlisten(channel)

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        """Set what is called with ``(exception, event)`` when a handler fails."""
        self._core.exception_handler = handler

    async def run(self) -> None:
        """Deliver events to the subscribed handlers until :meth:`stop`,
        :meth:`close` or cancellation. A failing handler does not stop it."""
        core = self._core
        self._stopping = False
        steps = plan(core.inbox, timeout=None, idle=False)
        async for event in self._drive(steps, stoppable=True):
            assert event is not None
            for handler in core.handlers.get(event.channel, ()):
                try:
                    result = handler(event)
                    if core.is_async(handler):
                        await result  # type: ignore[misc]
                except Exception as exc:
                    core.handler_failed(exc, event)

    def stop(self) -> None:
        """Make :meth:`run` return after the event it is handling."""
        self._stopping = True
        self._wake()

    # -- the driver --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this AsyncPubSub is closed")
        if self._conn.closed:
            raise ConnectionLostError("the connection to PostgreSQL is closed")

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)
        if self._on_wake is not None:  # a NotificationManager watching us
            self._on_wake()

    async def _execute(self, sql: str | bytes, params: Any = None) -> None:
        self._check_open()
        try:
            await self._conn.execute(sql, params, prepare=None if params else False)
        except psycopg.Error as exc:
            raise wrap_error(exc) from exc
        finally:
            await self._after_query()

    async def _after_query(self) -> None:
        if self._closed or self._conn.closed:
            return
        async with self._conn.lock:
            self._core.take(self._pgconn)
        # Not only what take() added: psycopg's notify handler already put in
        # the inbox what came with the results, and nobody was woken for it.
        if self._core.inbox:
            self._wake()

    async def _read(self) -> None:
        self._check_open()
        async with self._conn.lock:
            self._core.read(self._pgconn)

    def _unhook(self) -> None:
        if self._reader_loop is not None:
            self._reader_loop.remove_reader(self._fd)
            self._reader_loop = None

    async def _fill(self, timeout: float | None) -> None:
        if timeout != 0:
            loop = asyncio.get_running_loop()
            fut = self._waiter = loop.create_future()
            loop.add_reader(self._fd, _resolve, fut)
            self._reader_loop = loop
            timer = None if timeout is None else loop.call_later(timeout, _resolve, fut)
            try:
                await fut
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
                self._unhook()
            if self._closed:
                return
        await self._read()
