"""Issue 10: frames encoded once and written straight to each client's socket.

Under ``pgcast serve`` (:mod:`pgcast.gateway._wsdirect`) a WebSocket client
has no sender task: a frame goes to its socket when nothing is queued before
it, and waits in its bounded queue while the socket is full. These tests
check that the direct path is the one in use, that a client with a backlog
gets every frame once and in order (a reply included: nothing overtakes a
queued frame), on the direct path and on the generic ASGI one, and that the
bytes written are the ones built once per notification.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from _serving import serving
from pgcast.gateway import _frame, _protocol
from test_gateway_server import (
    TIMEOUT,
    Gateway,
    burst_sql,
    gateway,  # noqa: F401  (the fixture)
    recv,
    run,
    stalled_client,
    subscribe,
    ws_connect,
)


def test_pgcast_serve_writes_to_the_socket_and_the_asgi_path_queues(
    gateway: Callable[..., Gateway],  # noqa: F811
    conn: psycopg.Connection[Any],
    unique_channel: str,
) -> None:
    direct = gateway()
    generic = gateway(ws="asgi")

    async def main() -> None:
        async with ws_connect(direct.ws) as a, ws_connect(generic.ws) as b:
            await subscribe(a, unique_channel)
            await subscribe(b, unique_channel)
            wires = [c.outbox.wire for c in direct.hub._clients.values()]
            assert len(wires) == 1 and wires[0] is not None
            assert [c.outbox.wire for c in generic.hub._clients.values()] == [None]
            await asyncio.to_thread(conn.execute, f"NOTIFY {unique_channel}, 'both'")
            for ws in (a, b):
                frame = await recv(ws)
                assert frame["payload"] == "both"

    run(main())


@pytest.mark.parametrize("ws", ["direct", "asgi"])
def test_a_backlog_is_written_out_once_and_in_order_replies_included(
    gateway: Callable[..., Gateway],  # noqa: F811
    conn: psycopg.Connection[Any],
    unique_channel: str,
    ws: str,
) -> None:
    """A client stops reading while 400 messages of 4 kB come (its socket
    fills, the rest waits in its queue), asks for a pong meanwhile, then reads
    again: every message once, in order, and the pong after the messages
    that were queued before it was asked for."""
    gw = gateway(queue_size=2000, sndbuf=16384, ws=ws)
    count = 400

    async def main() -> None:
        slow = await stalled_client(gw.ws)
        try:
            await slow.send(json.dumps({"type": "subscribe", "channels": [unique_channel]}))
            await asyncio.to_thread(
                gw.wait_metric, "pgcast_gateway_subscriptions", lambda v: v == 1
            )
            await asyncio.to_thread(conn.execute, burst_sql(unique_channel, count))
            await asyncio.to_thread(
                gw.wait_metric, "pgcast_gateway_messages_in_total", lambda v: v == count
            )
            # The backlog is real: frames wait in the client's queue.
            deadline = time.monotonic() + TIMEOUT
            while not any(len(c.outbox) for c in gw.hub._clients.values()):
                assert time.monotonic() < deadline, "no frame was ever queued"
                await asyncio.sleep(0.01)
            await slow.send(json.dumps({"type": "ping", "ref": "p"}))
            assert (await recv(slow))["type"] == "subscribed"
            payloads: list[int] = []
            pong_after = None
            for _ in range(count + 2):
                frame = await recv(slow)
                if frame["type"] == "pong":
                    pong_after = len(payloads)
                    if len(payloads) == count:
                        break
                    continue
                assert frame["type"] == "message", frame
                payloads.append(int(frame["payload"].lstrip("x")))
                if len(payloads) == count and pong_after is not None:
                    break
            assert payloads == list(range(1, count + 1))
            # Queued after the messages the burst had queued before the ping.
            assert pong_after is not None and pong_after > 0
            assert gw.metrics()["pgcast_gateway_messages_out_total"] == count
        finally:
            await slow.close()

    run(main())


def test_the_bytes_on_the_wire_are_built_once_per_notification() -> None:
    frame = _protocol.message("ch", "é" * 200, 7, 42)
    wire = frame.ws
    assert frame.ws is wire  # built once, then shared
    text = frame.text.encode()
    # An unmasked text frame: FIN + opcode 1, a 16-bit length, the text.
    assert wire[:2] == b"\x81\x7e" and int.from_bytes(wire[2:4], "big") == len(text)
    assert wire[4:] == text
    small = _frame.ws_text_frame("hi")
    assert small == b"\x81\x02hi"
    big = _frame.ws_text_frame("x" * 70_000)
    assert big[:2] == b"\x81\x7f" and int.from_bytes(big[2:10], "big") == 70_000
    assert frame.sse_data is frame.sse_data
    assert frame.sse_data == _protocol.sse_event(frame.text).encode()
    assert _protocol.sse_event("a\nb", "3") == "id: 3\ndata: a\ndata: b\n\n"


def test_requests_sent_at_once_are_answered_in_order_and_a_leaving_client_is_forgotten(
    gateway: Callable[..., Gateway],  # noqa: F811
    conn: psycopg.Connection[Any],
    unique_channel: str,
) -> None:
    """A handed-over client has no task of its own: requests sent without
    waiting are carried out one at a time, in order (a subscribe that waits
    for LISTEN delays the pings behind it); when it leaves, it is detached
    and its channel UNLISTENed."""
    gw = gateway()
    other = unique_channel + "_b"

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            frames = [
                {"type": "subscribe", "channels": [unique_channel], "ref": 1},
                {"type": "ping", "ref": 2},
                {"type": "subscribe", "channels": [other], "ref": 3},
                {"type": "not a type", "ref": 4},
                {"type": "unsubscribe", "channels": [other], "ref": 5},
                {"type": "ping", "ref": 6},
            ]
            for f in frames:
                await ws.send(json.dumps(f))
            replies = [await recv(ws) for _ in frames]
            # (A frame that does not parse gets an error without its ref.)
            assert [r.get("ref") for r in replies] == [1, 2, 3, None, 5, 6]
            assert [r["type"] for r in replies] == [
                "subscribed", "pong", "subscribed", "error", "unsubscribed", "pong"]
            [client] = gw.hub._clients.values()
            assert client.outbox.wire is not None  # handed over, no sender task
            await asyncio.to_thread(conn.execute, f"NOTIFY {unique_channel}, 'x'")
            assert (await recv(ws))["payload"] == "x"
        await asyncio.to_thread(
            gw.wait_metric, 'pgcast_gateway_clients{transport="websocket"}', lambda v: v == 0)
        deadline = time.monotonic() + TIMEOUT
        while unique_channel in gw.hub.listening():
            assert time.monotonic() < deadline, "the channel was never UNLISTENed"
            await asyncio.sleep(0.02)

    run(main())


def test_a_request_right_behind_the_auth_frame_is_not_lost(
    gateway: Callable[..., Gateway],  # noqa: F811
    unique_channel: str,
) -> None:
    """A client that authenticates with its first frame and sends its
    subscribe right behind it, without waiting: the subscribe may arrive
    while the endpoint still reads through ASGI, before the hand-over; it was
    lost there (and reading stayed paused: no answer ever). Every time, both
    replies come, in order."""
    from pgcast import AccessDenied
    from pgcast.gateway import Access

    def authorizer(connection: Any, token: str | None) -> Access:
        if token != "t":
            raise AccessDenied("unknown token")
        return Access.globs(read=[unique_channel])

    gw = gateway(authorizer=authorizer, allow=[])

    async def main() -> None:
        for attempt in range(20):
            async with ws_connect(gw.ws) as ws:
                await ws.send(json.dumps({"type": "auth", "token": "t", "ref": "a"}))
                await ws.send(json.dumps({"type": "subscribe", "channels": [unique_channel],
                                          "ref": "s"}))
                await ws.send(json.dumps({"type": "ping", "ref": "p"}))
                replies = [await recv(ws) for _ in range(3)]
                assert [r["type"] for r in replies] == ["authenticated", "subscribed", "pong"], (
                    attempt, replies)

    run(main())


def test_a_host_app_on_plain_uvicorn_with_pgcasts_protocol_gets_the_direct_path(
    dsn: str, conn: psycopg.Connection[Any], unique_channel: str
) -> None:
    """The README's advice: uvicorn.run(host_app, ws=pgcast.gateway.WebSocketProtocol)
    with the gateway mounted under a prefix: its clients are written to directly."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from pgcast.gateway import WebSocketProtocol, create_app

    realtime = create_app(dsn, allow=[unique_channel])
    host = Starlette(routes=[Mount("/rt", app=realtime)],
                     lifespan=lambda app: realtime.gateway.running())

    async def main(port: int) -> None:
        async with ws_connect(f"ws://127.0.0.1:{port}/rt/ws") as ws:
            await subscribe(ws, unique_channel)
            hub = realtime.state.pgcast_gateway
            assert [c.outbox.wire is not None for c in hub._clients.values()] == [True]
            await asyncio.to_thread(conn.execute, f"NOTIFY {unique_channel}, 'hi'")
            assert (await recv(ws))["payload"] == "hi"

    config = uvicorn.Config(host, ws=WebSocketProtocol, log_level="warning")
    with serving(lambda port: uvicorn.Server(config), TIMEOUT) as port:
        run(main(port))


def test_the_handed_over_path_takes_binary_json_and_closes_on_invalid_utf8(
    gateway: Callable[..., Gateway],  # noqa: F811
    unique_channel: str,
) -> None:
    """Another door to the same parser: a subscribe in a binary frame is
    carried out like a text one; a text frame that is not UTF-8 closes the
    connection with 1007 (invalid data) and nothing of it reaches the hub."""
    import socket

    gw = gateway()

    def masked(opcode: int, data: bytes) -> bytes:
        key = b"\x01\x02\x03\x04"
        return (bytes([0x80 | opcode, 0x80 | len(data)]) + key
                + bytes(b ^ key[i % 4] for i, b in enumerate(data)))

    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT)
    try:
        sock.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            assert chunk, "closed during the handshake"
            buf += chunk
        assert buf.startswith(b"HTTP/1.1 101")
        buf = buf.split(b"\r\n\r\n", 1)[1]
        sub = json.dumps({"type": "subscribe", "channels": [unique_channel]}).encode()
        sock.sendall(masked(0x2, sub))  # binary
        while b'"subscribed"' not in buf:
            chunk = sock.recv(4096)
            assert chunk, "closed before the subscribed reply"
            buf += chunk
        sock.sendall(masked(0x1, b'{"type": "ping", "x": "\xff"}'))  # not UTF-8
        rest = b""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
            if rest.startswith(b"\x88"):
                break
        assert rest[:1] == b"\x88", rest  # a close frame, not a pong
        assert int.from_bytes(rest[2:4], "big") == 1007
    finally:
        sock.close()
    gw.wait_metric('pgcast_gateway_clients{transport="websocket"}', lambda v: v == 0)
