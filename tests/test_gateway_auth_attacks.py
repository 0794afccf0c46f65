"""Attacks on the gateway's token handling (issue 12 item 3), from the doors
``test_gateway_tokens`` does not use: a cookie against an explicit token, a
client waiting for its auth frame at shutdown, an access narrowed by a fresh
token while psql and another client keep sending on the channel it lost, and
authorizers returning an unusable expiry.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

import test_gateway_server
from pgcast import AccessDenied
from pgcast.gateway import Access, create_app
from test_gateway_server import TIMEOUT, Gateway, apsql, recv, request, run, subscribe, ws_connect

#: The fixture that starts a gateway, shared with test_gateway_server.
gateway = test_gateway_server.gateway


def _per_user(prefix: str) -> Callable[[Any, str | None], Access]:
    """The README's per-user authorizer: a user reads ``<prefix>.<user>``;
    "writer" also publishes anywhere under *prefix*."""

    def authorize(connection: Any, token: str | None) -> Access:
        if token in ("alice", "bob"):
            return Access.globs(read=[f"{prefix}.{token}"])
        if token == "writer":
            return Access.globs(read=[f"{prefix}.*"], write=[f"{prefix}.*"])
        raise AccessDenied("unknown token" if token else "a token is required")

    return authorize


def test_a_token_in_the_url_beats_the_cookie(
    gateway: Callable[..., Gateway], unique_channel: str,
) -> None:
    """An ambient cookie (stale, or tossed by a sibling subdomain) never
    overrides the token the page put in the URL, on SSE and WebSocket."""
    alice = f"{unique_channel}.alice"
    gw = gateway(authorizer=_per_user(unique_channel), allow=())

    async def main() -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT,
                                     cookies={"pgcast_token": "bob"}) as client, \
                client.stream("GET", f"{gw.http}/sse?channel={alice}&token=alice") as r:
            assert r.status_code == 200, await r.aread()
        async with ws_connect(f"{gw.ws}?token=alice",
                              additional_headers={"Cookie": "pgcast_token=bob"}) as ws:
            await subscribe(ws, alice)
        # The cookie alone is still a token.
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT,
                                     cookies={"pgcast_token": "bob"}) as client:
            r2 = await client.get(f"{gw.http}/sse?channel={alice}")
            assert r2.status_code == 403

    run(main())


def test_a_client_waiting_for_its_auth_frame_is_closed_at_shutdown(
    gateway: Callable[..., Gateway], unique_channel: str,
) -> None:
    """Shutdown closes it with 1001 like any client, without waiting for its
    (long) auth deadline."""
    gw = gateway(authorizer=_per_user(unique_channel), allow=(), auth_timeout=600)

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            await asyncio.sleep(0.2)  # let the gateway reach its wait for the auth frame
            gw.server.should_exit = True
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws, timeout=TIMEOUT)
            assert closed.value.rcvd is not None, "no close frame"
            assert closed.value.rcvd.code == 1001, closed.value.rcvd

    run(main())


def test_a_fresh_token_with_less_access_stops_every_sender(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
) -> None:
    """alice re-authenticates as bob: her channel is unsubscribed, and
    nothing more of it arrives, whether sent by psql's NOTIFY, pg_notify, or
    another gateway client's publish; bob's channel works."""
    alice, bob = f"{unique_channel}.alice", f"{unique_channel}.bob"
    gw = gateway(authorizer=_per_user(unique_channel), allow=())

    async def main() -> None:
        async with ws_connect(f"{gw.ws}?token=alice") as ws, \
                ws_connect(f"{gw.ws}?token=writer") as writer:
            await subscribe(ws, alice)
            await apsql(psql, f"NOTIFY \"{alice}\", 'before'")
            assert (await recv(ws))["payload"] == "before"
            assert await request(ws, {"type": "auth", "token": "bob"}) == {
                "type": "unsubscribed", "channels": [alice]}
            assert (await recv(ws))["type"] == "authenticated"
            await apsql(psql, f"NOTIFY \"{alice}\", 'after-notify'")
            await apsql(psql, f"SELECT pg_notify('{alice}', 'after-pg-notify')")
            reply = await request(writer, {"type": "publish", "channel": alice,
                                           "payload": "after-publish"})
            assert reply["type"] == "published"
            # Re-subscribing to alice's channel is refused now.
            reply = await request(ws, {"type": "subscribe", "channels": [alice]})
            assert reply["type"] == "error"
            await subscribe(ws, bob)
            await apsql(psql, f"NOTIFY \"{bob}\", 'marker'")
            # Frames arrive in order: anything of alice's would come first.
            frame = await recv(ws)
            assert frame.get("payload") == "marker", frame

    run(main())


@pytest.mark.parametrize(
    ("expires", "error"),
    [(math.nan, ValueError), (math.inf, ValueError), (-math.inf, ValueError),
     ("1700000000", TypeError), (True, TypeError)],
)
def test_access_expires_must_be_a_finite_number(expires: Any, error: type[Exception]) -> None:
    # A NaN expiry fired at once and went out as NaN in "authenticated",
    # which JSON.parse rejects (the class of issue 12 item 10).
    with pytest.raises(error, match=r"Access\.expires"):
        Access(expires=expires)
    with pytest.raises(error, match=r"Access\.expires"):
        Access.globs(read=["a"], expires=expires)
    assert Access(expires=1.5e9).expires == 1.5e9
    assert Access(expires=2_000_000_000).expires == 2_000_000_000


def test_an_authorizer_with_a_bad_expiry_lets_no_one_in(
    gateway: Callable[..., Gateway], unique_channel: str,
) -> None:
    """The mistake surfaces as a refused connection, not as a client admitted
    with a broken expiry; the gateway keeps serving others."""

    def authorize(connection: Any, token: str | None) -> Access:
        if token == "good":
            return Access.globs(read=["*"])
        return Access.globs(read=["*"], expires=math.nan)

    gw = gateway(authorizer=authorize, allow=())

    async def main() -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            r = await client.get(f"{gw.http}/sse?channel={unique_channel}&token=bad")
            assert r.status_code >= 400
        with pytest.raises(Exception):  # noqa: B017 (the handshake fails, however)
            async with ws_connect(f"{gw.ws}?token=bad") as ws:
                await ws.send(json.dumps({"type": "ping"}))
                await recv(ws)
        async with ws_connect(f"{gw.ws}?token=good") as ws:
            await subscribe(ws, unique_channel)

    run(main())


@pytest.mark.parametrize("name", ["", "a b", "a;b", "tok=en", "é", 5])
def test_token_cookie_must_be_a_cookie_name(name: Any) -> None:
    # An empty or malformed name was accepted and silently never read.
    with pytest.raises(ValueError, match="token_cookie must be a cookie name"):
        create_app("", allow=["*"], token_cookie=name)


def test_token_cookie_none_reads_no_cookie_and_auth_timeout_is_checked() -> None:
    create_app("", allow=["*"], token_cookie=None)
    create_app("", allow=["*"], token_cookie="__Host-session")
    with pytest.raises(ValueError, match="auth_timeout must be a number of seconds > 0"):
        create_app("", allow=["*"], auth_timeout=0)
