"""The public handle on a gateway: ``create_app(...).gateway`` (a Gateway).

Publishing from the host application starts the gateway if need be and
NOTIFYs on its connection; bad arguments are refused with pgcast's errors
before anything is sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import pgcast
from pgcast.gateway import Gateway, GatewayApp, create_app


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_create_app_returns_an_app_with_its_gateway(dsn: str) -> None:
    app = create_app(dsn)
    assert isinstance(app, GatewayApp) and isinstance(app.gateway, Gateway)
    assert not app.gateway.database_up and app.gateway.clients == 0


def test_publish_starts_the_gateway_and_notifies_on_its_connection(
    dsn: str, unique_channel: str
) -> None:
    gateway = create_app(dsn).gateway

    async def main() -> list[pgcast.Event]:
        async with await pgcast.aio.connect(dsn) as listener:
            await listener.listen(unique_channel)
            async with gateway.running():
                await gateway.publish(unique_channel, {"n": 1})
                await gateway.publish(unique_channel, "two")
                pid = gateway.backend_pid
            got = []
            async for event in listener.wait(timeout=10.0):
                assert event is not None, f"only {got!r} arrived"
                if isinstance(event, pgcast.Event):
                    got.append(event)
                if len(got) == 2:
                    break
            assert {e.pid for e in got} == {pid}
            return got

    got = run(main())
    assert [e.payload for e in got] == ['{"n":1}', "two"]


def test_publish_refuses_bad_arguments_before_sending(dsn: str) -> None:
    gateway = create_app(dsn).gateway

    async def main() -> None:
        with pytest.raises(pgcast.InvalidChannelError, match="empty"):
            await gateway.publish("", "x")
        assert not gateway.database_up  # nothing was started for it
        async with gateway.running():
            with pytest.raises(pgcast.PayloadError, match="NUL"):
                await gateway.publish("fine", "a\x00b")
            with pytest.raises(pgcast.PayloadError, match="set"):
                await gateway.publish("fine", {1, 2})  # type: ignore[arg-type]

    run(main())


def test_publish_without_a_database_raises_connect_error() -> None:
    gateway = create_app("postgresql://nobody@127.0.0.1:1/none",
                         connect_kwargs={"connect_timeout": 2}).gateway

    async def main() -> None:
        with pytest.raises(pgcast.ConnectError):
            await gateway.publish("orders", "x")

    run(main())


def test_the_gateway_retries_its_database_by_the_backoff_it_was_given(dsn: str) -> None:
    """One policy: the Backoff given to create_app is the one its LISTEN
    connection reconnects with (and the gateway's own fallback loop)."""
    from pgcast.gateway._client import GATEWAY_BACKOFF

    policy = pgcast.Backoff(initial=0.05, maximum=1.0)
    app = create_app(dsn, reconnect_backoff=policy)
    hub = app.state.pgcast_gateway
    assert hub.settings.reconnect_backoff is policy
    assert create_app(dsn).state.pgcast_gateway.settings.reconnect_backoff is GATEWAY_BACKOFF

    async def main() -> None:
        async with app.gateway.running():
            assert hub._aps._res.backoff is policy

    run(main())
    with pytest.raises(TypeError, match=r"reconnect_backoff must be a pgcast\.Backoff"):
        create_app(dsn, reconnect_backoff=0.5)  # type: ignore[arg-type]
