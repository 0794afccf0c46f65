"""Issue 12 item 2 from every publishing door: alice resumes (SSE
``Last-Event-ID`` and ``?since=``, WebSocket ``since``) with positions naming
bob's durable channel, while bob's messages go into the log by SQL
``pgcast.notify``, by the library's ``PubSub.notify(durable=True)``, and as
forged references on alice's own channel (raw ``NOTIFY`` and ``pg_notify``
of ``"\\x1epgcast:<bob's id>"``). Nothing of bob's may reach her, however
it was sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import psycopg

import pgcast
import test_gateway_server
from pgcast import AccessDenied
from pgcast.gateway import Access
from test_gateway_server import TIMEOUT, Gateway, recv, run, ws_connect

#: The fixtures that start a gateway and install the durable schema.
gateway = test_gateway_server.gateway
durable_schema = test_gateway_server.durable_schema
publish_durably = test_gateway_server.publish_durably


def test_no_door_replays_or_forwards_bobs_log_to_alice(
    gateway: Callable[..., Gateway], dsn: str, conn: psycopg.Connection[Any],
    unique_channel: str, durable_schema: None,
) -> None:
    alice, bob = f"{unique_channel}.alice", f"{unique_channel}.bob"

    def authorizer(connection: Any, token: str | None) -> Access:
        if token in ("alice", "bob"):
            return Access.globs(read=[f"{unique_channel}.{token}"])
        raise AccessDenied("unknown token")

    gw = gateway(authorizer=authorizer, allow=(), durable=[f"{unique_channel}.*"])
    ids = publish_durably(conn, bob, "bob-secret-sql")
    with pgcast.connect(dsn) as ps:
        lib_id = ps.notify(bob, "bob-secret-lib", durable=True)
    assert lib_id is not None
    ids.append(lib_id)

    def send_bob_by_every_door(marker: str) -> None:
        """bob's new messages, forged references to his rows on alice's
        channel, then alice's *marker* (which must come, and nothing of bob's)."""
        (new,) = publish_durably(conn, bob, "bob-secret-live")
        with pgcast.connect(dsn) as ps:
            ps.notify(bob, "bob-secret-live-lib", durable=True)
        for row in (*ids, new):
            conn.execute(f"NOTIFY \"{alice}\", '\x1epgcast:{row}'")
            conn.execute("SELECT pg_notify(%s, %s)", (alice, f"\x1epgcast:{row}:x"))
        publish_durably(conn, alice, marker)

    def check(frames: list[dict[str, Any]], marker: str) -> None:
        assert frames and frames[-1].get("payload") == marker, frames
        for frame in frames:
            assert frame.get("channel") != bob, frame
            assert "bob-secret" not in json.dumps(frame), frame

    async def sse(url: str, headers: dict[str, str], marker: str) -> None:
        frames: list[dict[str, Any]] = []
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
                client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            lines = response.aiter_lines()
            for _ in range(1000):
                line = await asyncio.wait_for(anext(lines), TIMEOUT)
                if not line.startswith("data: "):
                    continue
                frames.append(json.loads(line[6:]))
                if frames[-1]["type"] == "subscribed":
                    await asyncio.to_thread(send_bob_by_every_door, marker)
                if frames[-1].get("payload") == marker:
                    check(frames, marker)
                    return
        raise AssertionError(f"no {marker!r} in {frames}")

    async def main() -> None:
        base = f"{gw.http}/sse?channel={alice}&token=alice"
        both = json.dumps({alice: 0, bob: 0})
        await sse(base, {"Last-Event-ID": both}, "alice-1")
        await sse(f"{base}&since={both}", {}, "alice-2")
        await sse(f"{base}&since=0", {}, "alice-3")
        async with ws_connect(f"{gw.ws}?token=alice") as ws:
            await ws.send(json.dumps({"type": "subscribe", "channels": [alice], "since": 0}))
            frames = [await recv(ws)]
            assert frames[0]["type"] == "subscribed", frames
            await asyncio.to_thread(send_bob_by_every_door, "alice-4")
            for _ in range(1000):
                frames.append(await recv(ws))
                if frames[-1].get("payload") == "alice-4":
                    break
            check(frames, "alice-4")

    run(main())
