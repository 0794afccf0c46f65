"""The gateway as an application that hosts it sees it: :class:`Gateway`.

:func:`~pgcast.gateway.create_app` returns a :class:`GatewayApp`, a Starlette
application whose :attr:`~GatewayApp.gateway` is the public handle on the
running gateway: publish from the host's own routes on the gateway's
connection, start it from the host's lifespan, read its state. Nothing of the
driver (:class:`~pgcast.gateway._hub.Hub`) leaks through it.

::

    realtime = create_app(dsn, allow=["orders.*"])
    app = FastAPI(lifespan=lambda app: realtime.gateway.running())
    app.mount("/realtime", realtime)

    @app.post("/orders")
    async def new_order(order: Order) -> None:
        await realtime.gateway.publish("orders.new", order.model_dump())
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from .._channels import check_channel
from .._errors import ConnectError, NotSentError, ProtocolError
from .._payload import Payload
from ._metrics import Family

if TYPE_CHECKING:
    from ._hub import Hub

__all__ = ["START_RETRY_PAUSE", "Gateway", "GatewayApp"]

#: Seconds before a start that failed is tried again (mounted, the gateway
#: starts at a request: not one login attempt per request).
START_RETRY_PAUSE = 2.0


class Gateway:
    """The public handle on one gateway: ``create_app(...).gateway``."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._started = False
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        # A start that failed: when to try again, and its error.
        self._failed: tuple[float, Exception] | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the LISTEN connection (once; later calls return at once).

        The gateway's own lifespan calls it when it runs standalone; mounted
        in another application, call it (or use :meth:`running`) from the
        host's lifespan, or it starts at its first request. After a failed
        start, it is tried again only once ``START_RETRY_PAUSE`` (2 s) has
        passed; calls meanwhile raise the last error.

        :raises pgcast.ConnectError: PostgreSQL cannot be reached.
        """
        if self._started:
            return
        async with self._lock:
            if self._started:
                return
            failed = self._failed
            if failed is not None and time.monotonic() < failed[0]:
                # Not a login attempt per request (an anonymous client's rate
                # would become the server's): the last error, until the pause ends.
                raise ConnectError(f"{failed[1]} (tried again at most every "
                                   f"{START_RETRY_PAUSE:g} s)") from failed[1]
            try:
                await self._hub.start()
            except Exception as exc:
                self._failed = (time.monotonic() + START_RETRY_PAUSE, exc)
                raise
            self._failed = None
            self._loop = asyncio.get_running_loop()
            self._started = True

    async def start_quietly(self) -> None:
        """:meth:`start`, with a failure left for ``/healthz`` to report (503)."""
        with contextlib.suppress(Exception):
            await self.start()

    async def close(self) -> None:
        """Close every client (WebSocket 1001, SSE ``shutdown``) and the connections."""
        await self._hub.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start the gateway, and close it on the way out: a host's lifespan.

        ``FastAPI(lifespan=lambda app: gateway.running())``, or
        ``async with gateway.running(): yield`` inside a lifespan of your own.
        """
        await self.start()
        try:
            yield
        finally:
            await self.close()

    # -- publishing --------------------------------------------------------

    async def publish(self, channel: str, payload: Payload = "") -> None:
        """NOTIFY *payload* on *channel* from the gateway's own connection.

        For the host application's code (a route, a background task): no
        allow-list applies, as to any code of the server. Dicts and lists are
        sent as JSON. Every subscriber of *channel*, on this gateway or any
        other process LISTENing, receives it. Starts the gateway if needed.

        To publish what a transaction changed, NOTIFY from that transaction
        instead (:func:`pgcast.notify` on its connection): delivered at
        commit, never on rollback.

        :raises pgcast.InvalidChannelError: *channel* is not a valid channel name.
        :raises pgcast.PayloadError: *payload* is not str, dict or list, or
            contains NUL.
        :raises pgcast.SchemaError: a payload of 8000 bytes or more needs
            the ``pgcast`` schema (``pgcast init``), and it is missing.
        :raises pgcast.NotSentError: the gateway's database connection was
            down for ``database_timeout`` seconds: nothing was sent.
        :raises pgcast.ConnectionLostError: the connection was lost while
            the NOTIFY was on the wire: it may or may not have been sent.
        """
        check_channel(channel)
        await self.start()
        hub = self._hub
        await hub._shielded(self._notify(channel, payload))

    async def _notify(self, channel: str, payload: Payload) -> None:
        hub = self._hub
        try:
            await hub._wait_ready(time.monotonic() + hub.settings.database_timeout)
        except ProtocolError as exc:
            raise NotSentError(str(exc)) from None
        aps = hub._aps
        assert aps is not None
        await aps.notify(channel, payload)

    # -- state -------------------------------------------------------------

    @property
    def database_up(self) -> bool:
        """Whether the LISTEN connection is open and in use."""
        return self._hub.database_up

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection, while it is up."""
        return self._hub.backend_pid

    @property
    def clients(self) -> int:
        """The number of connected clients (WebSocket and SSE)."""
        return sum(self._hub.clients_by_transport().values())

    def listening(self) -> frozenset[str]:
        """The channels the gateway LISTENs to now (those with a subscriber)."""
        return self._hub.listening()

    async def metrics(self) -> str:
        """The Prometheus text ``/metrics`` serves."""
        return await self._hub.metrics()

    def metric_families(self) -> list[Family]:
        """The metrics of ``/metrics`` as families, for a collector
        (:class:`pgcast.gateway.metrics.PrometheusCollector`); callable from
        any thread.

        The NOTIFY queue usage is read from the database (at most every
        ``metrics_cache`` seconds) when called from another thread than the
        gateway's event loop; from the loop itself, which must not block, it
        is the last value read, and a fresh read is started for next time.
        """
        return self._hub.metric_families(self._queue_usage())

    def _queue_usage(self) -> float | None:
        hub = self._hub
        usage = hub._queue_usage
        loop = self._loop
        if loop is None or loop.is_closed() or hub.closing:
            return usage.cached
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(usage.read())
            hub._jobs.add(task)
            task.add_done_callback(hub._jobs.discard)
            return usage.cached
        future = asyncio.run_coroutine_threadsafe(usage.read(), loop)
        try:
            return future.result(timeout=hub.settings.database_timeout + 1.0)
        except (TimeoutError, concurrent.futures.TimeoutError):
            future.cancel()
            return usage.cached

    def wrap_asgi(self, app: ASGIApp) -> ASGIApp:
        """*app*, preceded by :meth:`start_quietly` on each call."""
        return _StartFirst(self, app)


class GatewayApp(Starlette):
    """The ASGI application :func:`~pgcast.gateway.create_app` returns: a
    Starlette app, with the :class:`Gateway` it serves."""

    gateway: Gateway
    """Publish, start, close, and read the state of this gateway."""


class _StartFirst:
    # A class, not a function: Starlette routes a function as a
    # request/response endpoint and an object as a raw ASGI app.
    def __init__(self, gateway: Gateway, app: ASGIApp) -> None:
        self.gateway = gateway
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.gateway.start_quietly()
        await self.app(scope, receive, send)
