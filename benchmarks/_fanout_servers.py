"""The servers bench_gateway compares, each run as ``python _fanout_servers.py DESIGN PORT DSN``.

Every design LISTENs on one PostgreSQL connection (but ``perconn``), answers a
client with a text frame containing ``"subscribed"`` once it will get the
channel's notifications, and sends each notification to every client as the
JSON object the pgcast gateway sends. All on 127.0.0.1, on uvloop where the
design can use it (uvicorn picks it by itself).

* ``floor``: the floor for Python: a bare asyncio protocol that does the
  opening handshake by hand, builds one WebSocket frame per NOTIFY and
  ``transport.write()`` s the same bytes to every client. No queue, no limit,
  no task per client: what any real server must add costs on top of this.
* ``websockets``: the ``websockets`` library's asyncio server, one handler
  per client, and its ``broadcast()``.
* ``pgcast``: :func:`pgcast.gateway.create_app` under ``pgcast serve``'s
  server (:mod:`pgcast.gateway._serve`), one worker.
* ``pgcast-asgi``: the same app on uvicorn's own WebSocket protocol: the
  generic ASGI path an application that mounts the gateway in another server
  gets (a sender task per client, an ASGI ``send`` per frame).
* ``broadcaster``: encode/broadcaster with its asyncpg Postgres backend, one
  ``subscribe()`` per WebSocket, as its README shows.
* ``perconn``: a database connection per client (the seed's design).

``pgcast serve --workers N`` is run by the coordinator as the command itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import resource
import socket
import sys
from typing import Any

CHANNEL = "bench_gateway"
SUBSCRIBED = '{"type":"subscribed"}'
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_KEY = re.compile(rb"(?im)^sec-websocket-key:\s*(\S+)\s*$")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def message_json(channel: str, payload: str, pid: int) -> str:
    return json.dumps({"type": "message", "channel": channel, "payload": payload, "pid": pid},
                      separators=(",", ":"), ensure_ascii=False)


def text_frame(data: bytes) -> bytes:
    n = len(data)
    if n < 126:
        return bytes([0x81, n]) + data
    if n < 65536:
        return bytes([0x81, 126]) + n.to_bytes(2, "big") + data
    return bytes([0x81, 127]) + n.to_bytes(8, "big") + data


async def notifications(dsn: str) -> Any:
    """The channel's notifications, from one LISTEN connection.

    Read with pgcast's asyncio PubSub, the fastest receive path measured
    (benchmarks/RESULTS.md, "receive"; psycopg's own ``notifies()`` was far
    slower here), so every design gets notifications the same way and the
    rows compare the fan-out alone.
    """
    import pgcast
    import pgcast.aio

    async with await pgcast.aio.connect(dsn) as ps:
        await ps.listen(CHANNEL)
        async for event in ps.events():
            if isinstance(event, pgcast.Event):
                yield event


# -- floor -------------------------------------------------------------------

_FLOOR: set[asyncio.Transport] = set()


class _Floor(asyncio.Protocol):
    transport: asyncio.Transport

    def __init__(self) -> None:
        self.head = b""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:  # as asyncio, uvicorn and websockets do: no Nagle delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.open:
            return  # the subscribe frame and pongs: not needed here
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        match = _KEY.search(self.head)
        if match is None:
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(match.group(1) + _GUID).digest())
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                             + b"\r\n\r\n" + text_frame(SUBSCRIBED.encode()))
        self.open, self.head = True, b""
        _FLOOR.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        _FLOOR.discard(self.transport)


async def floor(port: int, dsn: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Floor, "127.0.0.1", port, backlog=4096)
    async with server:
        async for n in notifications(dsn):
            frame = text_frame(message_json(n.channel, n.payload, n.pid).encode())
            for transport in _FLOOR:
                transport.write(frame)


# -- websockets ----------------------------------------------------------------


async def websockets_server(port: int, dsn: str) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve
    from websockets.exceptions import ConnectionClosed

    # The load's clients leave by reset at the end: not worth a traceback each.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    clients: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        clients.add(ws)
        try:
            await ws.send(SUBSCRIBED)
            async for _ in ws:
                pass
        except ConnectionClosed:
            pass
        finally:
            clients.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, backlog=4096,
                     max_queue=16):
        async for n in notifications(dsn):
            broadcast(clients, message_json(n.channel, n.payload, n.pid))


# -- ASGI designs under uvicorn ------------------------------------------------


def asgi_app(design: str, dsn: str) -> Any:
    if design in ("pgcast", "pgcast-asgi"):
        from pgcast.gateway import create_app

        return create_app(dsn, allow=[CHANNEL], max_clients=100_000, queue_size=1000,
                          max_clients_per_address=None)

    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    if design == "broadcaster":
        from broadcaster import Broadcast

        broadcast = Broadcast(dsn)
        # broadcaster's subscribe() is not safe for concurrent first subscribers
        # (their LISTENs race on its one asyncpg connection): entering it one at
        # a time is the fix an application would have to make.
        entering = asyncio.Lock()

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> Any:
            await broadcast.connect()
            yield
            await broadcast.disconnect()

        async def bc_endpoint(ws: WebSocket) -> None:
            await ws.accept()
            subscription = broadcast.subscribe(channel=CHANNEL)
            async with entering:
                subscriber = await subscription.__aenter__()

            async def forward() -> None:
                async for event in subscriber:  # type: ignore[attr-defined]
                    await ws.send_text(event.message)

            try:
                await ws.send_text(SUBSCRIBED)
                await _until_disconnect(ws, forward())
            finally:
                async with entering:
                    await subscription.__aexit__(None, None, None)

        return Starlette(routes=[WebSocketRoute("/ws", bc_endpoint)], lifespan=lifespan)

    if design == "perconn":
        import pgcast
        import pgcast.aio

        async def pc_endpoint(ws: WebSocket) -> None:
            await ws.accept()
            async with await pgcast.aio.connect(dsn, application_name="bench-perconn") as ps:
                await ps.listen(CHANNEL)
                await ws.send_text(SUBSCRIBED)

                async def forward() -> None:
                    async for event in ps.events():
                        if isinstance(event, pgcast.Event):
                            await ws.send_text(message_json(event.channel, event.payload,
                                                            event.pid))

                await _until_disconnect(ws, forward())

        return Starlette(routes=[WebSocketRoute("/ws", pc_endpoint)])
    raise ValueError(f"unknown design {design!r}")


async def _until_disconnect(ws: Any, forward: Any) -> None:
    """Run *forward* until the client disconnects (or it ends)."""
    task = asyncio.ensure_future(forward)
    try:
        while not task.done():
            receiving = asyncio.ensure_future(ws.receive())
            await asyncio.wait([task, receiving], return_when=asyncio.FIRST_COMPLETED)
            if receiving.done():
                if receiving.result()["type"] == "websocket.disconnect":
                    return
            else:
                receiving.cancel()
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def serve(design: str, port: int, dsn: str) -> None:
    raise_nofile()
    if design in ("floor", "websockets"):
        import uvloop

        main = floor if design == "floor" else websockets_server
        uvloop.run(main(port, dsn))
        return
    from pgcast.gateway._serve import GatewayServer, config

    extra = {"ws": "websockets-sansio"} if design == "pgcast-asgi" else {}
    server = GatewayServer(config(asgi_app(design, dsn), "127.0.0.1", port, log_level="error",
                                  backlog=4096, timeout_graceful_shutdown=5, **extra))
    server.run()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
