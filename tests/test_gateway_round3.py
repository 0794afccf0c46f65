"""A determined client, round 3 (rounds 1 and 2: tests/test_gateway_attacks.py,
tests/test_gateway_doors.py). Real ``pgcast serve`` path (uvicorn, the direct
WebSocket protocol), real PostgreSQL, loopback only.

Holes these tests found (each failed before its fix): one address could take
every one of the gateway's ``max_channels`` (100 connections of 100 new
channels each), after which no other client could subscribe to a channel
nobody had yet; the server read client messages up to 1 MiB whatever
max_frame_bytes (16 KiB), so 100 connections each sending 1 MiB less a byte,
never finished, grew the process by 102 MB (one address: 1,000 connections).
"""

# ruff: noqa: F811  (the gateway fixture is imported, then requested by name)
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from pgcast import AccessDenied
from test_gateway_server import (
    TIMEOUT,
    Gateway,
    gateway,  # noqa: F401  (the fixture)
    recv,
    request,
    run,
    subscribe,
    ws_connect,
)


def _connected(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


# -- one address against everyone's channels -----------------------------------------


def test_one_address_cannot_take_every_channel_of_the_gateway(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
) -> None:
    """max_channels (distinct channels of all clients) was shared by all:
    one address with 2 connections of 4 new channels each took all 8, and
    a client from another address was refused any channel nobody had ("over
    its limit of 8 distinct channels"); with the defaults, 100 connections
    of 100 channels from one address did it to everyone. Now an address may
    create at most a quarter of max_channels (max_channels_per_address);
    channels someone already has cost it nothing."""
    gw = gateway(max_channels=8)
    mine = [f"{unique_channel}_a{i}" for i in range(8)]

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            one = await stack.enter_async_context(
                ws_connect(gw.ws, sock=_connected(gw.port, "127.0.0.1")))
            two = await stack.enter_async_context(
                ws_connect(gw.ws, sock=_connected(gw.port, "127.0.0.1")))
            await subscribe(one, *mine[:2])
            reply = await request(two, {"type": "subscribe", "channels": mine[2:4]})
            assert reply["type"] == "error", reply
            assert "2 channels created from 127.0.0.1" in reply["message"]
            assert "max_channels_per_address" in reply["message"]
            # The SSE door counts the same.
            async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
                r = await client.get(f"{gw.http}/sse", params={"channel": mine[4]})
                assert r.status_code == 429 and "max_channels_per_address" in r.text, r.text
            # Another address is served, on both doors.
            honest = await stack.enter_async_context(
                ws_connect(gw.ws, sock=_connected(gw.port, "127.0.0.2")))
            await subscribe(honest, f"{unique_channel}_b0", f"{unique_channel}_b1")
            async with httpx.AsyncClient(
                trust_env=False, timeout=TIMEOUT,
                transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2"),
            ) as client, client.stream("GET", f"{gw.http}/sse",
                                       params={"channel": mine[0]}) as r:
                assert r.status_code == 200
            # Channels that exist cost nothing; one given up makes room.
            await subscribe(two, mine[0], f"{unique_channel}_b0")
            await request(one, {"type": "unsubscribe", "channels": [mine[1]]})
            await asyncio.sleep(0)  # nothing to wait for: the room is counted at once
            await subscribe(two, mine[2])
            await asyncio.to_thread(psql, f"NOTIFY \"{mine[2]}\", 'ok'")
            frame = await recv(two)
            assert (frame["channel"], frame["payload"]) == (mine[2], "ok")

    run(main())


def test_pgcast_serve_max_channels_per_address_option() -> None:
    from pgcast.cli import build_parser
    from pgcast.cli._common import UsageError
    from pgcast.cli.gateway import channels_per_address
    from pgcast.gateway._client import Settings

    parser = build_parser()
    assert channels_per_address(parser.parse_args(["serve"]).max_channels_per_address) == "auto"
    assert channels_per_address(parser.parse_args(
        ["serve", "--max-channels-per-address", "7"]).max_channels_per_address) == 7
    assert channels_per_address(0) is None
    with pytest.raises(UsageError, match="0 \\(no cap\\) or more"):
        channels_per_address(-1)
    assert Settings(max_channels=10_000).channels_per_address == 2500
    assert Settings(max_channels=None).channels_per_address is None
    assert Settings(max_channels_per_address=3).channels_per_address == 3
    with pytest.raises(ValueError, match="max_channels_per_address must be"):
        Settings(max_channels_per_address=0)


# -- big and fragmented messages on the direct WebSocket path ---------------------


def _ws_raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _header(length: int, opcode: int = 1, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    return head + b"\0\0\0\0"  # the mask: zero, so the payload goes as it is


def _close_frame(sock: socket.socket) -> tuple[int, str]:
    data = b""
    while True:  # bounded by the socket's timeout
        chunk = sock.recv(4096)
        assert chunk, f"closed without a close frame: {data!r}"
        data += chunk
        if len(data) >= 2 and data[0] == 0x88 and len(data) >= 2 + (data[1] & 0x7F):
            body = data[2:2 + (data[1] & 0x7F)]
            return struct.unpack("!H", body[:2])[0], body[2:].decode()
        if len(data) >= 2 and data[0] != 0x88:
            raise AssertionError(f"a frame that is not a close: {data[:80]!r}")


def test_a_message_over_four_times_max_frame_bytes_is_refused_unread(
    gateway: Callable[..., Gateway],
) -> None:
    """A message of up to 4 x max_frame_bytes is read and answered with an
    error frame (the connection stays); a bigger one, whole or in fragments,
    closes the connection (1009, naming the limit) as soon as its header
    says so. Before, the server waited for up to 1 MiB of it (no close)."""
    gw = gateway(max_frame_bytes=1000)

    async def within() -> None:
        async with ws_connect(gw.ws) as ws:
            reply = await request(ws, {"type": "ping", "pad": "x" * 3000})
            assert reply["type"] == "error" and "the limit is 1000 bytes" in reply["message"]
            assert (await request(ws, {"type": "ping"}))["type"] == "pong"

    run(within())
    with _ws_raw(gw.port) as sock:
        sock.sendall(_header(4001))  # no payload: refused on the header alone
        code, reason = _close_frame(sock)
        assert code == 1009 and "4000" in reason, (code, reason)
    with _ws_raw(gw.port) as sock:  # in fragments: counted over the message
        sock.sendall(_header(3000, fin=False) + b"x" * 3000 + _header(3000, opcode=0))
        code, reason = _close_frame(sock)
        assert code == 1009 and "4000" in reason, (code, reason)


def test_pgcast_serve_reads_messages_up_to_four_times_max_frame_bytes() -> None:
    from pgcast.gateway import create_app
    from pgcast.gateway._serve import config

    assert config(create_app("postgresql://nowhere", allow=["a"])).ws_max_size == 65536
    small = create_app("postgresql://nowhere", allow=["a"], max_frame_bytes=100)
    assert config(small).ws_max_size == 400
    assert config(small, ws_max_size=5000).ws_max_size == 5000


# -- attacks that were already refused ---------------------------------------------


def _raw(port: int, request: str) -> list[str]:
    """The status lines of every response to *request* (raw HTTP), read
    until the server closes or goes quiet for a second."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request.encode("latin-1"))
        sock.settimeout(1.0)
        data = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                data += chunk
    return [line for line in data.decode("latin-1").split("\r\n")
            if line.startswith("HTTP/1.")]


@pytest.mark.parametrize("request_", [
    # Content-Length and Transfer-Encoding both, in either order.
    "GET /healthz HTTP/1.1\r\nHost: h\r\nContent-Length: 40\r\nTransfer-Encoding: chunked"
    "\r\n\r\n0\r\n\r\n{smuggled}",
    "GET /healthz HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 4"
    "\r\n\r\n5c\r\n{smuggled}0\r\n\r\n",
    "GET /healthz HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n"
    "{smuggled}",
    "GET /healthz HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}",
    "GET /healthz HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{smuggled}",
    "GET /healthz HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    "{smuggled}",
    "GET /healthz HTTP/1.1\nHost: h\nContent-Length: 44\n\n{smuggled}",  # bare LF
    "GET /healthz HTTP/1.1\r\nHost: h\r\nX: a\r\n Content-Length: 44\r\n\r\n{smuggled}",
], ids=["CL.TE", "TE.CL", "CL.CL", "TE-xchunked", "TE-space", "TE-list", "bare-LF",
        "obs-fold"])
def test_request_smuggling_framings_get_400_and_nothing_more(
    gateway: Callable[..., Gateway], request_: str,
) -> None:
    """Already refused (uvicorn's httptools): each ambiguous framing gets
    one 400 and the connection ends; the request hidden in it (/metrics,
    which would be answered to a loopback peer) is never answered."""
    gw = gateway()
    smuggled = "GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n"
    assert _raw(gw.port, request_.replace("{smuggled}", smuggled)) == [
        "HTTP/1.1 400 Bad Request"]


def test_lookalike_origins_are_refused_on_both_doors_with_a_cookie(
    gateway: Callable[..., Gateway], unique_channel: str,
) -> None:
    """Already refused: cross-site WebSocket hijacking with the user's
    cookie from origins that resemble the gateway's own (null, userinfo,
    a longer host, a trailing dot, another port), on the WebSocket
    and the SSE door. (The scheme is not compared: behind a TLS proxy the
    gateway cannot tell http from https; see the report of round 3.)"""
    from pgcast.gateway import Access

    def authorizer(connection: object, token: str | None) -> Access:
        if token != "alice-session":
            raise AccessDenied("no session")
        return Access.globs(read=[unique_channel])

    gw = gateway(authorizer=authorizer, allow=())
    host = f"127.0.0.1:{gw.port}"
    key = base64.b64encode(os.urandom(16)).decode()
    cookie = "Cookie: pgcast_token=alice-session\r\n"
    for origin in ("null", f"http://{host}@evil.example", f"http://{host}.evil.example",
                   f"http://127.0.0.1.:{gw.port}", f"http://127.0.0.1:{gw.port + 1}"):
        ws = _raw(gw.port, f"GET /ws HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n{cookie}"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert ws == ["HTTP/1.1 403 Forbidden"], (origin, ws)
        sse = _raw(gw.port, f"GET /sse?channel={unique_channel} HTTP/1.1\r\nHost: {host}\r\n"
                            f"Origin: {origin}\r\n{cookie}Connection: close\r\n\r\n")
        assert sse == ["HTTP/1.1 403 Forbidden"], (origin, sse)
    # The gateway's own origin, with the cookie: served.
    ok = _raw(gw.port, f"GET /sse?channel={unique_channel} HTTP/1.1\r\nHost: {host}\r\n"
                       f"Origin: http://{host}\r\n{cookie}Connection: close\r\n\r\n")
    assert ok == ["HTTP/1.1 200 OK"]


def test_names_that_quote_differently_in_sql_are_their_own_channels(
    gateway: Callable[..., Gateway], unique_channel: str, conn: psycopg.Connection[Any],
) -> None:
    """Already right: names with a double quote, a quote, a backslash, a
    semicolon, dollar quotes, a space and mixed case, allowed by a glob,
    are LISTENed as themselves on both doors: pg_notify on each exact name
    reaches its subscriber and no other, and nothing runs as SQL."""
    names = [f'{unique_channel}"; NOTIFY x; --', f"{unique_channel}'b", f"{unique_channel}\\b",
             f"{unique_channel};b", f"{unique_channel}$$b", f"{unique_channel} b",
             f"{unique_channel}Ab"]
    gw = gateway(allow=[f"{unique_channel}*"])

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            await subscribe(ws, *names)
            async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
                    client.stream("GET", f"{gw.http}/sse",
                                  params=[("channel", n) for n in names]) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()

                async def next_event() -> dict[str, Any]:
                    while True:
                        line = await asyncio.wait_for(anext(lines), TIMEOUT)
                        if line.startswith("data: "):
                            event: dict[str, Any] = json.loads(line[6:])
                            return event

                assert (await next_event())["type"] == "subscribed"
                for i, name in enumerate(names):
                    await asyncio.to_thread(conn.execute, "SELECT pg_notify(%s, %s)",
                                            (name, str(i)))
                    frame = await recv(ws)
                    assert (frame["channel"], frame["payload"]) == (name, str(i))
                    data = await next_event()
                    assert (data["channel"], data["payload"]) == (name, str(i))
                # The lower-case spelling is another channel.
                await asyncio.to_thread(conn.execute, "SELECT pg_notify(%s, 'other')",
                                        (names[-1].lower(),))
                await asyncio.to_thread(conn.execute, "SELECT pg_notify(%s, 'last')",
                                        (names[0],))
                frame = await recv(ws)
                assert frame["payload"] == "last"
        assert all(n in gw.hub.listening() for n in names)

    run(main())
