"""A determined client, round 3 (rounds 1 and 2: tests/test_gateway_attacks.py,
tests/test_gateway_doors.py). Real ``pgcast serve`` path (uvicorn, the direct
WebSocket protocol), real PostgreSQL, loopback only.

Holes these tests found (each failed before its fix): one address could take
every one of the gateway's ``max_channels`` (100 connections of 100 new
channels each), after which no other client could subscribe to a channel
nobody had yet.
"""

# ruff: noqa: F811  (the gateway fixture is imported, then requested by name)
from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import httpx
import pytest

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
