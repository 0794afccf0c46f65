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
from collections.abc import Callable
from typing import Any

import psycopg

from pgcast.gateway import RateLimits
from test_gateway_server import (
    TIMEOUT,
    Gateway,
    gateway,  # noqa: F401  (the fixture)
    request,
    run,
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
