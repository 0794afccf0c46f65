"""The asyncio PubSub: the same names as :mod:`pgcast.client`, awaitable.

It drives the same core (:mod:`pgcast._core`) as the sync client. Waiting is
done by the event loop's reader on a duplicate of the connection's socket, so
it never competes with psycopg's own reader on the original descriptor while a
query runs; the connection's lock is held only to read what arrived, which
never blocks. Other tasks may notify, listen and unlisten while one task
iterates :meth:`AsyncPubSub.events`.

An AsyncPubSub belongs to the event loop it was created in and is not thread
safe, like every asyncio object.

Reconnecting follows the sync client (see :mod:`pgcast.client` and
:mod:`pgcast._reconnect`): the task that finds the connection lost
reconnects under an :class:`asyncio.Lock`, the iterating task without a time
limit but the backoff's, a notifying task within ``notify_timeout``; the same
pure retry loop, probe schedule and marker are driven here with awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import psycopg

from . import _ops as ops
from ._backoff import Backoff
from ._closing import AsyncClosing
from ._connect import connect_failed, connect_plan, reconnect_conninfo
from ._core import Handler, Wait, notify_query, wrap_error
from ._discard import DISCARD_TIMEOUT, shutdown
from ._durable_core import Unfetched
from ._errors import ClosedError, ConnectionLostError
from ._event import DurableEvent, Event
from ._payload import Payload
from ._pubsub_base import PubSubBase
from ._reconnect import Attempt, OnReconnect, Reconnected, Resilience, Sleep
from .aio_manager import NotificationManager

__all__ = ["AsyncPubSub", "NotificationManager", "connect", "notify"]


logger = logging.getLogger("pgcast")

#: A reconnect hook: see :meth:`AsyncPubSub.add_reconnect_hook`.
AsyncReconnectHook = Callable[["AsyncPubSub"], Awaitable[None]]

T = TypeVar("T")


async def connect(
    conninfo: str = "",
    *,
    reconnect: bool = True,
    reconnect_backoff: Backoff | None = None,
    health_check_interval: float | None = 30.0,
    on_reconnect: OnReconnect | None = None,
    notify_timeout: float = 30.0,
    **kwargs: Any,
) -> AsyncPubSub:
    """Open an :class:`AsyncPubSub`; the arguments are those of
    :func:`pgcast.connect` (*on_reconnect* may be a coroutine function)."""
    conninfo, options, res = connect_plan(
        conninfo, kwargs, reconnect=reconnect, reconnect_backoff=reconnect_backoff,
        health_check_interval=health_check_interval, notify_timeout=notify_timeout,
        on_reconnect=on_reconnect,
    )
    open_connection = _opener(conninfo, options)
    pubsub = AsyncPubSub(await open_connection(), resilience=res, connector=open_connection)
    try:
        await pubsub._run(ops.identify(pubsub._core))
    except BaseException:
        await pubsub.close()
        raise
    return pubsub


def _opener(
    conninfo: str, options: dict[str, Any]
) -> Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]:
    """What opens the AsyncPubSub's connections: the first one and every reconnect."""

    async def open_connection() -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(conninfo, **options)
        except psycopg.Error as exc:
            raise connect_failed(exc) from exc

    return open_connection


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


class AsyncPubSub(PubSubBase[psycopg.AsyncConnection[Any]], AsyncClosing):
    """Listen to and notify PostgreSQL channels over one async connection.

    Create it with ``await pgcast.aio.connect(...)``; use ``async with`` or
    ``await close()``.
    """

    _kind = "AsyncPubSub"
    _actor = "task"

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        resilience: Resilience | None = None,
        connector: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]] | None = None,
    ) -> None:
        """Wrap *conn* (autocommit, used by nothing else); see
        :class:`pgcast.PubSub` for *resilience* and *connector*."""
        self._setup(conn, resilience)
        self._connector = connector or _opener(reconnect_conninfo(conn), {"autocommit": True})
        self._closing = asyncio.Event()
        self._reconnect_lock = asyncio.Lock()
        self._reconnecting: asyncio.Task[Any] | None = None
        self._hooks: list[AsyncReconnectHook] = [AsyncPubSub._replay_after_reconnect]
        self._stopping = False
        self._waiter: asyncio.Future[None] | None = None
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        # Our own descriptor for the socket: the loop keys readers by fd, and
        # psycopg adds its reader to the original one while a query runs.
        self._fd = os.dup(self._pgconn.socket)
        self._reader_fd = self._fd

    # -- connection --------------------------------------------------------

    def fileno(self) -> int:
        """A descriptor of the connection's socket (a duplicate, owned by this
        AsyncPubSub and valid until :meth:`close`), to wait on with
        ``loop.add_reader`` as :class:`pgcast.aio.NotificationManager` does.

        A reconnect replaces it: ask again after a :class:`Reconnected` marker
        (or when :attr:`generation` changed)."""
        self._check_open()
        return self._fd

    async def close(self) -> None:
        """Close the connection. Idempotent; iterating tasks stop iterating."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wake()
        self._unhook()
        await self._conn.close()
        os.close(self._fd)

    # -- subscriptions -----------------------------------------------------

    async def listen(
        self,
        *channels: str,
        durable: bool = False,
        since: int | None = None,
        consumer: str | None = None,
    ) -> None:
        """Start receiving on *channels*; see :meth:`pgcast.PubSub.listen`
        (the LISTEN is confirmed with ``pg_listening_channels()``), also for
        *durable*, *since* and *consumer*."""
        await self._run(ops.listen(self, channels, durable, since, consumer))

    async def unlisten(self, *channels: str) -> None:
        """Stop receiving on *channels*, or on all; see :meth:`pgcast.PubSub.unlisten`."""
        await self._run(ops.unlisten(self, channels))

    async def queue_usage(self) -> float:
        """``pg_notification_queue_usage()``, 0.0 to 1.0; see
        :meth:`pgcast.PubSub.queue_usage`."""
        return await self._run(ops.queue_usage())

    # -- publishing --------------------------------------------------------

    async def notify(
        self, channel: str, payload: Payload = "", *, durable: bool = False
    ) -> int | None:
        """Send *payload*, of any size, on *channel*; see :meth:`pgcast.PubSub.notify`."""
        return await self._run(ops.notify(self._core, channel, payload, durable))

    async def notify_many(
        self, messages: Iterable[tuple[str, Payload]], *, durable: bool = False
    ) -> int | None:
        """Send many messages in one round trip; see :meth:`pgcast.PubSub.notify_many`."""
        return await self._run(ops.notify_many(self._core, messages, durable))

    async def ack(self, event: Event) -> None:
        """Record that the consumer processed *event* and all before it on its
        channel; see :meth:`pgcast.PubSub.ack`."""
        await self._run(ops.ack(self._core, event))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Notifications sent inside are delivered at commit, none on rollback."""
        self._check_open()
        await self._begin_command()
        try:
            async with self._conn.transaction():
                yield
        except psycopg.Error as exc:
            raise wrap_error(exc) from exc
        finally:
            self._queries -= 1
            await self._after_query()

    # -- receiving ---------------------------------------------------------

    async def get_event(self) -> Event | Reconnected | None:
        """The next event or :class:`Reconnected` marker, or None; see
        :meth:`pgcast.PubSub.get_event`."""
        return await self._run(ops.get_event(self))

    def events(
        self,
        select_timeout: float | None = 5.0,
        yield_timeouts: bool = False,
        ignore_own: bool = False,
    ) -> AsyncIterator[Event | Reconnected | None]:
        """``async for`` over events and :class:`Reconnected` markers as they
        arrive; see :meth:`pgcast.PubSub.events`."""
        return self._drive(self._events_plan(select_timeout, yield_timeouts, ignore_own))

    def wait(self, timeout: float | None = None) -> AsyncIterator[Event | Reconnected | None]:
        """``async for`` over events and idle ``None``; see :meth:`pgcast.PubSub.wait`."""
        return self._drive(self._wait_plan(timeout))

    async def _drive(
        self, steps: Iterator[Wait | Event | Reconnected | None], stoppable: bool = False
    ) -> AsyncIterator[Event | Reconnected | None]:
        if self._closed:
            raise ClosedError("this AsyncPubSub is closed")
        for step in steps:
            if type(step) is Wait:
                if self._closed or (stoppable and self._stopping):
                    return
                generation = self._generation
                try:
                    # A durable channel catching up: a batch, then a read.
                    await self._fill(0 if await self._replay() else step.timeout)
                except ConnectionLostError as exc:
                    if self._closed:
                        return
                    try:
                        await self._recover(exc, generation)  # the marker lands in the inbox
                    except ClosedError:
                        return  # closed while reconnecting: iteration ends
            elif type(step) is Unfetched:
                fetched = await self._fetch_payload(step)
                if fetched is not None:
                    yield fetched
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

    async def run(self) -> None:
        """Deliver events to the subscribed handlers until :meth:`stop`,
        :meth:`close` or cancellation. A failing handler does not stop it."""
        core = self._core
        steps = self._run_plan()
        try:
            async for event in self._drive(steps, stoppable=True):
                for result in core.deliver(event):
                    try:
                        await result
                    except Exception as exc:
                        core.handler_failed(exc, event)  # type: ignore[arg-type]
                if self._stopping:
                    return  # the events not handled stay in the inbox
        finally:
            # Reset on the way out, not on entry: a stop() between
            # create_task(run()) and its first step must still stop it.
            self._stopping = False

    def stop(self) -> None:
        """Make :meth:`run` return after the event it is handling (at once if
        it has not started yet); events not handled stay pending."""
        self._stopping = True
        self._wake()

    # -- the driver --------------------------------------------------------

    async def _run(self, op: ops.Op[T]) -> T:
        """Execute the requests of *op* (see :mod:`pgcast._ops`) until it
        returns: the asyncio twin of :meth:`pgcast.PubSub._run`."""
        send = op.send
        reply: Any = None
        try:
            request = send(None)
            while True:
                try:
                    kind = type(request)
                    if kind is tuple:
                        reply = await self._command(*request, fetch=True)  # type: ignore[misc]
                    elif kind is ops.Execute:
                        reply = await self._command(*request, fetch=False)  # type: ignore[misc]
                    elif request is ops.WAKE:
                        self._wake()
                        reply = None
                    elif request is ops.READ:
                        await self._read()
                        reply = None
                    else:
                        reply = await self._serve(request)
                except BaseException as exc:
                    request = op.throw(exc)
                    continue
                request = send(reply)
        except StopIteration as done:
            result: T = done.value
            return result

    async def _serve(self, request: ops.Request) -> Any:
        """Execute the requests other than commands (see :meth:`_run`)."""
        if request is ops.SETTLE:
            return await self._settle()
        if type(request) is ops.Recover:
            return await self._recover(
                request.error, request.generation, request.deadline, force=request.force
            )
        if type(request) is ops.Transaction:
            async with self.transaction():
                return await self._run(request.steps)
        if type(request) is ops.CallOnReconnect:
            await self._call_on_reconnect(request.marker)
        elif request is ops.RECONNECTING:
            self._reconnecting = asyncio.current_task()
        elif type(request) is Sleep:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), request.seconds)
            if self._closed:
                raise ClosedError("this AsyncPubSub was closed while reconnecting")
        elif type(request) is Attempt:
            await self._run(ops.attempt(self._core))
        elif request is ops.DISCARD:
            await self._discard()
        elif request is ops.CHECK_CLOSED:
            if self._closed:
                await self._discard()
                raise ClosedError("this AsyncPubSub was closed while reconnecting")
        elif request is ops.CONNECT:
            self._install(await self._connector())
        elif type(request) is ops.Direct:
            try:
                cur = await self._conn.execute(request.sql, prepare=False)
                return await cur.fetchall() if request.fetch else None
            except psycopg.Error as exc:
                raise wrap_error(exc) from exc
        elif type(request) is ops.Elsewhere:
            other = await self._connector()
            try:
                cur = await other.execute(request.sql, prepare=False)
                return await cur.fetchall()
            except psycopg.Error as exc:
                raise wrap_error(exc) from exc
            finally:
                await other.close()
        elif request is ops.NO_PREPARE:
            self._conn.prepare_threshold = None
        elif request is ops.AFTER_QUERY:
            await self._after_query()
        elif request is ops.HOOKS:
            for hook in self._hooks:
                await hook(self)
        else:
            raise TypeError(f"unknown request {request!r}")
        return None

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)
        if self._on_wake is not None:  # a NotificationManager watching us
            self._on_wake()

    async def _execute(self, sql: str | bytes, params: Any = None) -> None:
        await self._command(sql, params, fetch=False)

    async def _fetch(self, sql: str | bytes, params: Any = None) -> list[tuple[Any, ...]]:
        """Run a query and return its rows, as :meth:`_execute` runs commands."""
        return await self._command(sql, params, fetch=True)

    async def _command(
        self, sql: str | bytes, params: Any, *, fetch: bool
    ) -> list[tuple[Any, ...]]:
        # As in the sync client: restored first if known lost, never retried
        # once on the wire.
        if self._closed:
            raise ClosedError("this AsyncPubSub is closed")
        await self._begin_command()
        try:
            if not self._core.identified:
                # An AsyncPubSub built on a connection directly (not by
                # connect(), which identifies it) does it at its first command.
                await self._run(ops.identify(self._core))
            conn = self._conn
            generation = self._generation
            self._in_flight += 1
            try:
                cur = await conn.execute(sql, params, prepare=None if params else False)
                rows = await cur.fetchall() if fetch and cur.description is not None else []
            except psycopg.Error as exc:
                raise self._command_failed(exc, generation) from exc
            finally:
                self._in_flight -= 1
            self._core.health.heard(self._core.clock())
            return rows
        finally:
            self._queries -= 1
            await self._after_query()

    async def _begin_command(self) -> None:
        self._queries += 1
        try:
            await self._run(ops.begin_command(self))
        except BaseException:
            self._queries -= 1
            raise

    async def _settle(self) -> None:
        self._check_open()
        conn = self._conn
        async with conn.lock:
            for step in self._core.settle(conn.pgconn):
                await _readable(conn.pgconn.socket, step.timeout)

    async def _after_query(self) -> None:
        conn = self._conn
        if self._closed or conn.closed:
            return
        async with conn.lock:
            try:
                self._core.take(conn.pgconn)
            except ConnectionLostError:
                return  # the next read or command notices it
        # Not only what take() added: psycopg's notify handler already put in
        # the inbox what came with the results, and nobody was woken for it.
        if self._core.inbox:
            self._wake()

    async def _read(self) -> None:
        self._check_open()
        conn = self._conn
        async with conn.lock:
            self._core.read(conn.pgconn)

    def _unhook(self) -> None:
        if self._reader_loop is not None:
            self._reader_loop.remove_reader(self._reader_fd)
            self._reader_loop = None

    async def _fill(self, timeout: float | None) -> None:
        core = self._core
        if timeout != 0:
            self._check_open()
            await self._maybe_probe()
            wait = core.wait_time(timeout)
            loop = asyncio.get_running_loop()
            fut = self._waiter = loop.create_future()
            self._reader_fd = self._fd
            loop.add_reader(self._reader_fd, _resolve, fut)
            self._reader_loop = loop
            timer = None if wait is None else loop.call_later(wait, _resolve, fut)
            try:
                await fut
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
                self._unhook()
            if self._closed:
                return
        self._check_open()
        conn = self._conn
        # A running command holds the lock and reads for us; wait for it no
        # longer than the health check allows (see the sync twin).
        limit = core.wait_time(None)
        try:
            if limit is None:
                await conn.lock.acquire()
            else:
                # asyncio.timeout, not wait_for: wait_for makes a task per
                # call, which cost the receive path about a fifth of its rate.
                async with asyncio.timeout(max(0.01, limit)):
                    await conn.lock.acquire()
        except TimeoutError:
            core.check_health()
            return
        try:
            core.read(conn.pgconn)
        finally:
            conn.lock.release()
        core.check_health()

    async def health_tick(self) -> float | None:
        """One step of the health check for a supervisor waiting on
        :meth:`fileno`; see :meth:`pgcast.PubSub.health_tick`."""
        self._check_open()
        await self._maybe_probe()
        self._core.check_health()
        return self._core.wait_time(None)

    async def _maybe_probe(self) -> None:
        core = self._core
        if not core.wants_probe() or self._reconnecting is not None:
            return
        if self._queries:
            # A command on the wire stands in for the probe (see the sync twin).
            if self._in_flight:
                core.health.probe_sent(core.clock())
            return
        conn = self._conn
        # Not contended (no command runs): taking the lock does not yield to
        # a task that could start one.
        async with conn.lock:
            if not self._queries:
                core.send_probe(conn.pgconn)

    # -- durable channels (the logic is in pgcast._durable_core) ------------

    async def _replay(self) -> bool:
        """Read one replay batch if a durable channel is catching up."""
        return await self._run(ops.replay(self._core))

    async def _replay_after_reconnect(self) -> None:
        await self._run(ops.replay_after_reconnect(self._core))

    async def _ready_inbox(self) -> None:
        """Make the inbox fit to be handed out as it is; see
        :meth:`pgcast.PubSub._ready_inbox`."""
        await self._run(ops.ready_inbox(self))

    async def _fetch_payload(self, event: Unfetched) -> DurableEvent | None:
        """The event with its payload read from the log (None: pruned)."""
        return await self._run(ops.fetch_payload(self, event))

    # -- reconnecting ------------------------------------------------------

    def add_reconnect_hook(self, hook: AsyncReconnectHook) -> None:
        """``await hook(pubsub)`` after each reconnect, once every channel is
        LISTENed again and before the marker is queued; see
        :meth:`pgcast.PubSub.add_reconnect_hook`."""
        if not callable(hook):
            raise TypeError(f"hook must be callable, not {type(hook).__name__}")
        self._hooks.append(hook)

    async def reconnect(self) -> Reconnected:
        """Drop the connection and open a new one now; see
        :meth:`pgcast.PubSub.reconnect`."""
        return await self._run(ops.force_reconnect(self))

    def _in_reconnect(self) -> bool:
        return self._reconnecting is not None and self._reconnecting is asyncio.current_task()

    async def _recover(
        self,
        exc: ConnectionLostError,
        generation: int,
        deadline: float | None = None,
        *,
        force: bool = False,
    ) -> Reconnected | None:
        self._check_reconnect(exc, force)
        try:
            if deadline is None:
                await self._reconnect_lock.acquire()
            else:
                timeout = max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(self._reconnect_lock.acquire(), timeout)
        except TimeoutError:
            raise self._reconnect_busy(exc) from exc
        try:
            return await self._run(ops.restore(self, exc, generation, deadline))
        finally:
            self._reconnecting = None
            self._reconnect_lock.release()

    def _install(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # The iterating task may wait on the old descriptor: unhook it there
        # and wake it, so it waits on the new one.
        self._wake()
        self._unhook()
        old_fd = self._fd
        self._fd = os.dup(conn.pgconn.socket)
        os.close(old_fd)
        self._adopt(conn)

    async def _discard(self) -> None:
        conn = self._conn
        if conn.closed:
            return
        # A command stuck on a dead connection holds its lock: shut the socket
        # down so it fails at once, then close (see the sync twin).
        shutdown(conn.pgconn)
        try:
            await asyncio.wait_for(conn.lock.acquire(), DISCARD_TIMEOUT)
        except TimeoutError:
            logger.warning("pgcast: a command on the lost connection did not end; leaving it")
            return
        try:
            with contextlib.suppress(Exception):
                await conn.close()
        finally:
            conn.lock.release()

    async def _call_on_reconnect(self, marker: Reconnected) -> None:
        callback = self._res.on_reconnect
        if callback is None:
            return
        try:
            result = callback(marker)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("pgcast: on_reconnect failed on %r", marker)


async def _readable(fd: int, timeout: float | None) -> None:
    """Wait until *fd* is readable, at most *timeout* seconds."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _resolve, fut)
    timer = None if timeout is None else loop.call_later(timeout, _resolve, fut)
    try:
        await fut
    finally:
        if timer is not None:
            timer.cancel()
        loop.remove_reader(fd)
