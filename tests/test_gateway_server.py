"""The gateway served for real: uvicorn on a free loopback port, real PostgreSQL.

Clients are the ``websockets`` library and httpx (SSE); notifications come
from psql. Every wait has a timeout that fails the test loudly.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from _serving import serving
from pgcast import AccessDenied
from pgcast.embedded import EmbeddedServer
from pgcast.gateway import Access, create_app
from pgcast.gateway._hub import Hub
from pgcast.gateway._serve import GatewayServer, config

TIMEOUT = 10.0


@dataclass
class Gateway:
    """A gateway running in a background thread."""

    port: int
    hub: Hub
    server: GatewayServer
    thread: threading.Thread

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {sample name with labels: value}."""
        r = httpx.get(f"{self.http}/metrics", timeout=TIMEOUT, trust_env=False)
        assert r.status_code == 200
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_metric(
        self, name: str, check: Callable[[float], bool], timeout: float = TIMEOUT
    ) -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.metrics().get(name)
            if value is not None and check(value):
                return value
            time.sleep(0.05)
        raise AssertionError(f"metric {name} still {value} after {timeout} s")


@pytest.fixture
def gateway(dsn: str) -> Iterator[Callable[..., Gateway]]:
    """``gateway(**create_app options, sndbuf=None, ws=None, server_options=None)``:
    start a gateway on a free port; *ws* "asgi" serves WebSockets with
    uvicorn's own protocol (the generic ASGI path) instead of pgcast serve's
    direct one; *server_options* go to uvicorn (``ssl_certfile`` ...)."""
    running: list[Gateway] = []

    def start(*, sndbuf: int | None = None, ws: str | None = None,
              server_options: dict[str, Any] | None = None, **options: Any) -> Gateway:
        options.setdefault("allow", ["*"])
        app = create_app(options.pop("dsn", dsn), **options)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sndbuf is not None:
            # Inherited by accepted sockets: a small buffer makes a stalled
            # client fill up after little data.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        extra = {"ws": "websockets-sansio"} if ws == "asgi" else {}
        extra.update(server_options or {})
        server = GatewayServer(config(app, "127.0.0.1", port, log_level="warning",
                                      timeout_graceful_shutdown=3, **extra))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                thread.join(TIMEOUT)
                sock.close()  # uvicorn closes it only after a start
                raise AssertionError("the gateway did not start")
            time.sleep(0.02)
        gw = Gateway(port, app.state.pgcast_gateway, server, thread)
        running.append(gw)
        return gw

    yield start
    for gw in running:
        gw.server.should_exit = True
    for gw in running:
        gw.thread.join(30)
        assert not gw.thread.is_alive(), "the gateway did not shut down"


def ws_connect(url: str, **kwargs: Any) -> Any:
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("open_timeout", TIMEOUT)
    kwargs.setdefault("compression", None)
    return connect(url, **kwargs)


async def recv(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    try:
        text = await asyncio.wait_for(ws.recv(), timeout)
    except TimeoutError:
        raise AssertionError(f"no frame within {timeout} s") from None
    frame: dict[str, Any] = json.loads(text)
    return frame


async def request(ws: ClientConnection, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(frame))
    return await recv(ws)


async def subscribe(ws: ClientConnection, *channels: str) -> None:
    reply = await request(ws, {"type": "subscribe", "channels": list(channels)})
    reply.pop("epoch", None)  # present when a channel is durable (tests/test_gateway_gaps.py)
    assert reply == {"type": "subscribed", "channels": list(channels)}


async def apsql(psql: Callable[..., str], sql: str) -> str:
    return await asyncio.to_thread(psql, sql)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


# -- receiving -----------------------------------------------------------------


def test_websocket_client_receives_notify_from_psql(
    gateway: Callable[..., Gateway], psql: Callable[..., str], unique_channel: str
) -> None:
    gw = gateway()

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            await subscribe(ws, unique_channel)
            # "subscribed" means LISTEN is in effect: a NOTIFY right after it arrives.
            await apsql(psql, f"NOTIFY {unique_channel}, 'green'")
            frame = await recv(ws)
            assert frame["type"] == "message"
            assert frame["channel"] == unique_channel
            assert frame["payload"] == "green"
            assert isinstance(frame["pid"], int) and frame["pid"] != gw.hub.backend_pid
            await apsql(psql, f"SELECT pg_notify('{unique_channel}', 'ünïcødé ' || i) "
                              "FROM generate_series(1, 3) AS i")
            assert [(await recv(ws))["payload"] for _ in range(3)] == [
                f"ünïcødé {i}" for i in (1, 2, 3)
            ]

    run(main())


def test_subscribed_is_sent_only_once_listen_is_in_effect(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], unique_channel: str
) -> None:
    gw = gateway()

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            for i in range(20):
                channel = f"{unique_channel}_{i}"
                await subscribe(ws, channel)
                await asyncio.to_thread(conn.execute, "SELECT pg_notify(%s, 'x')", (channel,))
                frame = await recv(ws)
                assert (frame["type"], frame["channel"]) == ("message", channel)

    run(main())


def sse_events(lines: list[str]) -> list[dict[str, Any]]:
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: "):]))
    return events


def test_sse_client_receives_notify_from_psql(
    gateway: Callable[..., Gateway], psql: Callable[..., str], unique_channel: str
) -> None:
    gw = gateway(heartbeat=0.2)

    async def main() -> None:
        other = f"{unique_channel}_b"
        url = f"{gw.http}/sse?channel={unique_channel}&channel={other}"
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
                client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()

            async def next_event() -> dict[str, Any]:
                while True:
                    line = await asyncio.wait_for(anext(lines), TIMEOUT)
                    if line.startswith("data: "):
                        event: dict[str, Any] = json.loads(line[6:])
                        return event

            assert await next_event() == {"type": "subscribed",
                                          "channels": [unique_channel, other]}
            await apsql(psql, f"NOTIFY {unique_channel}, 'one'")
            await apsql(psql, f"NOTIFY {other}, 'two'")
            first, second = await next_event(), await next_event()
            assert (first["channel"], first["payload"]) == (unique_channel, "one")
            assert (second["channel"], second["payload"]) == (other, "two")
            # Heartbeat comments keep a quiet stream alive.
            seen = []
            deadline = time.monotonic() + TIMEOUT
            while ": heartbeat" not in seen and time.monotonic() < deadline:
                seen.append(await asyncio.wait_for(anext(lines), TIMEOUT))
            assert ": heartbeat" in seen

    run(main())
    gw.wait_metric('pgcast_gateway_clients{transport="sse"}', lambda v: v == 0)
    gw.wait_metric("pgcast_gateway_channels", lambda v: v == 0)


# -- access control ------------------------------------------------------------


def test_unauthorized_subscribe_is_refused(
    gateway: Callable[..., Gateway], psql: Callable[..., str], unique_channel: str
) -> None:
    gw = gateway(allow=[f"{unique_channel}_ok*"])

    async def main() -> None:
        ok, secret = f"{unique_channel}_ok1", f"{unique_channel}_secret"
        async with ws_connect(gw.ws) as ws:
            reply = await request(ws, {"type": "subscribe", "channels": [ok, secret], "ref": 1})
            assert reply["type"] == "error" and reply["ref"] == 1
            assert f"not allowed to subscribe to '{secret}'" in reply["message"]
            # All or nothing: the allowed channel was not subscribed either.
            await apsql(psql, f"NOTIFY {ok}, 'early'; NOTIFY {secret}, 'hidden'")
            await subscribe(ws, ok)
            await apsql(psql, f"NOTIFY {secret}, 'hidden'; NOTIFY {ok}, 'late'")
            assert (await recv(ws))["payload"] == "late"
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            r = await client.get(f"{gw.http}/sse?channel={secret}")
            assert r.status_code == 403
            assert f"not allowed to subscribe to '{secret}'" in r.text
            r = await client.get(f"{gw.http}/sse")
            assert r.status_code == 400 and "at least one channel" in r.text
            r = await client.get(f"{gw.http}/sse?channel=" + "x" * 64)
            assert r.status_code == 400 and "63" in r.text

    run(main())


def test_default_allow_list_is_empty(gateway: Callable[..., Gateway]) -> None:
    gw = gateway(allow=[])

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            reply = await request(ws, {"type": "subscribe", "channels": ["anything"]})
            assert reply["type"] == "error" and "allow-list" in reply["message"]

    run(main())


def test_publish_refused_by_default_allowed_with_allow_publish(
    gateway: Callable[..., Gateway], unique_channel: str
) -> None:
    closed = gateway()
    open_ = gateway(allow_publish=[f"{unique_channel}*"])

    async def main() -> None:
        frame = {"type": "publish", "channel": unique_channel, "payload": "hi", "ref": "p"}
        async with ws_connect(closed.ws) as ws:
            reply = await request(ws, frame)
            assert reply["type"] == "error" and reply["ref"] == "p"
            assert f"not allowed to publish on '{unique_channel}'" in reply["message"]
        async with ws_connect(open_.ws) as ws, ws_connect(open_.ws) as listener:
            await subscribe(listener, unique_channel)
            assert await request(ws, frame) == {
                "type": "published", "channel": unique_channel, "ref": "p",
            }
            got = await recv(listener)
            assert (got["channel"], got["payload"]) == (unique_channel, "hi")
            assert got["pid"] == open_.hub.backend_pid  # sent on the gateway's connection
            big = {"type": "publish", "channel": unique_channel, "payload": "x" * 8000}
            reply = await request(ws, big)
            assert reply["type"] == "error" and "under 8000 bytes" in reply["message"]

    run(main())
    assert open_.metrics()["pgcast_gateway_published_total"] == 1


def test_authorizer_hook_and_token(gateway: Callable[..., Gateway], unique_channel: str) -> None:
    seen: list[str | None] = []

    async def authorizer(connection: Any, token: str | None) -> Access:
        seen.append(token)
        if token == "reader":
            return Access.globs(read=[unique_channel])
        if token == "writer":
            return Access.globs(read=[unique_channel], write=[unique_channel])
        raise AccessDenied("unknown token")

    gw = gateway(authorizer=authorizer, allow=())

    async def main() -> None:
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(f"{gw.ws}?token=bogus"):
                pass
        assert info.value.response.status_code == 403
        assert b"unknown token" in info.value.response.body
        async with ws_connect(f"{gw.ws}?token=reader") as ws:
            await subscribe(ws, unique_channel)
            reply = await request(ws, {"type": "publish", "channel": unique_channel})
            assert reply["type"] == "error"
        headers = {"Authorization": "Bearer writer"}
        async with ws_connect(gw.ws, additional_headers=headers) as ws:
            await subscribe(ws, unique_channel)
            assert (await request(ws, {"type": "publish", "channel": unique_channel}))[
                "type"] in ("published", "message")
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            r = await client.get(f"{gw.http}/sse?channel={unique_channel}&token=nope")
            assert r.status_code == 403 and "unknown token" in r.text

    run(main())
    assert seen[:3] == ["bogus", "reader", "writer"]
    assert gw.metrics()['pgcast_gateway_rejected_total{reason="auth"}'] == 2


def test_origin_check(gateway: Callable[..., Gateway], unique_channel: str) -> None:
    same = gateway()
    listed = gateway(allowed_origins=["http://app.example"])

    async def main() -> None:
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(same.ws, origin="http://evil.example"):
                pass
        assert info.value.response.status_code == 403
        assert b"origin 'http://evil.example' is not allowed" in info.value.response.body
        async with ws_connect(same.ws, origin=f"http://127.0.0.1:{same.port}") as ws:
            await subscribe(ws, unique_channel)
        async with ws_connect(listed.ws, origin="http://app.example") as ws:
            await subscribe(ws, unique_channel)
        with pytest.raises(InvalidStatus):
            async with ws_connect(listed.ws, origin=f"http://127.0.0.1:{listed.port}"):
                pass
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            r = await client.get(f"{same.http}/sse?channel={unique_channel}",
                                 headers={"Origin": "http://evil.example"})
            assert r.status_code == 403

    run(main())
    assert same.metrics()['pgcast_gateway_rejected_total{reason="origin"}'] == 2


def _raw_status(port: int, request: str) -> str:
    """The status line the gateway answers *request* (raw HTTP) with."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request.encode("latin-1"))
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0].decode("latin-1")


def _upgrade(host: str, origin: str) -> str:
    return ("GET /ws HTTP/1.1\r\n"
            f"Host: {host}\r\nOrigin: {origin}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def _get(path: str, host: str, origin: str) -> str:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n"
            "Connection: close\r\n\r\n")


def test_dns_rebinding_is_refused_by_the_host_allow_list(
    gateway: Callable[..., Gateway], unique_channel: str
) -> None:
    """Issue 12 item 4: ``Host: evil.example:PORT`` with ``Origin:
    http://evil.example:PORT`` passes the same-origin check (the page's name
    was made to resolve to the gateway); ``allowed_hosts`` refuses it on
    every route and transport."""
    open_gw = gateway()
    gw = gateway(allowed_hosts=["127.0.0.1", "localhost", "*.app.example"])
    sse = f"/sse?channel={unique_channel}"
    for port in (open_gw.port, gw.port):
        evil = f"evil.example:{port}"
        attacks = [
            _upgrade(evil, f"http://{evil}"),
            _upgrade(f"EVIL.example:{port}", f"http://EVIL.example:{port}"),
            _upgrade(f"127.0.0.1.evil.example:{port}", f"http://127.0.0.1.evil.example:{port}"),
            _upgrade(f"app.example.evil.example:{port}",
                     f"http://app.example.evil.example:{port}"),
            _get(sse, evil, f"http://{evil}"),
            _get("/metrics", evil, f"http://{evil}"),
            _get("/healthz", f"localhost@evil.example:{port}", "http://x"),
        ]
        statuses = [_raw_status(port, a) for a in attacks]
        if port == open_gw.port:
            # Without the list the same-origin check alone lets the first in.
            assert statuses[0].startswith("HTTP/1.1 101"), statuses
        else:
            assert all(st.startswith("HTTP/1.1 400") for st in statuses), statuses
    for host in (f"127.0.0.1:{gw.port}", f"localhost:{gw.port}", f"ws.app.example:{gw.port}"):
        assert _raw_status(gw.port, _upgrade(host, f"http://{host}")).startswith(
            "HTTP/1.1 101"), host
        assert _raw_status(gw.port, _get(sse, host, f"http://{host}")).startswith(
            "HTTP/1.1 200"), host


def test_allowed_hosts_arguments() -> None:
    from pgcast.cli.gateway import allowed_hosts

    assert allowed_hosts("127.0.0.1", None) == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("::1", None) == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("localhost", None) == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("0.0.0.0", None) is None
    assert allowed_hosts("0.0.0.0", ["app.example"]) == ["app.example"]
    assert allowed_hosts("127.0.0.1", ["*"]) is None
    for bad, message in [(["app.example:80"], "without the port"), ([""], "non-empty"),
                         (["a.*.example"], "wildcards"), ([], "is empty")]:
        with pytest.raises(ValueError, match=message):
            create_app("", allowed_hosts=bad)
    with pytest.raises(TypeError, match="not one string"):
        create_app("", allowed_hosts="app.example")
    create_app("", allowed_hosts=["::1", "*.app.example", "*"])


def test_limits_on_subscriptions_clients_and_frame_size(
    gateway: Callable[..., Gateway], unique_channel: str
) -> None:
    gw = gateway(max_subscriptions=3, max_clients=2, max_frame_bytes=1000)

    async def main() -> None:
        async with ws_connect(gw.ws) as ws, ws_connect(gw.ws):
            chans = [f"{unique_channel}_{i}" for i in range(4)]
            reply = await request(ws, {"type": "subscribe", "channels": chans})
            assert reply["type"] == "error"
            assert "the limit per client is 3" in reply["message"]
            await subscribe(ws, *chans[:3])
            big = {"type": "publish", "channel": "c", "payload": "y" * 2000}
            reply = await request(ws, big)
            size = len(json.dumps(big))
            assert reply == {"type": "error",
                             "message": f"frame is {size} bytes; the limit is 1000 bytes"}
            # A third client is one too many.
            with pytest.raises(InvalidStatus) as info:
                async with ws_connect(gw.ws):
                    pass
            assert info.value.response.status_code == 503
            assert b"the limit is 2" in info.value.response.body
            async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
                r = await client.get(f"{gw.http}/sse?channel={unique_channel}")
                assert r.status_code == 503 and "the limit is 2" in r.text

    run(main())
    assert gw.metrics()['pgcast_gateway_rejected_total{reason="capacity"}'] == 2


def test_a_flood_of_metrics_requests_opens_one_connection_at_a_time(
    gateway: Callable[..., Gateway], dsn: str
) -> None:
    """Issue 12 item 8: each /metrics request past the cache opened its own
    connection (1,000 unauthenticated requests opened 295)."""
    gw = gateway(metrics_cache=0.001)
    stop = threading.Event()
    seen: list[int] = []

    def watch() -> None:
        with psycopg.connect(dsn, autocommit=True) as watcher:
            for _ in range(20_000):
                if stop.is_set():
                    return
                row = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'pgcast-gateway-metrics' "
                    "AND datname = current_database()"
                ).fetchone()
                seen.append(int(row[0]) if row else 0)

    async def main() -> None:
        limits = httpx.Limits(max_connections=300)
        for _ in range(3):
            # A client per round: a kept-alive connection of the last round that
            # the server closes as it is reused fails with "disconnected"
            # (an HTTP client race, not what this test is about).
            async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT,
                                         limits=limits) as client:
                replies = await asyncio.gather(
                    *(client.get(f"{gw.http}/metrics") for _ in range(300))
                )
            assert {r.status_code for r in replies} == {200}
            assert all("pgcast_gateway_notify_queue_usage " in r.text for r in replies)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        run(main())
    finally:
        stop.set()
        thread.join(TIMEOUT)
    assert seen and max(seen) <= 1, f"up to {max(seen)} metrics connections at once"


def test_malformed_frames_get_error_replies_and_the_connection_survives(
    gateway: Callable[..., Gateway], psql: Callable[..., str], unique_channel: str
) -> None:
    gw = gateway()
    bad: list[str | bytes] = [
        "not json", "", "[]", "null", '{"type": "dance"}', "{}",
        '{"type": "subscribe", "channels": "x"}', '{"type": "subscribe", "channels": [1, 2]}',
        '{"type": "subscribe", "channels": ["' + "x" * 100 + '"]}',
        '{"type": "publish", "channel": null}', b"\xff\x00binary", '{"type": "ping", "ref": {}}',
        "x" * 20_000,
        # issue 12 item 10: a lone surrogate that would be echoed, NaN/Infinity
        '{"type": "ping", "ref": "\\ud800"}', '{"type": "ping", "ref": "\\udfff"}',
        '{"type": "publish", "channel": "c", "payload": {"v": NaN}}',
        '{"type": "publish", "channel": "c", "payload": [Infinity]}',
        '{"type": "publish", "channel": "c", "payload": 1e400}',
    ]

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            await subscribe(ws, unique_channel)
            for frame in bad:
                reply = await request(ws, frame)  # type: ignore[arg-type]
                assert reply["type"] == "error", (frame, reply)
                assert reply["message"]
            assert await request(ws, {"type": "ping", "ref": 5}) == {"type": "pong", "ref": 5}
            await apsql(psql, f"NOTIFY {unique_channel}, 'still here'")
            assert (await recv(ws))["payload"] == "still here"

    async def request(ws: ClientConnection, frame: str | bytes | dict[str, Any]) -> dict[str, Any]:
        await ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)
        return await recv(ws)

    run(main())
    assert gw.metrics()["pgcast_gateway_errors_total"] == len(bad)


def test_unsubscribe_stops_messages_and_unlistens_after_the_last(
    gateway: Callable[..., Gateway], psql: Callable[..., str], unique_channel: str
) -> None:
    gw = gateway()
    other = f"{unique_channel}_other"

    async def main() -> None:
        async with ws_connect(gw.ws) as a, ws_connect(gw.ws) as b:
            await subscribe(a, unique_channel, other)
            await subscribe(b, unique_channel)
            assert gw.hub.listening() == {unique_channel, other}
            assert await request(a, {"type": "unsubscribe", "channels": [unique_channel]}) == {
                "type": "unsubscribed", "channels": [unique_channel],
            }
            await apsql(psql, f"NOTIFY {unique_channel}, '1'; NOTIFY {other}, '2'")
            assert (await recv(a))["payload"] == "2"  # not '1': unsubscribed
            assert (await recv(b))["payload"] == "1"
            assert gw.hub.listening() == {unique_channel, other}  # b still wants it
            await request(b, {"type": "unsubscribe", "channels": [unique_channel]})
        # Both gone: nothing is LISTENed any more.

    run(main())
    gw.wait_metric("pgcast_gateway_channels", lambda v: v == 0)
    assert gw.hub.listening() == frozenset()


def test_one_listen_connection_and_one_listen_per_channel(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], unique_channel: str
) -> None:
    gw = gateway()
    channels = [f"{unique_channel}_{i}" for i in range(3)]

    async def main() -> None:
        clients = [await ws_connect(gw.ws).__aenter__() for _ in range(30)]
        try:
            for i, ws in enumerate(clients):
                await subscribe(ws, *channels[: 1 + i % 3])
            m = gw.metrics()
            assert m["pgcast_gateway_subscriptions"] == 10 * (1 + 2 + 3)
            assert m["pgcast_gateway_channels"] == 3
            assert gw.hub.listening() == set(channels)
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgcast-gateway' "
                "AND datname = current_database()"
            ).fetchall()
            assert [r[0] for r in rows] == [gw.hub.backend_pid]
            await asyncio.to_thread(conn.execute, "SELECT pg_notify(%s, 'all')", (channels[0],))
            for ws in clients:
                assert (await recv(ws))["payload"] == "all"
        finally:
            for ws in clients:
                await ws.close()

    run(main())
    gw.wait_metric("pgcast_gateway_channels", lambda v: v == 0)
    assert gw.metrics()["pgcast_gateway_messages_out_total"] == 30


# -- backpressure --------------------------------------------------------------


async def stalled_client(url: str) -> Any:
    """A WebSocket client that reads almost nothing: a tiny receive buffer and
    a client library that stops reading after one queued frame."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    port = int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return await ws_connect(url, sock=sock, max_queue=1).__aenter__()


def burst_sql(channel: str, count: int, batch: int = 0) -> str:
    # Distinct payloads (NOTIFY folds duplicates in one transaction), 4 kB each.
    first = batch * count + 1
    return (f"SELECT pg_notify('{channel}', lpad(i::text, 4000, 'x')) "
            f"FROM generate_series({first}, {first + count - 1}) AS i")


@pytest.mark.parametrize("ws", ["direct", "asgi"])
def test_stalled_client_is_dropped_while_another_keeps_receiving(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], unique_channel: str,
    ws: str,
) -> None:
    gw = gateway(queue_size=16, sndbuf=16384, close_timeout=0.5, ws=ws)
    batches, per_batch = 100, 4

    async def main() -> None:
        stalled = await stalled_client(gw.ws)
        try:
            async with ws_connect(gw.ws) as good:
                await stalled.send(json.dumps({"type": "subscribe",
                                               "channels": [unique_channel]}))
                await subscribe(good, unique_channel)
                await asyncio.to_thread(
                    gw.wait_metric, "pgcast_gateway_subscriptions", lambda v: v == 2
                )
                # Paced by the good client: it never has more than one batch
                # pending, while the stalled one falls further behind each time.
                for b in range(batches):
                    await asyncio.to_thread(conn.execute, burst_sql(unique_channel, per_batch, b))
                    for i in range(per_batch):
                        frame = await recv(good)
                        assert frame["payload"].lstrip("x") == str(b * per_batch + i + 1)
                await asyncio.to_thread(
                    gw.wait_metric, 'pgcast_gateway_disconnects_total{reason="slow_consumer"}',
                    lambda v: v == 1,
                )
                await asyncio.to_thread(
                    gw.wait_metric, 'pgcast_gateway_clients{transport="websocket"}',
                    lambda v: v == 1,
                )
                await asyncio.to_thread(conn.execute, f"NOTIFY {unique_channel}, 'after'")
                assert (await recv(good))["payload"] == "after"
            # The stalled client, reading again, finds its connection ended early.
            got = 0
            with pytest.raises(ConnectionClosed) as info:
                for _ in range(batches * per_batch + 10):
                    await recv(stalled)
                    got += 1
            assert got < batches * per_batch
            code = info.value.rcvd.code if info.value.rcvd is not None else 1006
            assert code in (4000, 1006)
            if info.value.rcvd is not None:
                assert "slow consumer" in info.value.rcvd.reason
        finally:
            await stalled.close()

    run(main())


def test_a_closed_client_that_does_not_read_is_aborted(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], unique_channel: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 12 item 7: after a 4000 close the TCP connection stayed open as
    long as the peer did not read (the close waited for the buffer to drain).
    Over WebSocket and SSE: the socket is reset within ABORT_AFTER."""
    from pgcast.gateway import _linger

    if not hasattr(socket, "TCP_INFO"):
        pytest.skip("reads the TCP state with TCP_INFO (Linux)")
    monkeypatch.setattr(_linger, "ABORT_AFTER", 1.0)
    gw = gateway(queue_size=8, sndbuf=8192, close_timeout=0.5)

    def raw(request: str) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.port))
        sock.sendall(request.encode())
        return sock

    ws = raw(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n")
    ws.settimeout(TIMEOUT)
    assert ws.recv(4096).startswith(b"HTTP/1.1 101")
    frame = json.dumps({"type": "subscribe", "channels": [unique_channel]}).encode()
    mask = b"\x01\x02\x03\x04"
    ws.sendall(bytes([0x81, 0x80 | len(frame)]) + mask
               + bytes(b ^ mask[i % 4] for i, b in enumerate(frame)))
    sse = raw(f"GET /sse?channel={unique_channel} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n\r\n")
    try:
        gw.wait_metric("pgcast_gateway_subscriptions", lambda v: v == 2)
        for b in range(200):  # until both were closed as slow consumers
            conn.execute(burst_sql(unique_channel, 4, b))
            if gw.metrics()['pgcast_gateway_disconnects_total{reason="slow_consumer"}'] == 2:
                break
        gw.wait_metric('pgcast_gateway_disconnects_total{reason="slow_consumer"}',
                       lambda v: v == 2)
        for sock in (ws, sse):
            # Not reading: the server's close can only end in a reset (the
            # WebSocket's after uvicorn's 10 s wait for the close reply).
            deadline = time.monotonic() + 3 * TIMEOUT
            # TCP_INFO's first byte is the state: ESTABLISHED (1) while the
            # server holds the connection, CLOSE (7) once it was reset.
            while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == 1:
                assert time.monotonic() < deadline, "the closed connection was never aborted"
                time.sleep(0.1)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == 7
    finally:
        ws.close()
        sse.close()


def test_requests_whose_headers_never_end_are_closed_and_bounded(
    gateway: Callable[..., Gateway], unique_channel: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 12 item 9 (slowloris): incomplete upgrade requests were held
    forever, outside max_clients (3,000 for 70 s)."""
    from pgcast.gateway import _linger

    monkeypatch.setattr(_linger, "HEADER_TIMEOUT", 1.0)
    monkeypatch.setattr(_linger, "MAX_UNFINISHED", 5)
    gw = gateway(max_clients=3)
    partial = f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\n"

    def ended(sock: socket.socket, within: float) -> bool:
        """Whether the server ends the connection within *within* s."""
        sock.settimeout(within)
        try:
            return sock.recv(1024) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    socks = []
    try:
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT)
            sock.sendall(partial.encode())
            socks.append(sock)
        # Past the bound of unfinished handshakes: the oldest are closed at once.
        assert [ended(s, 0.5) for s in socks[:3]] == [True] * 3
        # The others within the header timeout, whatever they dribble.
        socks[3].sendall(b"X-Slow: 1\r\n")
        assert all(ended(s, TIMEOUT) for s in socks[3:])
        # A kept-alive connection that dribbles its second request too.
        with socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as keep:
            keep.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n\r\n"
                         .encode())
            assert keep.recv(4096).startswith(b"HTTP/1.1 200")
            keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            assert ended(keep, TIMEOUT)
    finally:
        for sock in socks:
            sock.close()

    async def main() -> None:  # and the gateway serves everyone else as before
        async with ws_connect(gw.ws) as ws:
            await subscribe(ws, unique_channel)

    run(main())


@pytest.mark.parametrize("ws", ["direct", "asgi"])
def test_drop_oldest_policy_keeps_the_slow_client_and_counts_drops(
    gateway: Callable[..., Gateway], psql: Callable[..., str], unique_channel: str,
    ws: str,
) -> None:
    gw = gateway(queue_size=8, sndbuf=16384, overflow="drop-oldest", ws=ws)
    count = 300

    async def main() -> None:
        slow = await stalled_client(gw.ws)
        try:
            await slow.send(json.dumps({"type": "subscribe", "channels": [unique_channel]}))
            await asyncio.to_thread(
                gw.wait_metric, "pgcast_gateway_subscriptions", lambda v: v == 1
            )
            await apsql(psql, burst_sql(unique_channel, count))
            await asyncio.to_thread(
                gw.wait_metric, "pgcast_gateway_messages_in_total", lambda v: v == count
            )
            frames = []
            while True:
                frame = await recv(slow)
                frames.append(frame)
                if frame.get("payload", "").endswith(str(count)):
                    break
            notices = [f for f in frames if f["type"] == "notice"]
            assert notices and notices[0]["event"] == "dropped"
            dropped = sum(f["count"] for f in notices)
            messages = [f for f in frames if f["type"] == "message"]
            assert dropped > 0 and len(messages) + dropped == count
            # Still connected and served.
            await apsql(psql, f"NOTIFY {unique_channel}, 'after'")
            assert (await recv(slow))["payload"] == "after"
            assert gw.metrics()["pgcast_gateway_dropped_total"] == dropped
        finally:
            await slow.close()

    run(main())


# -- the database connection ---------------------------------------------------


@pytest.mark.parametrize("reconnect", [True, False], ids=["by-pubsub", "by-gateway"])
def test_database_connection_restart_is_invisible_except_for_a_notice(
    gateway: Callable[..., Gateway], psql: Callable[..., str], unique_channel: str,
    reconnect: bool,
) -> None:
    # by-pubsub: the AsyncPubSub reconnects and yields a Reconnected marker;
    # by-gateway: it gives up at once and the gateway opens a new one itself.
    gw = gateway(connect_kwargs={"reconnect": reconnect})

    async def main() -> None:
        url = f"{gw.http}/sse?channel={unique_channel}"
        async with ws_connect(gw.ws) as ws, \
                httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
                client.stream("GET", url) as sse:
            lines = sse.aiter_lines()

            async def next_sse() -> dict[str, Any]:
                while True:
                    line = await asyncio.wait_for(anext(lines), TIMEOUT)
                    if line.startswith("data: "):
                        event: dict[str, Any] = json.loads(line[6:])
                        return event

            assert (await next_sse())["type"] == "subscribed"
            await subscribe(ws, unique_channel)
            old_pid = gw.hub.backend_pid
            await apsql(psql, f"SELECT pg_terminate_backend({old_pid})")
            notice = await recv(ws)
            assert notice["type"] == "notice" and notice["event"] == "reconnected"
            assert (await next_sse())["event"] == "reconnected"
            assert gw.hub.backend_pid not in (None, old_pid)
            await apsql(psql, f"NOTIFY {unique_channel}, 'after'")
            assert (await recv(ws))["payload"] == "after"
            assert (await next_sse())["payload"] == "after"

    run(main())
    m = gw.metrics()
    assert m["pgcast_gateway_reconnects_total"] == 1
    assert m["pgcast_gateway_database_up"] == 1


def test_healthz_follows_the_database_down_and_back(
    gateway: Callable[..., Gateway], server: EmbeddedServer, unique_channel: str
) -> None:
    gw = gateway(database_timeout=30)
    r = httpx.get(f"{gw.http}/healthz", trust_env=False, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["database"] == "up"

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            await subscribe(ws, unique_channel)
            await asyncio.to_thread(server.kill)  # data kept; start() comes back on the port
            deadline = time.monotonic() + TIMEOUT
            while True:
                r = await asyncio.to_thread(
                    httpx.get, f"{gw.http}/healthz", trust_env=False, timeout=TIMEOUT
                )
                if r.status_code == 503:
                    break
                assert time.monotonic() < deadline, "healthz never reported the database down"
                await asyncio.sleep(0.05)
            assert r.json() == {"status": "unavailable", "database": "down"}
            await asyncio.to_thread(server.start)
            notice = await recv(ws, timeout=30)
            assert notice["event"] == "reconnected"
            r = await asyncio.to_thread(
                httpx.get, f"{gw.http}/healthz", trust_env=False, timeout=TIMEOUT
            )
            assert r.status_code == 200
            with psycopg.connect(server.dsn, autocommit=True) as c:
                c.execute(f"NOTIFY {unique_channel}, 'back'")
            assert (await recv(ws))["payload"] == "back"

    run(main())


def test_metrics_report_queue_usage_and_counts(
    gateway: Callable[..., Gateway], psql: Callable[..., str], unique_channel: str
) -> None:
    gw = gateway()
    m = gw.metrics()
    assert 0 <= m["pgcast_gateway_notify_queue_usage"] < 1
    assert m["pgcast_gateway_database_up"] == 1
    assert m["pgcast_gateway_backend_pid"] == gw.hub.backend_pid

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            await subscribe(ws, unique_channel)
            await apsql(psql, f"NOTIFY {unique_channel}, 'a'")
            await recv(ws)
            m = await asyncio.to_thread(gw.metrics)
            assert m['pgcast_gateway_clients{transport="websocket"}'] == 1
            assert m["pgcast_gateway_subscriptions"] == 1
            assert m["pgcast_gateway_messages_in_total"] == 1
            assert m["pgcast_gateway_messages_out_total"] == 1

    run(main())
    r = httpx.get(f"{gw.http}/metrics", trust_env=False, timeout=TIMEOUT)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_app_mounted_in_another_starlette_app_connects_at_first_request(
    dsn: str, unique_channel: str, psql: Callable[..., str]
) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    inner = create_app(dsn, allow=["*"])
    outer = Starlette(routes=[Mount("/rt", app=inner)])

    async def main(port: int) -> None:
        async with ws_connect(f"ws://127.0.0.1:{port}/rt/ws") as ws:
            await subscribe(ws, unique_channel)
            await apsql(psql, f"NOTIFY {unique_channel}, 'mounted'")
            assert (await recv(ws))["payload"] == "mounted"

    try:
        with serving(lambda port: GatewayServer(config(outer, "127.0.0.1", port,
                                                       log_level="warning")),
                     TIMEOUT) as port:
            run(main(port))
            r = httpx.get(f"http://127.0.0.1:{port}/rt/healthz", trust_env=False,
                          timeout=TIMEOUT)
            assert r.status_code == 200
    finally:
        asyncio.run(inner.state.pgcast_gateway.close())


def test_mounted_app_whose_database_fails_does_not_connect_once_per_request(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """Mounted without its lifespan, the gateway starts at a request. While
    its database refuses it (here: no such database yet), each anonymous
    request (``/healthz``, a WebSocket, an SSE stream) was a new login attempt
    at the server: one attacker's request rate became the database's. Now a
    failed start is tried again after a pause (``START_RETRY_PAUSE``);
    meanwhile requests get the last error (503 on /healthz), and once the
    database answers the gateway starts."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from pgcast.gateway._gateway import START_RETRY_PAUSE
    from tcp_proxy import TcpProxy

    database = f"pgcast_late_{os.getpid()}_{int(time.monotonic() * 1000)}"
    with TcpProxy.for_dsn(dsn) as proxy:
        params = psycopg.conninfo.conninfo_to_dict(proxy.dsn(dsn))
        params["dbname"] = database
        inner = create_app(psycopg.conninfo.make_conninfo(**params), allow=["*"])
        outer = Starlette(routes=[Mount("/rt", app=inner)])
        try:
            with serving(lambda port: GatewayServer(config(outer, "127.0.0.1", port,
                                                           log_level="warning")),
                         TIMEOUT) as port:
                base = f"http://127.0.0.1:{port}/rt"
                with httpx.Client(trust_env=False, timeout=TIMEOUT) as http:
                    for _ in range(30):
                        r = http.get(f"{base}/healthz")
                        assert r.status_code == 503, r.text
                        assert r.json()["database"] == "down"  # the reason is the log's
                    with http.stream("GET", f"{base}/sse?channel=c") as stream:
                        next(stream.iter_raw())  # admitted, then told the database is down
                    assert proxy.accepted <= 2, f"{proxy.accepted} login attempts for 31 requests"
                    conn.execute(f'CREATE DATABASE "{database}"')
                    deadline = time.monotonic() + START_RETRY_PAUSE + TIMEOUT
                    while http.get(f"{base}/healthz").status_code != 200:
                        assert time.monotonic() < deadline, "the gateway did not start"
                        time.sleep(0.1)
                assert proxy.accepted <= 6, proxy.accepted  # login, check, replay: a start
        finally:
            asyncio.run(inner.state.pgcast_gateway.close())
            conn.execute(f'DROP DATABASE IF EXISTS "{database}"')


def test_the_gateways_reconnect_with_no_delay_does_not_flood_the_log(
    dsn: str, conn: psycopg.Connection[Any], gateway: Callable[..., Gateway],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``reconnect_backoff=Backoff(initial=0, maximum=0, max_attempts=1)``
    against a database that refuses logins: the PubSub underneath gives up at
    once (its retries are logged sparingly already) and the hub, which never
    gives up its database, starts series after series: a warning per attempt,
    hundreds a second. Now the first failure, then a summary at most every
    ``RETRY_LOG_EVERY`` seconds."""
    from pgcast import Backoff
    from pgcast._reconnect import RETRY_LOG_EVERY
    from tcp_proxy import TcpProxy

    database = f"pgcast_flood_{os.getpid()}_{int(time.monotonic() * 1000)}"
    conn.execute(f'CREATE DATABASE "{database}"')
    try:
        with TcpProxy.for_dsn(dsn) as proxy, caplog.at_level("WARNING", logger="pgcast"):
            url = psycopg.conninfo.make_conninfo(proxy.dsn(dsn), dbname=database)
            gw = gateway(dsn=url,
                         reconnect_backoff=Backoff(initial=0, maximum=0, max_attempts=1))
            conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            before = proxy.accepted
            proxy.cut()  # each attempt now gets through to a FATAL refusal
            started = time.monotonic()
            time.sleep(1.5)
            took = time.monotonic() - started
            gw.server.should_exit = True
            gw.thread.join(TIMEOUT)
            attempts = proxy.accepted - before
            assert attempts >= 20, f"only {attempts} attempts: the flood was not tested"
            failed = [r.getMessage() for r in caplog.records
                      if "gateway: reconnect" in r.getMessage()]
            assert 1 <= len(failed) <= 2 + took / RETRY_LOG_EVERY, failed[:5]
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


# -- the command ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_pgcast_serve_closes_clients_with_1001_on_sigterm(dsn: str, unique_channel: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgcast.cli", "serve", "--dsn", dsn, "--port", str(port),
         "--allow", f"{unique_channel}*", "--allow-publish", unique_channel],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False,
                             timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "pgcast serve did not start"
            time.sleep(0.1)

        async def main() -> None:
            url = f"http://127.0.0.1:{port}/sse?channel={unique_channel}"
            async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws, \
                    httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
                    client.stream("GET", url) as sse:
                await subscribe(ws, unique_channel)
                reply = await request(ws, {"type": "publish", "channel": unique_channel,
                                           "payload": "p"})
                assert reply["type"] in ("published", "message")
                proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as info:
                    for _ in range(10):
                        await recv(ws)
                assert info.value.rcvd is not None
                assert info.value.rcvd.code == 1001
                assert info.value.rcvd.reason == "server shutting down"
                # The SSE stream ends with a shutdown notice.
                events = []
                async for line in sse.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                assert events[0]["type"] == "subscribed"
                assert events[-1]["type"] == "notice" and events[-1]["event"] == "shutdown"

        run(main())
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes the pipe


def test_pgcast_serve_reports_a_busy_port(dsn: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "pgcast.cli", "serve", "--dsn", dsn, "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 1
    assert re.search(rf"cannot listen on 127\.0\.0\.1:{port}: .*--port", done.stderr)
    assert "Traceback" not in done.stderr


# -- durable channels ----------------------------------------------------------


@pytest.fixture
def durable_schema(conn: psycopg.Connection[Any]) -> None:
    from pgcast.durable import install_schema

    install_schema(conn)


def publish_durably(conn: psycopg.Connection[Any], channel: str, *payloads: str) -> list[int]:
    return [
        int(conn.execute("SELECT pgcast.notify(%s, %s)", (channel, p)).fetchone()[0])  # type: ignore[index]
        for p in payloads
    ]


def test_durable_channel_resumes_from_a_position_over_websocket(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], unique_channel: str,
    durable_schema: None,
) -> None:
    gw = gateway(durable=[f"{unique_channel}*"])
    ids = publish_durably(conn, unique_channel, "one", "two", "three")

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            # Resume after the first message: the other two are replayed, with ids.
            reply = await request(ws, {"type": "subscribe", "channels": [unique_channel],
                                       "since": ids[0]})
            assert reply["channels"] == [unique_channel] and isinstance(reply["epoch"], str)
            assert reply["recovered"] == {unique_channel: True}
            replayed = [await recv(ws) for _ in range(2)]
            assert [(f["payload"], f["id"]) for f in replayed] == [("two", ids[1]),
                                                                  ("three", ids[2])]
            # Then live, once each, with ids.
            (four,) = await asyncio.to_thread(publish_durably, conn, unique_channel, "four")
            live = await recv(ws)
            assert (live["payload"], live["id"]) == ("four", four)
            await apsql_conn(conn, f"NOTIFY {unique_channel}, 'plain'")
            plain = await recv(ws)
            assert plain["payload"] == "plain" and "id" not in plain
        async with ws_connect(gw.ws) as ws:
            # A durable channel without since: live only, ids included.
            await subscribe(ws, unique_channel)
            (five,) = await asyncio.to_thread(publish_durably, conn, unique_channel, "five")
            assert (await recv(ws))["id"] == five
            # since on a channel that is not durable here is refused.
            reply = await request(ws, {"type": "subscribe", "channels": ["other"], "since": 0})
            assert reply["type"] == "error" and "not durable" in reply["message"]

    run(main())


async def apsql_conn(conn: psycopg.Connection[Any], sql: str) -> None:
    await asyncio.to_thread(conn.execute, sql)


def test_durable_replay_larger_than_the_queue_reaches_a_client_that_keeps_up(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], unique_channel: str,
    durable_schema: None,
) -> None:
    gw = gateway(durable=[unique_channel], queue_size=16)
    conn.execute(
        "SELECT pgcast.notify_many(array_fill(%s::text, ARRAY[300]), "
        "ARRAY(SELECT 'm' || i FROM generate_series(1, 300) i))", (unique_channel,),
    )

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            await request(ws, {"type": "subscribe", "channels": [unique_channel], "since": 0})
            payloads = [(await recv(ws))["payload"] for _ in range(300)]
            assert payloads == [f"m{i}" for i in range(1, 301)]

    run(main())
    assert gw.metrics()['pgcast_gateway_disconnects_total{reason="slow_consumer"}'] == 0


def test_sse_resumes_with_last_event_id(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], unique_channel: str,
    durable_schema: None,
) -> None:
    gw = gateway(durable=[f"{unique_channel}*"])
    other = f"{unique_channel}_b"
    a1, a2 = publish_durably(conn, unique_channel, "a1", "a2")
    (b1,) = publish_durably(conn, other, "b1")

    async def main() -> None:
        url = f"{gw.http}/sse?channel={unique_channel}&channel={other}"
        headers = {"Last-Event-ID": json.dumps({unique_channel: a1, other: 0})}
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
                client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            events: list[tuple[str | None, dict[str, Any]]] = []
            event_id = None
            while len(events) < 3:
                line = await asyncio.wait_for(anext(lines), TIMEOUT)
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    events.append((event_id, json.loads(line[6:])))
                    event_id = None
            assert events[0][1]["type"] == "subscribed"
            got = {(e["channel"], e["payload"]): i for i, e in events[1:]}
            assert set(got) == {(unique_channel, "a2"), (other, "b1")}
            # The id: line is the position on every durable channel of the stream.
            last = json.loads(events[-1][0] or "{}")
            # ... and the log's epoch under "" (tests/test_gateway_gaps.py).
            assert last.pop("") == events[0][1]["epoch"]
            assert last == {unique_channel: a2, other: b1}
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            r = await client.get(url, headers={"Last-Event-ID": "not an id"})
            assert r.status_code == 400 and "since must be a log id" in r.text

    run(main())


def test_a_forged_reference_does_not_stop_a_durable_channel_of_the_gateway(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], unique_channel: str,
    durable_schema: None,
) -> None:
    """Issue 12 item 1(b) through the gateway: a raw NOTIFY and a client's
    publish carrying a reference with a huge id moved the gateway's durable
    position, and every later durable message was dropped for every client."""
    gw = gateway(durable=[f"{unique_channel}*"], allow_publish=[unique_channel])
    forged = "\x1epgcast:4611686018427387904:forged"

    async def main() -> None:
        async with ws_connect(gw.ws) as ws, ws_connect(gw.ws) as resumed:
            await subscribe(ws, unique_channel)
            (first,) = publish_durably(conn, unique_channel, "one")
            assert (await recv(ws))["payload"] == "one"
            await asyncio.to_thread(conn.execute, "SELECT pg_notify(%s, %s)",
                                    (unique_channel, forged))
            await ws.send(json.dumps({"type": "publish", "channel": unique_channel,
                                      "payload": forged, "ref": "p"}))
            got: list[dict[str, Any]] = []
            while not any(m.get("ref") == "p" for m in got):  # the publish's reply
                assert len(got) < 10, got
                got.append(await recv(ws))
            publish_durably(conn, unique_channel, "two")
            while got[-1].get("payload") != "two":
                assert len(got) < 10, got
                got.append(await recv(ws))
            messages = [m["payload"] for m in got if m["type"] == "message"]
            # Only what the log holds: "forged" never stands alone as a message.
            assert "forged" not in messages and messages[-1] == "two", got
            reply = await request(resumed, {"type": "subscribe", "channels": [unique_channel],
                                            "since": first})
            assert reply["type"] == "subscribed"
            rest = [(await recv(resumed))["payload"] for _ in range(len(messages))]
            assert rest == messages

    run(main())


def test_the_replay_connection_is_reopened_and_a_failed_replay_changes_nothing(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], dsn: str,
    unique_channel: str, durable_schema: None,
) -> None:
    """Issue 12 item 6: after PostgreSQL dropped the replay connection the
    next resume got ``subscribed``, then an error, and the channel stuck."""
    role = f"pgcast_gw_{unique_channel[-8:]}"
    conn.execute(f"CREATE ROLE {role} SUPERUSER LOGIN")
    gw = gateway(dsn=psycopg.conninfo.make_conninfo(dsn, user=role),
                 durable=[f"{unique_channel}*"])
    ids = publish_durably(conn, unique_channel, "m1", "m2")

    def drop_replay_connection() -> None:
        sql = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               "WHERE application_name = 'pgcast-gateway-replay' AND usename = %s")
        assert conn.execute(sql, (role,)).fetchall(), "no replay connection to drop"
        for _ in range(200):
            if not conn.execute(sql.replace("pg_terminate_backend(pid)", "pid"),
                                (role,)).fetchall():
                return
            time.sleep(0.05)
        raise AssertionError("the replay connection's backend did not go away")

    async def resume(ws: ClientConnection, since: int) -> dict[str, Any]:
        return await request(ws, {"type": "subscribe", "channels": [unique_channel],
                                  "since": since, "ref": "r"})

    async def payloads(ws: ClientConnection, n: int) -> list[str]:
        return [(await recv(ws))["payload"] for _ in range(n)]

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            assert (await resume(ws, 0))["type"] == "subscribed"
            assert await payloads(ws, 2) == ["m1", "m2"]
        await asyncio.to_thread(drop_replay_connection)
        ids.extend(publish_durably(conn, unique_channel, "m3"))
        async with ws_connect(gw.ws) as ws:  # reopened, unseen by the client
            assert (await resume(ws, ids[0]))["type"] == "subscribed"
            assert await payloads(ws, 2) == ["m2", "m3"]
        # Now the replay cannot reconnect: the error undoes the subscription.
        await asyncio.to_thread(conn.execute, f"ALTER ROLE {role} NOLOGIN")
        await asyncio.to_thread(drop_replay_connection)
        async with ws_connect(gw.ws) as ws:
            # The log is read before the subscription takes effect (to say
            # whether the resume is complete): refused, nothing changed.
            error = await resume(ws, 0)
            assert error["type"] == "error" and error["ref"] == "r", error
            assert "reading the log failed" in error["message"]
            assert "nothing changed: subscribe again" in error["message"]
            await asyncio.to_thread(conn.execute, f"ALTER ROLE {role} LOGIN")
            # Not "already subscribed": nothing was left half-done.
            assert (await resume(ws, 0))["type"] == "subscribed"
            assert await payloads(ws, 3) == ["m1", "m2", "m3"]
            ids.extend(publish_durably(conn, unique_channel, "m4"))
            assert await payloads(ws, 1) == ["m4"]

    try:
        run(main())
    finally:
        gw.server.should_exit = True
        gw.thread.join(30)
        conn.execute(f"ALTER ROLE {role} LOGIN")
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE usename = %s", (role,))
        for _ in range(200):
            if not conn.execute("SELECT 1 FROM pg_stat_activity WHERE usename = %s",
                                (role,)).fetchall():
                break
            time.sleep(0.05)
        conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("backlog", [600, 3000])
def test_sse_resume_over_a_backlog_larger_than_half_the_queue(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], unique_channel: str,
    durable_schema: None, backlog: int,
) -> None:
    """Issue 12 item 5: with the default queue of 1,000, a resume over 500 or
    more messages sent the opening comment and then nothing, forever."""
    gw = gateway(durable=[f"{unique_channel}*"])
    rows = conn.execute(
        "SELECT pgcast.notify(%s, 'm' || i) FROM generate_series(1, %s) AS i",
        (unique_channel, backlog),
    ).fetchall()
    ids = [int(r[0]) for r in rows]

    async def main() -> None:
        url = f"{gw.http}/sse?channel={unique_channel}"
        headers = {"Last-Event-ID": json.dumps({unique_channel: ids[0] - 1})}
        got: list[str] = []
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
                client.stream("GET", url, headers=headers) as response:
            lines = response.aiter_lines()
            for _ in range(10 * backlog + 100):
                line = await asyncio.wait_for(anext(lines), TIMEOUT)
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event["type"] == "message":
                        got.append(event["payload"])
                        if len(got) == backlog:
                            publish_durably(conn, unique_channel, "live")
                        if event["payload"] == "live":
                            break
        assert got == [f"m{i}" for i in range(1, backlog + 1)] + ["live"]

    run(main())


def test_a_resume_position_never_replays_a_channel_the_client_may_not_read(
    gateway: Callable[..., Gateway], conn: psycopg.Connection[Any], unique_channel: str,
    durable_schema: None,
) -> None:
    """Issue 12 item 2: the README's per-user authorizer, durable user.*;
    alice resumes with positions naming bob's channel (Last-Event-ID,
    ?since=, a bare id, WebSocket since) and gets nothing of bob's."""
    alice, bob = f"{unique_channel}.alice", f"{unique_channel}.bob"

    async def authorizer(connection: Any, token: str | None) -> Access:
        if token in ("alice", "bob"):
            return Access.globs(read=[f"{unique_channel}.{token}"])
        raise AccessDenied("unknown token")

    gw = gateway(authorizer=authorizer, allow=(), durable=[f"{unique_channel}.*"])
    publish_durably(conn, bob, "bob-secret-1", "bob-secret-2")

    async def sse_events(url: str, headers: dict[str, str], marker: str) -> list[dict[str, Any]]:
        """The stream's events up to alice's *marker* message, published once
        the stream is subscribed: a replay of bob's would come before it."""
        events: list[dict[str, Any]] = []
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
                client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            lines = response.aiter_lines()
            for _ in range(1000):
                line = await asyncio.wait_for(anext(lines), TIMEOUT)
                if not line.startswith("data: "):
                    continue
                events.append(json.loads(line[6:]))
                if events[-1]["type"] == "subscribed":
                    publish_durably(conn, bob, "bob-live")
                    publish_durably(conn, alice, marker)
                if events[-1].get("payload") == marker:
                    return events
        raise AssertionError(f"no {marker!r} in {events}")

    async def main() -> None:
        base = f"{gw.http}/sse?channel={alice}&token=alice"
        both = json.dumps({alice: 0, bob: 0})
        for n, (url, headers) in enumerate([
            (base, {"Last-Event-ID": both}),
            (f"{base}&since={both}", {}),
            (base, {"Last-Event-ID": json.dumps({bob: 0})}),
            (f"{base}&since=0", {}),
        ]):
            events = await sse_events(url, headers, f"alice-{n}")
            assert not [e for e in events if e.get("channel") == bob], events
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            r = await client.get(f"{gw.http}/sse?channel={bob}&token=alice",
                                 headers={"Last-Event-ID": both})
            assert r.status_code == 403
        async with ws_connect(f"{gw.ws}?token=alice") as ws:
            await ws.send(json.dumps({"type": "subscribe", "channels": [alice],
                                      "since": {bob: 0}}))
            reply = await recv(ws)
            assert reply["type"] == "error" and "not being subscribed to" in reply["message"]

    run(main())


def test_pgcast_serve_reports_an_unreachable_database() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pgcast.cli", "serve", "--dsn",
         "postgresql://postgres@127.0.0.1:1/postgres", "--port", str(free_port()),
         "--allow", "x"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("pgcast serve: error: cannot connect to PostgreSQL")
    assert "Traceback" not in done.stderr


def test_pgcast_demo_serves_the_page_and_prints_the_command(dsn: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgcast.cli", "demo", "--dsn", dsn, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", trust_env=False, timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "pgcast demo exited"
                assert time.monotonic() < deadline, "pgcast demo did not start"
                time.sleep(0.1)
        assert page.status_code == 200
        command = f"psql {dsn} -c &quot;NOTIFY data, &#x27;green&#x27;&quot;"
        assert command in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/static/demo.js", trust_env=False,
                         timeout=TIMEOUT).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"http://127.0.0.1:{port}/" in out
        assert f"psql {dsn} -c \"NOTIFY data, 'green'\"" in out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
