"""The asyncio NotificationManager: :class:`pgcast.NotificationManager` for ``async for``.

It drives the same policy (:mod:`pgcast.manager._policy`) as the sync manager,
so the semantics are the same: ``(aps, [events...])`` or ``None`` as an idle
event, timeouts ``None`` / ``> 0`` / ``0``, ``connections`` and ``garbage``
sets, nothing held during an idle event, the iteration ends when no
connection is left, ``reconnect=True`` (a task per reconnect), the health
checks of the connections (:meth:`AsyncPubSub.health_tick`, when due). Import
it as ``pgcast.aio.NotificationManager``.

Waiting is done by the event loop: each connection's descriptor
(:meth:`AsyncPubSub.fileno`) gets one reader, added once. A reader that
fires marks its connection ready and is paused until the connection has been
read, so the loop never spins on a socket the user has not got round to, and
a wake-up costs the same whatever the number of idle connections.

A manager belongs to the event loop it is first iterated in, and an
AsyncPubSub to at most one manager, not iterated by other means meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar, Self

from .._closing import AsyncClosing
from ._policy import Events, ManagerBase

if TYPE_CHECKING:  # aio imports this module: no import at run time
    from ..aio import AsyncPubSub

__all__ = ["NotificationManager"]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class NotificationManager(ManagerBase["AsyncPubSub"], AsyncClosing):
    """Wait for notifications on many :class:`~pgcast.AsyncPubSub` at once.

    :param connections: the AsyncPubSubs to watch; more can be added later.
    :param timeout: seconds without events before an idle event (``None``);
        ``None`` never idles, ``0`` polls once and ends the iteration.
    :param reconnect: reconnect a lost connection (in a task of its own, with
        :meth:`AsyncPubSub.reconnect`) instead of moving it to garbage; see
        :class:`pgcast.NotificationManager`.

    ``async for x in nm`` yields ``(aps, [events...])`` or ``None``. Use
    ``async with`` or ``await close()`` to remove its readers from the loop.
    """

    _NAME: ClassVar[str] = "pgcast.aio.NotificationManager"

    def __init__(
        self, *connections: AsyncPubSub, timeout: float | None = None, reconnect: bool = False
    ) -> None:
        self._closed = False
        self._reconnects: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        # Connections whose reader fired and was removed until they are read.
        self._paused: set[AsyncPubSub] = set()
        super().__init__(connections, timeout, reconnect)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[AsyncPubSub, Events] | None:
        for step in self._pending():
            request = self._request(step)
            if request is None:
                return step  # type: ignore[return-value]
            awaitable = request[0](request[1])
            if awaitable is not None:  # the methods that wait are coroutines
                await awaitable
        self._steps = None  # the next iteration starts over
        raise StopAsyncIteration

    # -- lifetime ------------------------------------------------------------

    async def close(self) -> None:
        """Stop watching every connection (their readers leave the loop).

        The AsyncPubSubs stay open and keep their unread events. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        for conn in list(self._core.fds):
            self._unregister(conn)
        if self._waiter is not None:
            _resolve(self._waiter)
        tasks = list(self._reconnects)  # the manager's work: it ends with the manager
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the driver ----------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)

    def _poked(self, conn: AsyncPubSub) -> None:
        if conn.closed:
            # close() closes the descriptor right after this call: the reader
            # must leave the loop now, not when this manager next runs.
            self._pause(conn)
        super()._poked(conn)

    def _readable(self, conn: AsyncPubSub) -> None:
        self._core.ready(conn)
        self._pause(conn)
        self._wake()

    def _pause(self, conn: AsyncPubSub) -> None:
        fd = self._core.fds.get(conn)
        if fd is not None and conn not in self._paused and self._loop is not None:
            self._loop.remove_reader(fd)
            self._paused.add(conn)

    def _reconnect_soon(self, conn: AsyncPubSub) -> None:
        task = self._get_loop().create_task(self._reconnect(conn))
        self._reconnects.add(task)
        task.add_done_callback(self._reconnects.discard)

    async def _reconnect(self, conn: AsyncPubSub) -> None:
        try:
            await conn.reconnect()
        except Exception as exc:
            self._reconnect_done(conn, exc)
        else:
            self._reconnect_done(conn)

    async def _read(self, conn: AsyncPubSub) -> None:
        try:
            await conn.read_ready()
        except Exception as exc:
            self._lose(conn, exc)

    async def _health_tick(self, conn: AsyncPubSub) -> None:
        try:
            await conn.health_tick()
        except Exception as exc:
            self._lose(conn, exc)

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this NotificationManager belongs to another event loop")
        return loop

    async def _wait(self, timeout: float | None) -> None:
        loop = self._get_loop()
        if self._paused:
            # Every paused connection has been read since (or left the set):
            # its reader can watch again.
            fds = self._core.fds
            lost = False
            for conn in list(self._paused):
                self._paused.discard(conn)
                fd = fds.get(conn)
                if fd is None:
                    continue
                try:
                    loop.add_reader(fd, self._readable, conn)
                except Exception as exc:  # its descriptor was closed
                    self._paused.add(conn)
                    self._lose(conn, exc)
                    lost = True
            if lost:
                return  # the set changed: back to the policy before waiting
        fut = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _resolve, fut)
        try:
            await fut
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _register(self, conn: AsyncPubSub) -> None:
        loop = self._get_loop()
        try:
            fd = conn.fileno()
            loop.add_reader(fd, self._readable, conn)
        except Exception as exc:
            self._lose(conn, exc)
            return
        self._watch(conn, fd)

    def _unregister(self, conn: AsyncPubSub) -> None:
        fd = self._core.fds.get(conn)
        if fd is not None and conn not in self._paused and self._loop is not None:
            self._loop.remove_reader(fd)
        self._paused.discard(conn)
        self._forget(conn)
