"""Tokens outside URLs and out of logs (issue 12 item 3), and access that
expires (the hook the JWT authorizer uses).

Every way a token can come is tried against an authorizer that knows two
tokens, over WebSocket and SSE; the log test runs ``pgcast serve`` and reads
everything it printed. Loopback only; every wait has a timeout.
"""

# ruff: noqa: F811  (the gateway fixture is imported, then requested by name)
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pgcast import AccessDenied
from pgcast.gateway import Access
from pgcast.gateway._logging import RedactTokens, log_config, redact
from test_gateway_serve_ops import serve
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

SECRET = "s3cr3t-token-value"


def test_redact_every_spelling_of_a_token_parameter() -> None:
    for text, kept in [
        (f"/ws?token={SECRET}", "/ws?token=[redacted]"),
        (f"/sse?channel=a&token={SECRET}&x=1", "/sse?channel=a&token=[redacted]&x=1"),
        (f"/sse?tok%65n={SECRET}", "/sse?tok%65n=[redacted]"),
        (f"/sse?TOKEN={SECRET}", "/sse?TOKEN=[redacted]"),
        (f"/sse?access_token={SECRET}", "/sse?access_token=[redacted]"),
        (f'"GET /sse?token={SECRET} HTTP/1.1" 200', '"GET /sse?token=[redacted] HTTP/1.1" 200'),
        (f"/ws?a=1;token={SECRET}", "/ws?a=1;token=[redacted]"),
        ("/sse?channel=token", "/sse?channel=token"),
    ]:
        assert redact(text) == kept
    record = __import__("logging").LogRecord(
        "uvicorn.access", 20, "", 0, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", f"/sse?token={SECRET}", "1.1", 200), None,
    )
    assert RedactTokens().filter(record)
    assert SECRET not in record.getMessage()
    config = log_config()
    assert all("redact_tokens" in h["filters"] for h in config["handlers"].values())


def test_pgcast_serve_never_logs_a_token(dsn: str) -> None:
    with serve(dsn, allow="tokens_test") as (port, output):
        async def main() -> None:
            for query in (f"token={SECRET}", f"tok%65n={SECRET}", f"access_token={SECRET}"):
                async with ws_connect(f"ws://127.0.0.1:{port}/ws?{query}") as ws:
                    await subscribe(ws, "tokens_test")
                async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
                    url = f"http://127.0.0.1:{port}/sse?channel=tokens_test&{query}"
                    async with client.stream("GET", url) as r:
                        assert r.status_code == 200
                    await client.get(f"http://127.0.0.1:{port}/nowhere?{query}")

        run(main())
    out = output[0]
    assert "/ws?token=[redacted]" in out and "/sse?channel=tokens_test&token=[redacted]" in out
    assert "tok%65n=[redacted]" in out
    assert SECRET not in out


def _authorizer(channel: str, expires: dict[str, float] | None = None) -> Any:
    tokens = {"alice": [f"{channel}.alice"], "bob": [f"{channel}.bob"]}

    async def authorize(connection: Any, token: str | None) -> Access:
        if token not in tokens:
            raise AccessDenied("unknown token" if token else "a token is required")
        return Access.globs(read=tokens[token], write=tokens[token],
                            expires=(expires or {}).get(token))

    return authorize


def test_every_way_of_sending_a_token(
    gateway: Callable[..., Gateway], unique_channel: str
) -> None:
    alice = f"{unique_channel}.alice"
    gw = gateway(authorizer=_authorizer(unique_channel), allow=(), auth_timeout=1.0)
    any_origin = gateway(authorizer=_authorizer(unique_channel), allow=(),
                         allowed_origins=["*"])

    async def main() -> None:
        # A cookie, over both transports.
        async with ws_connect(gw.ws, additional_headers={"Cookie": "pgcast_token=alice"}) as ws:
            await subscribe(ws, alice)
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT,
                                     cookies={"pgcast_token": "alice"}) as client, \
                client.stream("GET", f"{gw.http}/sse?channel={alice}") as r:
            assert r.status_code == 200
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT,
                                     cookies={"pgcast_token": "mallory"}) as client:
            r2 = await client.get(f"{gw.http}/sse?channel={alice}")
            assert r2.status_code == 403 and "unknown token" in r2.text
        # The subprotocol, which the gateway selects as "pgcast".
        async with ws_connect(gw.ws, subprotocols=["pgcast", "pgcast.token.alice"]) as ws:
            assert ws.subprotocol == "pgcast"
            await subscribe(ws, alice)
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(gw.ws, subprotocols=["pgcast", "pgcast.token.mallory"]):
                pass
        assert info.value.response.status_code == 403
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(gw.ws, subprotocols=["pgcast.token.alice"]):
                pass
        assert info.value.response.status_code == 400
        # The first frame.
        async with ws_connect(gw.ws) as ws:
            assert await request(ws, {"type": "auth", "token": "alice", "ref": 1}) == {
                "type": "authenticated", "ref": 1}
            await subscribe(ws, alice)
        for first, reason in [
            ({"type": "subscribe", "channels": [alice]}, "authenticate first"),
            ({"type": "auth", "token": "mallory"}, "token refused: unknown token"),
            ({"type": "auth", "token": 5}, "authenticate first"),
            (None, "within 1 s"),
        ]:
            async with ws_connect(gw.ws) as ws:
                if first is not None:
                    await ws.send(json.dumps(first))
                with pytest.raises(ConnectionClosed) as closed:
                    await recv(ws, timeout=TIMEOUT)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003
                assert reason in closed.value.rcvd.reason, closed.value.rcvd.reason
        # With every origin allowed, a cookie is no token (any site's page
        # would send the user's cookie).
        async with ws_connect(any_origin.ws, origin="http://evil.example",
                              additional_headers={"Cookie": "pgcast_token=alice"}) as ws:
            await ws.send(json.dumps({"type": "subscribe", "channels": [alice]}))
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws, timeout=TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003
        # Bob's token cannot read alice's channel, however it came.
        async with ws_connect(gw.ws, additional_headers={"Cookie": "pgcast_token=bob"}) as ws:
            reply = await request(ws, {"type": "subscribe", "channels": [alice]})
            assert reply["type"] == "error"

    run(main())


def test_access_expires_unless_a_fresh_token_comes(
    gateway: Callable[..., Gateway], unique_channel: str
) -> None:
    alice, bob = f"{unique_channel}.alice", f"{unique_channel}.bob"
    expires: dict[str, float] = {}
    gw = gateway(authorizer=_authorizer(unique_channel, expires), allow=())

    async def main() -> None:
        expires["alice"] = time.time() + 1.0
        async with ws_connect(f"{gw.ws}?token=alice") as ws:
            await subscribe(ws, alice)
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(100):
                    await recv(ws, timeout=TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
            assert "access expired" in closed.value.rcvd.reason
        # Refreshed in time: the connection outlives the first expiry.
        expires["alice"] = time.time() + 1.0
        async with ws_connect(f"{gw.ws}?token=alice") as ws:
            await subscribe(ws, alice)
            expires["alice"] = time.time() + 60
            reply = await request(ws, {"type": "auth", "token": "alice"})
            assert reply["type"] == "authenticated" and reply["expires"] > time.time() + 50
            await asyncio.sleep(1.5)
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}
            # A refused token changes nothing; another user's drops alice's channel.
            reply = await request(ws, {"type": "auth", "token": "mallory"})
            assert reply["type"] == "error" and "token refused" in reply["message"]
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}
            assert await request(ws, {"type": "auth", "token": "bob"}) == {
                "type": "unsubscribed", "channels": [alice]}
            assert (await recv(ws))["type"] == "authenticated"
            await subscribe(ws, bob)
        # An expired token never gets in.
        expires["alice"] = time.time() - 1
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(f"{gw.ws}?token=alice"):
                pass
        assert info.value.response.status_code == 403

    run(main())
    assert gw.metrics()['pgcast_gateway_disconnects_total{reason="expired"}'] == 1
