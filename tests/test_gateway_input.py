"""Issue 12 item 10 over HTTP: an SSE resume position that JSON.parse, or a
UTF-8 encoder, would reject is refused before the stream starts (400, saying
why), by ``?since=`` and by ``Last-Event-ID`` alike; a WebSocket ``since``
with the same values gets an error frame and the connection stays usable.
The gateway fixture is ``test_gateway_server``'s; messages come from psql.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import quote

import httpx

import test_gateway_server
from test_gateway_server import TIMEOUT, Gateway, apsql, recv, request, run, subscribe, ws_connect

#: The fixtures that start a gateway and install the durable schema.
gateway = test_gateway_server.gateway
durable_schema = test_gateway_server.durable_schema

BAD_SINCE = [
    ("NaN", "since must be a log id"),
    ("Infinity", "since must be a log id"),
    ("-Infinity", "since must be a log id"),
    ("1e400", "since must be a log id"),
    ('{"CH": NaN}', "since must be a log id"),
    ('{"CH": 1e999}', "since must be a log id"),
    ('{"\\ud800": 1}', "since must be a log id"),
    ('{"CH": 1.5}', "must be a log id"),
    ('{"CH": -1}', "must be a log id"),
    ("[1]", "since must be a log id"),
]


def test_sse_since_refuses_what_json_parse_or_utf8_would(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
    durable_schema: None,
) -> None:
    gw = gateway(durable=[unique_channel])
    base = f"{gw.http}/sse?channel={unique_channel}"

    async def main() -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            for raw, text in BAD_SINCE:
                since = raw.replace("CH", unique_channel)
                r = await client.get(f"{base}&since={quote(since)}")
                assert r.status_code == 400 and text in r.text, (since, r.text)
                r.text.encode("utf-8")  # the refusal itself is sendable
                r = await client.get(base, headers={"Last-Event-ID": since})
                assert r.status_code == 400 and text in r.text, (since, r.text)
        async with ws_connect(gw.ws) as ws:
            for raw, _ in BAD_SINCE:
                since = raw.replace("CH", unique_channel)
                channels = json.dumps([unique_channel])
                frame = f'{{"type": "subscribe", "channels": {channels}, "since": {since}}}'
                await ws.send(frame)
                reply = await recv(ws)
                assert reply["type"] == "error", (since, reply)
            assert await request(ws, {"type": "ping", "ref": 1}) == {"type": "pong", "ref": 1}
            live = f"{unique_channel}_live"  # not durable: psql's NOTIFY reaches it
            await subscribe(ws, live)
            await apsql(psql, f"NOTIFY {live}, 'still here'")
            assert (await recv(ws))["payload"] == "still here"

    run(main())
    assert gw.metrics()["pgcast_gateway_errors_total"] == len(BAD_SINCE)
