"""A determined client, round 2: the doors the first red team left (see
tests/test_gateway_attacks.py for round 1). Real ``pgcast serve`` path
(uvicorn, the direct WebSocket protocol), real PostgreSQL, loopback only.

Holes these tests found (each failed before its fix): many clients, each
under its own publish limit, together sent NOTIFYs without bound (200
clients: 3,800 a second, every one accepted).
"""

# ruff: noqa: F811  (the gateway fixture is imported, then requested by name)
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
from websockets.exceptions import InvalidStatus

from pgcast.gateway import RateLimits
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

# -- all clients' publishes together ----------------------------------------------


def test_publishes_of_all_clients_together_are_limited_and_refusals_say_so(
    gateway: Callable[..., Gateway], unique_channel: str, dsn: str,
) -> None:
    """Four clients, each far under its own limit, publish 10 each: the
    gateway's limit (burst 8, 1 a second) lets 8 through; every other
    publish gets an error naming total_publishes_per_second and is not
    sent (a raw LISTEN counts exactly the accepted ones); no client is
    closed for refusals it did not cause."""
    limits = RateLimits(total_publishes_per_second=1, total_publish_burst=8, max_refusals=3)
    gw = gateway(allow_publish=[unique_channel], rate_limits=limits)

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
            await listener.execute(f'LISTEN "{unique_channel}"')
            replies: list[dict[str, Any]] = []
            clients = [ws_connect(gw.ws) for _ in range(4)]
            sockets = [await c.__aenter__() for c in clients]
            try:
                for i in range(10):
                    for n, ws in enumerate(sockets):
                        replies.append(await request(ws, {
                            "type": "publish", "channel": unique_channel,
                            "payload": f"{n}.{i}"}))
                for ws in sockets:  # all still open
                    assert await request(ws, {"type": "ping"}) == {"type": "pong"}
            finally:
                for c in clients:
                    await c.__aexit__(None, None, None)
            published = [r for r in replies if r["type"] == "published"]
            errors = [r for r in replies if r["type"] == "error"]
            assert 8 <= len(published) <= 9, replies  # a second may refill one
            assert len(errors) == 40 - len(published)
            assert all("total_publishes_per_second" in e["message"]
                       and "not sent" in e["message"] for e in errors), errors[:2]
            got = 0
            gen = listener.notifies(timeout=1.0)
            async with asyncio.timeout(TIMEOUT):
                async for _ in gen:
                    got += 1
            assert got == len(published)

    run(main())
    metrics = gw.metrics()
    assert metrics['pgcast_gateway_rate_limited_total{kind="total_publish"}'] >= 31
    assert metrics['pgcast_gateway_disconnects_total{reason="rate_limited"}'] == 0
    assert metrics["pgcast_gateway_published_total"] <= 9


def test_pgcast_serve_total_publish_rate_option() -> None:
    from pgcast.cli import build_parser
    from pgcast.cli.gateway import rate_limits

    parser = build_parser()
    limits = rate_limits(parser.parse_args(["serve"]))
    assert limits.total_publishes_per_second == 1000 and limits.total_publish_burst == 2000
    limits = rate_limits(parser.parse_args(["serve", "--total-publish-rate", "7"]))
    assert limits.total_publishes_per_second == 7 and limits.total_publish_burst == 14
    assert RateLimits().total_publishes_per_second == 1000


# -- connections per address ----------------------------------------------------


def test_the_per_address_cap_is_on_by_default() -> None:
    """It was off (None): one address held 3,000 of 3,000 connections."""
    from pgcast.cli import build_parser
    from pgcast.cli._common import UsageError
    from pgcast.cli.gateway import per_address
    from pgcast.gateway import create_app

    app = create_app("postgresql://nowhere")
    assert app.state.pgcast_gateway.settings.max_clients_per_address == 1000
    parser = build_parser()
    assert per_address(parser.parse_args(["serve"]).max_clients_per_address) == 1000
    assert per_address(parser.parse_args(
        ["serve", "--max-clients-per-address", "0"]).max_clients_per_address) is None
    with pytest.raises(UsageError, match="0 \\(no cap\\) or more"):
        per_address(-1)


def test_address_keys_group_an_ipv6_slash_64() -> None:
    from pgcast.gateway._client import address_key

    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("some.name") == "some.name"


def _from(address: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((address, 0))
    return sock


def test_the_cap_holds_on_both_transports_against_forged_forwarded_headers(
    gateway: Callable[..., Gateway], unique_channel: str,
) -> None:
    """From a peer that is not a trusted proxy (127.0.0.2; uvicorn trusts
    127.0.0.1), X-Forwarded-For is ignored: a fresh forged address per
    connection (WebSocket or SSE) still counts as 127.0.0.2. Through the
    trusted proxy, the client's address is the rightmost untrusted one, so
    varying the part the client itself wrote does not help either; and an
    IPv6 client cannot step through its /64 (before: each of its 2^64
    addresses had its own allowance)."""
    gw = gateway(max_clients_per_address=2)
    sse = f"{gw.http}/sse?channel={unique_channel}"

    async def refused(headers: dict[str, str], address: str, source: str = "127.0.0.1",
                      ) -> None:
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(gw.ws, sock=_connected(source), additional_headers=headers):
                pass
        assert info.value.response.status_code == 429
        assert f"too many connections from {address}".encode() in info.value.response.body
        assert b"max_clients_per_address" in info.value.response.body
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT, transport=httpx.
                                     AsyncHTTPTransport(local_address=source)) as client:
            r = await client.get(sse, headers=headers)
            assert r.status_code == 429 and f"from {address}" in r.text, r.text

    def _connected(source: str) -> socket.socket:
        sock = _from(source)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", gw.port))
        sock.setblocking(False)
        return sock

    async def hold(stack: contextlib.AsyncExitStack, headers: dict[str, str],
                   source: str = "127.0.0.1", sse_stream: bool = False) -> None:
        if sse_stream:
            client = await stack.enter_async_context(httpx.AsyncClient(
                trust_env=False, timeout=TIMEOUT,
                transport=httpx.AsyncHTTPTransport(local_address=source)))
            r = await stack.enter_async_context(client.stream("GET", sse, headers=headers))
            assert r.status_code == 200
        else:
            ws = await stack.enter_async_context(
                ws_connect(gw.ws, sock=_connected(source), additional_headers=headers))
            await subscribe(ws, unique_channel)

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            # Untrusted peer: its headers count for nothing.
            await hold(stack, {"X-Forwarded-For": "10.0.0.1"}, "127.0.0.2")
            await hold(stack, {"X-Forwarded-For": "10.0.0.2"}, "127.0.0.2", sse_stream=True)
            await refused({"X-Forwarded-For": "10.0.0.3"}, "127.0.0.2", "127.0.0.2")
            await refused({"X-Real-IP": "10.0.0.4", "Forwarded": "for=10.0.0.4"},
                          "127.0.0.2", "127.0.0.2")
            # The trusted proxy appends the real peer (10.0.0.9) to what the client sent.
            await hold(stack, {"X-Forwarded-For": "10.0.0.1, 10.0.0.9"})
            await hold(stack, {"X-Forwarded-For": "10.0.0.2, 10.0.0.9"}, sse_stream=True)
            await refused({"X-Forwarded-For": "10.0.0.3, 10.0.0.9"}, "10.0.0.9")
            await hold(stack, {"X-Forwarded-For": "10.0.0.8"})  # another client
            # IPv6: one /64 is one address.
            await hold(stack, {"X-Forwarded-For": "2001:db8::1"})
            await hold(stack, {"X-Forwarded-For": "2001:db8::2"}, sse_stream=True)
            await refused({"X-Forwarded-For": "2001:db8::ffff:3"}, "2001:db8::/64")
            await hold(stack, {"X-Forwarded-For": "2001:db8:0:1::1"})
            assert sum(gw.hub.clients_by_transport().values()) == 8

    run(main())
    assert gw.metrics()['pgcast_gateway_rejected_total{reason="per_address"}'] == 8


# -- /metrics, /healthz -------------------------------------------------------------

REMOTE = {"X-Forwarded-For": "203.0.113.5"}  # a remote client, through the trusted proxy


def test_metrics_answer_loopback_clients_only_by_default(
    gateway: Callable[..., Gateway],
) -> None:
    """/metrics answered anyone: client and channel counts, traffic,
    refusals, the server process id (no channel names nor addresses: the
    families are counts). Now a remote client gets 403 naming how to allow
    it, by GET, HEAD or with a trailing slash; /healthz stays open and says
    up or down, and the server process id to local clients only."""
    gw = gateway()
    with httpx.Client(trust_env=False, timeout=TIMEOUT, follow_redirects=True) as client:
        local = client.get(f"{gw.http}/metrics")
        assert local.status_code == 200 and "pgcast_gateway_backend_pid" in local.text
        for method, path in (("GET", "/metrics"), ("HEAD", "/metrics"), ("GET", "/metrics/")):
            r = client.request(method, f"{gw.http}{path}", headers=REMOTE)
            assert r.status_code == 403, (method, path, r.status_code)
            assert "pgcast_gateway" not in r.text
        r = client.get(f"{gw.http}/metrics", headers=REMOTE)
        assert "loopback clients only" in r.text and "metrics_token" in r.text
        # A client claiming loopback in the part of the header it writes itself.
        forged = {"X-Forwarded-For": "127.0.0.1, 203.0.113.5"}
        assert client.get(f"{gw.http}/metrics", headers=forged).status_code == 403
        health = client.get(f"{gw.http}/healthz", headers=REMOTE)
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "database": "up"}
        local = client.get(f"{gw.http}/healthz")
        assert local.json()["backend_pid"] == gw.hub.backend_pid


def test_a_metrics_token_is_required_from_everyone_and_only_as_a_header(
    gateway: Callable[..., Gateway],
) -> None:
    secret = "m" * 24
    gw = gateway(metrics_token=secret)
    with httpx.Client(trust_env=False, timeout=TIMEOUT) as client:
        for headers in ({}, {"Authorization": "Bearer " + "m" * 23},
                        {"Authorization": "Bearer " + secret + "x"},
                        {"Authorization": "Basic " + secret}):
            r = client.get(f"{gw.http}/metrics", headers=headers)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", headers
            assert "metrics token" in r.text
        # Not in the URL (it would reach access logs and proxies' logs).
        assert client.get(f"{gw.http}/metrics?token={secret}").status_code == 401
        for extra in ({}, REMOTE):
            r = client.get(f"{gw.http}/metrics",
                           headers={"Authorization": f"Bearer {secret}", **extra})
            assert r.status_code == 200 and "pgcast_gateway_clients" in r.text
    public = gateway(metrics_public=True)
    assert httpx.get(f"{public.http}/metrics", headers=REMOTE, trust_env=False,
                     timeout=TIMEOUT).status_code == 200
    from pgcast.gateway import create_app

    for bad in ("short", " " + secret, "m" * 15 + "\n"):
        with pytest.raises(ValueError, match="metrics_token"):
            create_app("postgresql://nowhere", metrics_token=bad)


def test_pgcast_serve_metrics_options(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pgcast.cli import build_parser
    from pgcast.cli._common import UsageError
    from pgcast.cli.gateway import read_metrics_token

    parser = build_parser()
    monkeypatch.delenv("PGCAST_METRICS_TOKEN", raising=False)
    assert read_metrics_token(parser.parse_args(["serve"])) is None
    path = tmp_path / "token"
    path.write_text("t" * 20 + "\n")
    args = parser.parse_args(["serve", "--metrics-token-file", str(path)])
    assert read_metrics_token(args) == "t" * 20
    monkeypatch.setenv("PGCAST_METRICS_TOKEN", "e" * 16)
    assert read_metrics_token(parser.parse_args(["serve"])) == "e" * 16
    with pytest.raises(UsageError, match="exclude each other"):
        read_metrics_token(parser.parse_args(["serve", "--metrics-public"]))
    monkeypatch.setenv("PGCAST_METRICS_TOKEN", "short")
    with pytest.raises(UsageError, match="at least 16"):
        read_metrics_token(parser.parse_args(["serve"]))
    with pytest.raises(UsageError, match="cannot read"):
        read_metrics_token(parser.parse_args(
            ["serve", "--metrics-token-file", str(tmp_path / "missing")]))


def test_the_demo_page_never_shows_the_database_password() -> None:
    """``pgcast demo --dsn postgresql://u:secret@... --host 0.0.0.0`` put the
    password on a page anyone reaching the host could read."""
    from pgcast.cli.gateway import demo_command, without_password

    for dsn in ("postgresql://u:s3cret-pw@db.example/app",
                "host=db.example user=u password=s3cret-pw dbname=app",
                "postgresql://u@db.example/app?password=s3cret-pw"):
        shown = demo_command("psql", without_password(dsn))
        assert "s3cret-pw" not in shown and "db.example" in shown, shown
    plain = "postgresql://u@db.example/app"
    assert without_password(plain) == plain


# -- TLS handshakes, slowloris ------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float, trickle: bool = False) -> float:
    """Seconds until the server closes *sock* (it sends nothing, or with
    *trickle* one byte of a ClientHello every 0.2 s); fails after *seconds*."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            if trickle:
                try:
                    sock.send(b"\x16")
                except OSError:
                    return time.monotonic() - start
        except OSError:  # reset
            return time.monotonic() - start
    raise AssertionError(f"the connection was still open after {seconds} s")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_tls_handshakes_are_bounded_in_time_and_number(
    gateway: Callable[..., Gateway], unique_channel: str, tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch, loop: str,
) -> None:
    """TCP to the TLS port and no handshake (or one byte of it at a time)
    was held 60 s (uvloop's default), by nobody counted: 3,000 took the
    process from 49 MB to 201 MB and 3,000 descriptors for 58 s. Now the
    handshake has HEADER_TIMEOUT, and past MAX_UNFINISHED handshakes the
    oldest is closed, so an honest client still gets in. With either loop
    (each has its own TLS protocol)."""
    from pgcast.gateway import _linger, _tls
    from test_gateway_serve_ops import self_signed

    monkeypatch.setattr(_linger, "HEADER_TIMEOUT", 1.0)
    monkeypatch.setattr(_linger, "MAX_UNFINISHED", 20)
    cert, key = self_signed(tmp_path)
    gw = gateway(server_options={"ssl_certfile": str(cert), "ssl_keyfile": str(key),
                                 "loop": loop})
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT)

    with connect() as idle, connect() as slow:
        assert _closed_within(idle, 5.0) < 3.0
        assert _closed_within(slow, 5.0, trickle=True) < 3.0
    held = [connect() for _ in range(60)]
    try:
        time.sleep(0.5)
        assert len(_tls._handshaking) <= 20
        assert _closed_within(held[0], 0.5) < 0.5  # the oldest went first
        r = httpx.get(f"https://127.0.0.1:{gw.port}/healthz", verify=context,
                      trust_env=False, timeout=TIMEOUT)
        assert r.status_code == 200
    finally:
        for sock in held:
            sock.close()

    async def wss() -> None:
        async with ws_connect(f"wss://127.0.0.1:{gw.port}/ws", ssl=context) as ws:
            await subscribe(ws, unique_channel)
            # The connection is https to the app: same-origin check by scheme.
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}

    run(wss())


def test_plain_http_headers_one_byte_a_second_are_cut_off(
    gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slowloris on plain HTTP: a request line and headers trickled a byte
    at a time are closed at HEADER_TIMEOUT from the connection's start, not
    from the last byte (pinned; it held before this round)."""
    from pgcast.gateway import _linger

    monkeypatch.setattr(_linger, "HEADER_TIMEOUT", 1.0)
    gw = gateway()
    request_bytes = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nX-A: b".encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as sock:
        start = time.monotonic()
        sock.settimeout(0.2)
        for i in range(50):  # 10 s at most
            try:
                sock.send(request_bytes[i % len(request_bytes):][:1])
                if sock.recv(4096) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - start
    assert elapsed < 3.0, f"a trickled request was held {elapsed:.1f} s"


def test_an_honest_request_gets_through_a_slowloris_at_the_limit(
    gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At MAX_UNFINISHED connections still sending headers, a new one was
    closed at once: a slowloris holding the limit turned every honest client
    away (for as long as it lasted). Now the oldest goes instead."""
    from pgcast.gateway import _linger

    monkeypatch.setattr(_linger, "MAX_UNFINISHED", 10)
    gw = gateway()
    partial = f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n".encode()
    held = []
    try:
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT)
            sock.sendall(partial)
            held.append(sock)
        time.sleep(0.3)
        assert len(_linger._unfinished) == 10
        for _ in range(3):
            r = httpx.get(f"{gw.http}/healthz", trust_env=False, timeout=TIMEOUT)
            assert r.status_code == 200
    finally:
        for sock in held:
            sock.close()


# -- subscribe/unsubscribe churn ---------------------------------------------------


def test_churn_on_a_channel_does_not_listen_and_unlisten_each_time(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
) -> None:
    """Subscribe, unsubscribe, again, 30 times: each was a LISTEN and an
    UNLISTEN on the one shared connection, under the lock every subscribe
    takes (100 clients churning at their request limit: an honest
    subscribe's p50 went from 1.7 ms to 13.8 ms). A channel now stays
    LISTENed UNLISTEN_DELAY after its last subscriber, and its UNLISTEN goes
    with the others of that time."""
    gw = gateway()
    aps = gw.hub._aps
    assert aps is not None
    calls: list[str] = []
    listen, unlisten = aps.listen, aps.unlisten

    async def counted_listen(*channels: str, **kw: Any) -> Any:
        calls.append("listen")
        return await listen(*channels, **kw)

    async def counted_unlisten(*channels: str) -> Any:
        calls.append("unlisten")
        return await unlisten(*channels)

    aps.listen = counted_listen  # type: ignore[method-assign]
    aps.unlisten = counted_unlisten  # type: ignore[method-assign]

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            for _ in range(30):
                await subscribe(ws, unique_channel)
                reply = await request(ws, {"type": "unsubscribe", "channels": [unique_channel]})
                assert reply["type"] == "unsubscribed"
            await subscribe(ws, unique_channel)
            await asyncio.to_thread(psql, f"NOTIFY \"{unique_channel}\", 'after churn'")
            frame = await recv(ws)
            assert (frame["channel"], frame["payload"]) == (unique_channel, "after churn")
        assert calls.count("listen") == 1, calls
        assert calls.count("unlisten") <= 1, calls

    run(main())
    # Nobody wants it any more: UNLISTENed within the delay.
    gw.wait_metric("pgcast_gateway_channels", lambda v: v == 0)
    assert gw.hub.listening() == frozenset()


def test_pgcast_serve_warns_that_trusting_any_proxy_trusts_the_client(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With --forwarded-allow-ips '*' uvicorn takes the first X-Forwarded-For
    entry, which the client writes: the per-address cap and /metrics'
    loopback check would believe it (the deployment guide recommended '*')."""
    from pgcast.cli import build_parser
    from pgcast.cli.gateway import serve_options

    parser = build_parser()
    serve_options(parser.parse_args(["serve"]))
    assert "warning" not in capsys.readouterr().err
    serve_options(parser.parse_args(["serve", "--forwarded-allow-ips", "10.0.0.1, *"]))
    err = capsys.readouterr().err
    assert "--forwarded-allow-ips '*'" in err and "X-Forwarded-For $remote_addr" in err
    serve_options(parser.parse_args(["serve", "--forwarded-allow-ips", "*",
                                     "--no-proxy-headers"]))
    assert "warning" not in capsys.readouterr().err
