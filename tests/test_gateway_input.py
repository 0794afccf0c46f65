"""Issue 12 item 10 over HTTP: an SSE resume position that JSON.parse, or a
UTF-8 encoder, would reject is refused before the stream starts (400, saying
why), by ``?since=`` and by ``Last-Event-ID`` alike; a WebSocket ``since``
with the same values gets an error frame and the connection stays usable.
A notification that is not UTF-8 (a database in SQL_ASCII) reaches clients as
valid JSON with its bytes in ``raw``.
The gateway fixture is ``test_gateway_server``'s; messages come from psql.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from urllib.parse import quote

import httpx
import psycopg
import pytest
from psycopg import sql
from websockets.exceptions import InvalidStatus

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


def test_sse_query_bytes_that_are_not_utf8_are_refused(
    gateway: Callable[..., Gateway], unique_channel: str,
) -> None:
    """Decoded leniently, ``%FF`` and an encoded surrogate became U+FFFD: the
    client was subscribed to a channel it never named. Refused instead, in
    the channel, the position and the token; proper UTF-8 still works."""
    gw = gateway()
    base = f"{gw.http}/sse?channel={unique_channel}"

    async def main() -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            for url in (f"{gw.http}/sse?channel=%FF", f"{gw.http}/sse?channel=%ED%A0%80",
                        f"{gw.http}/sse?channel=a%C3", f"{base}&since=%ED%A0%80",
                        f"{base}&token=%FF%FE", f"{base}&x=%80"):
                r = await client.get(url)
                assert r.status_code == 400, (url, r.status_code, r.text)
                assert "not UTF-8 once percent-decoded" in r.text, r.text
            # The WebSocket upgrade too (the token or any parameter).
            for query in ("token=%FF%FE", "x=%ED%A0%80"):
                with pytest.raises(InvalidStatus) as info:
                    async with ws_connect(f"{gw.ws}?{query}"):
                        pass
                assert info.value.response.status_code == 400
                assert b"not UTF-8 once percent-decoded" in info.value.response.body
            async with ws_connect(f"{gw.ws}?token=%C3%A9") as ws:
                await subscribe(ws, unique_channel)
            async with client.stream("GET", f"{base}_%C3%A9") as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        assert json.loads(line[6:])["channels"] == [f"{unique_channel}_é"]
                        break

    run(main())


def test_a_payload_that_is_not_utf8_reaches_clients_with_its_bytes(
    gateway: Callable[..., Gateway], sql_ascii_dsn: str, unique_channel: str,
) -> None:
    """On a database in SQL_ASCII, NOTIFY from a LATIN1 session carries
    "caf\\xe9": the server ended the gateway's listening session over it (a
    ``reconnected`` notice to every client, the next messages lost). Now
    the message arrives, U+FFFD in ``payload`` and the bytes in ``raw``."""
    gw = gateway(dsn=sql_ascii_dsn)

    def latin1_notify(*payloads: str) -> int:
        with psycopg.connect(sql_ascii_dsn, autocommit=True, connect_timeout=10,
                             client_encoding="LATIN1") as c:
            for payload in payloads:
                c.execute(sql.SQL("NOTIFY {}, {}").format(
                    sql.Identifier(unique_channel), sql.Literal(payload)))
            return c.info.backend_pid

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            await subscribe(ws, unique_channel)
            pid = gw.hub.backend_pid
            sender = await asyncio.to_thread(latin1_notify, "café", "after")
            assert await recv(ws) == {
                "type": "message", "channel": unique_channel, "payload": "caf\ufffd",
                "pid": sender, "raw": base64.b64encode(b"caf\xe9").decode(),
            }
            assert await recv(ws) == {
                "type": "message", "channel": unique_channel, "payload": "after", "pid": sender,
            }
            assert gw.hub.backend_pid == pid

    run(main())


def test_a_durable_replay_on_a_sql_ascii_database(
    gateway: Callable[..., Gateway], sql_ascii_dsn: str, unique_channel: str,
) -> None:
    """The replay connection spoke the database's SQL_ASCII: psycopg read the
    log's text as bytes, and the replay failed (KeyError on a bytes channel,
    the client closed with 1011)."""
    from pgcast.durable import install_schema

    with psycopg.connect(sql_ascii_dsn, autocommit=True, connect_timeout=10,
                         client_encoding="UTF8") as conn:
        install_schema(conn)
        ids = [int(conn.execute("SELECT pgcast.notify(%s, %s)", (unique_channel, p))
                   .fetchone()[0]) for p in ("one", "twö")]  # type: ignore[index]
    # A client in LATIN1 stores bytes that are not UTF-8 in the log: the
    # server refused to send them to the UTF-8 replay connection, and every
    # resume failed at that row.
    with psycopg.connect(sql_ascii_dsn, autocommit=True, connect_timeout=10,
                         client_encoding="LATIN1") as conn:
        ids.append(int(conn.execute("SELECT pgcast.notify(%s, %s)", (unique_channel, "café"))
                       .fetchone()[0]))  # type: ignore[index]
    gw = gateway(dsn=sql_ascii_dsn, durable=[unique_channel])

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            reply = await request(ws, {"type": "subscribe", "channels": [unique_channel],
                                       "since": 0})
            assert reply["channels"] == [unique_channel], reply
            replayed = [await recv(ws) for _ in range(3)]
            assert [(f["payload"], f["id"]) for f in replayed] == [
                ("one", ids[0]), ("twö", ids[1]), ("caf\ufffd", ids[2])]

    run(main())
