"""Per-client rate limits and the per-address cap (issue 12 item 12): a
flooding publisher is refused then closed (4029) while the subscribers of its
channel keep their connections; subscribe floods and garbage floods are
limited too; one address cannot hold more than its share of the gateway."""

# ruff: noqa: F811  (the gateway fixture is imported, then requested by name)
from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pgcast.gateway import RateLimits
from pgcast.gateway._ratelimit import ClientLimiter, TokenBucket
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


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(10, 20, clock)
    assert [bucket.take() for _ in range(20)] == [0.0] * 20
    assert bucket.take() == pytest.approx(0.1)
    clock.now += 0.5
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    assert bucket.take() > 0
    clock.now += 1000
    assert [bucket.take() for _ in range(20)] == [0.0] * 20  # capped at the burst
    assert bucket.take() > 0
    assert bucket.take(21) == float("inf")


def test_a_client_refused_too_often_must_go() -> None:
    clock = Clock()
    limiter = ClientLimiter(RateLimits(publishes_per_second=1, publish_burst=1,
                                       max_refusals=3, refusal_window=10), clock)
    assert limiter.check_publish(10) is None
    why = limiter.check_publish(10)
    assert why is not None and "at most 1 publishes a second (bursts of 1)" in why
    assert not limiter.refused() and not limiter.refused()
    clock.now += 11  # the window slid past both
    assert not limiter.refused() and not limiter.refused()
    assert limiter.refused()
    bytes_limiter = ClientLimiter(RateLimits(publish_bytes_per_second=1000,
                                             publish_bytes_burst=8000), clock)
    assert bytes_limiter.check_publish(7000) is None
    why = bytes_limiter.check_publish(7000)
    assert why is not None and "payload bytes" in why


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"publishes_per_second": 0}, "publishes_per_second must be a number > 0"),
        ({"requests_per_second": float("nan")}, "requests_per_second"),
        ({"publish_burst": 0}, "publish_burst must be an integer >= 1"),
        ({"max_refusals": True}, "max_refusals"),
        ({"refusal_window": 0}, "refusal_window"),
        ({"publish_bytes_burst": 100}, "one largest payload"),
    ],
)
def test_rate_limits_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimits(**options)


def test_a_flooding_publisher_is_refused_then_closed_and_subscribers_keep_up(
    gateway: Callable[..., Gateway], unique_channel: str
) -> None:
    limits = RateLimits(publishes_per_second=5, publish_burst=20, max_refusals=30,
                        refusal_window=60)
    gw = gateway(allow_publish=[unique_channel], rate_limits=limits, queue_size=100)

    async def main() -> None:
        async with ws_connect(gw.ws) as sub, ws_connect(gw.ws) as flood:
            await subscribe(sub, unique_channel)
            frame = json.dumps({"type": "publish", "channel": unique_channel,
                                "payload": "x" * 7000})
            for _ in range(200):
                try:
                    await flood.send(frame)
                except ConnectionClosed:
                    break
            replies: list[dict[str, Any]] = []
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(500):
                    replies.append(await recv(flood))
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4029
            assert "rate limited" in closed.value.rcvd.reason
            errors = [r for r in replies if r["type"] == "error"]
            published = [r for r in replies if r["type"] == "published"]
            assert 20 <= len(published) < 40, len(published)
            assert len(errors) == 30
            assert "at most 5 publishes a second (bursts of 20)" in errors[0]["message"]
            # The subscriber got each accepted publish and is still connected.
            got = [await recv(sub) for _ in range(len(published))]
            assert all(m["type"] == "message" for m in got)
            assert await request(sub, {"type": "ping"}) == {"type": "pong"}

    run(main())
    metrics = gw.metrics()
    assert metrics['pgcast_gateway_rate_limited_total{kind="publish"}'] == 30
    assert metrics['pgcast_gateway_disconnects_total{reason="rate_limited"}'] == 1
    assert metrics['pgcast_gateway_disconnects_total{reason="slow_consumer"}'] == 0


def test_subscribe_pings_and_garbage_share_the_request_limit(
    gateway: Callable[..., Gateway], unique_channel: str
) -> None:
    limits = RateLimits(requests_per_second=1, request_burst=6, max_refusals=1000)
    gw = gateway(rate_limits=limits)

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            await subscribe(ws, unique_channel)
            assert (await request(ws, {"type": "unsubscribe", "channels": [unique_channel]}))[
                "type"] == "unsubscribed"
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}
            await ws.send("not json")
            assert "not valid JSON" in (await recv(ws))["message"]
            await subscribe(ws, unique_channel)
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}
            for frame in ({"type": "subscribe", "channels": ["other"]}, {"type": "ping"}):
                reply = await request(ws, frame)
                assert reply["type"] == "error" and "requests a second" in reply["message"]
            await ws.send("garbage")
            assert "requests a second" in (await recv(ws))["message"]
        # Without limits nothing of this is refused.
    run(main())
    unlimited = gateway(rate_limits=None)

    async def free() -> None:
        async with ws_connect(unlimited.ws) as ws:
            for _ in range(300):
                assert await request(ws, {"type": "ping"}) == {"type": "pong"}

    run(free())


def _from(address: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((address, 0))
    return sock


def test_connections_per_address_over_websocket_and_sse(
    gateway: Callable[..., Gateway], unique_channel: str
) -> None:
    gw = gateway(max_clients_per_address=2)
    sse = f"{gw.http}/sse?channel={unique_channel}"

    async def main() -> None:
        async with ws_connect(gw.ws) as a, httpx.AsyncClient(
                trust_env=False, timeout=TIMEOUT) as client:
            async with client.stream("GET", sse) as stream:
                assert stream.status_code == 200
                with pytest.raises(InvalidStatus) as info:
                    async with ws_connect(gw.ws):
                        pass
                assert info.value.response.status_code == 429
                assert b"the limit per address is 2" in info.value.response.body
                r = await client.get(sse)
                assert r.status_code == 429 and "127.0.0.1" in r.text
                # Another address has its own allowance.
                sock = _from("127.0.0.2")
                sock.connect(("127.0.0.1", gw.port))
                async with ws_connect(gw.ws, sock=sock) as other:
                    await subscribe(other, unique_channel)
            await subscribe(a, unique_channel)
        # Both gone: the address may connect again (bounded wait for the detach).
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                async with ws_connect(gw.ws) as b, ws_connect(gw.ws) as c:
                    await subscribe(b, unique_channel)
                    await subscribe(c, unique_channel)
                break
            except InvalidStatus:
                assert time.monotonic() < deadline, "the address's count never went down"
                await asyncio.sleep(0.05)

    run(main())
    assert gw.metrics()['pgcast_gateway_rejected_total{reason="per_address"}'] >= 2


def test_pgcast_serve_rate_limit_options() -> None:
    import argparse

    from pgcast.cli._common import UsageError
    from pgcast.cli.gateway import rate_limits

    def args(**kw: Any) -> argparse.Namespace:
        base = {"no_rate_limits": False, "publish_rate": 100.0, "request_rate": 50.0,
                "total_publish_rate": 1000.0}
        return argparse.Namespace(**{**base, **kw})

    assert rate_limits(args()) == RateLimits()
    assert rate_limits(args(no_rate_limits=True)) is None
    limits = rate_limits(args(publish_rate=3.0))
    assert limits.publishes_per_second == 3 and limits.publish_burst == 6
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(UsageError, match="publishes_per_second"):
            rate_limits(args(publish_rate=bad))
