"""A determined client against a real ``pgcast serve`` path (uvicorn with the
direct WebSocket protocol) and real PostgreSQL: each gate tried through
another door. Every attempt is refused with an error naming the limit, and
the gateway goes on serving an honest client.

Holes these tests found (each failed before its fix): request headers of any
size (httptools sets no limit: 100 MB of short header lines took the process
to 1.5 GB); pongs piling up for a client that pings and never reads; no bound
on the distinct channels of all clients together (each a LISTEN that
PostgreSQL scans on every LISTEN and notification); SSE streams and resumes
whose client stopped reading never dropped when the queue did not overflow;
a raw NOTIFY imitating a log reference, without the pgcast schema, ending
the LISTEN loop; a message of a million 1-byte fragments held as a million
objects.
"""

# ruff: noqa: F811  (the gateway fixture is imported, then requested by name)
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
import unicodedata
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from pgcast.durable._schema import REF_PREFIX
from pgcast.gateway import Access
from test_gateway_server import (
    TIMEOUT,
    Gateway,
    durable_schema,  # noqa: F401  (a fixture)
    gateway,  # noqa: F401  (the fixture)
    publish_durably,
    recv,
    request,
    run,
    subscribe,
    ws_connect,
)


async def honest_client_still_served(gw: Gateway, channel: str, psql: Callable[..., str]) -> None:
    """A client of *channel* gets a NOTIFY sent by psql: the gateway is up."""
    async with ws_connect(gw.ws) as ws:
        await subscribe(ws, channel)
        await asyncio.to_thread(psql, f"NOTIFY \"{channel}\", 'still here'")
        frame = await recv(ws)
        assert (frame["channel"], frame["payload"]) == (channel, "still here")


def _handshake(port: int, path: str = "/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


# -- one name, many spellings ---------------------------------------------------


def test_other_spellings_of_an_allowed_name_are_other_channels(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
) -> None:
    """NFC/NFD, case, a trailing space, NUL (as JSON \\u0000 and %00), a
    name over 63 bytes that PostgreSQL would truncate onto the allowed one,
    overlong UTF-8: on WebSocket and SSE alike, each is refused or is
    another channel, never the allowed one."""
    nfc = unicodedata.normalize("NFC", f"{unique_channel}_café")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    long_allowed = (unique_channel + "_" + "x" * 63)[:63]
    gw = gateway(allow=[nfc, long_allowed])
    spellings = {
        nfd: "not allowed to subscribe",
        nfc.upper(): "not allowed to subscribe",
        nfc + " ": "not allowed to subscribe",
        nfc + "\x00": "NUL",
        long_allowed + "x": "63",  # PostgreSQL would truncate it onto long_allowed
        long_allowed[:62] + "é": "63",  # 64 bytes: cut inside a character
    }

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            for name, why in spellings.items():
                reply = await request(ws, {"type": "subscribe", "channels": [name]})
                assert reply["type"] == "error" and why in reply["message"], (name, reply)
            # The escaped spelling of NUL, and overlong UTF-8 "/" in a binary frame.
            text = '{"type": "subscribe", "channels": [' + json.dumps(nfc + "\x00") + "]}"
            assert "\\u0000" in text  # json.dumps escapes it
            await ws.send(text)
            reply = await recv(ws)
            assert reply["type"] == "error" and "NUL" in reply["message"]
            await ws.send(b'{"type": "subscribe", "channels": ["' + nfc.encode()
                          + b'\xc0\xaf"]}')
            reply = await recv(ws)
            assert reply["type"] == "error" and "not UTF-8" in reply["message"]
            await subscribe(ws, nfc, long_allowed)
            # A NOTIFY on the other spelling does not reach the allowed one.
            await asyncio.to_thread(psql, f"NOTIFY \"{nfd}\", 'other'; "
                                          f"NOTIFY \"{nfc}\", 'mine'")
            frame = await recv(ws)
            assert (frame["channel"], frame["payload"]) == (nfc, "mine")
        async with httpx.AsyncClient(timeout=TIMEOUT, trust_env=False) as client:
            for name, why in spellings.items():
                r = await client.get(f"{gw.http}/sse", params={"channel": name})
                assert r.status_code in (400, 403) and why in r.text.replace("allow-list",
                                                                             ""), (name, r.text)
            for raw in ("%00", "%C0%AF", "%FF"):
                r = await client.get(f"{gw.http}/sse?channel={nfc}{raw}")
                assert r.status_code == 400, (raw, r.text)

    run(main())


def test_a_read_only_client_cannot_publish_nor_forge_a_log_reference(
    gateway: Callable[..., Gateway], unique_channel: str, conn: psycopg.Connection[Any],
    durable_schema: None,
) -> None:
    """Publish on a channel one may only read: refused. Publish, where one
    may, a payload imitating a durable log reference (``\\x1epgcast:<id>``
    of another channel's row): the subscribers never get that row."""
    secret, room = f"{unique_channel}_secret", f"{unique_channel}_room"
    gw = gateway(allow=[room], allow_publish=[room], durable=[f"{unique_channel}*"])
    (secret_id,) = publish_durably(conn, secret, "the secret")

    async def main() -> None:
        async with ws_connect(gw.ws) as reader, ws_connect(gw.ws) as writer:
            await subscribe(reader, room)
            reply = await request(writer, {"type": "publish", "channel": secret,
                                           "payload": "x"})
            assert reply["type"] == "error" and "not allowed to publish" in reply["message"]
            for forged in (f"{REF_PREFIX}{secret_id}", f"{REF_PREFIX}{secret_id}:inline"):
                await writer.send(json.dumps({"type": "publish", "channel": room,
                                              "payload": forged}))
                await recv(writer)  # published, or an error: either way, nothing of secret
            await writer.send(json.dumps({"type": "publish", "channel": room,
                                          "payload": "last"}))
            assert (await recv(writer))["type"] == "published"
            seen = []
            while True:
                frame = await recv(reader)
                seen.append(frame)
                if frame.get("payload") == "last":
                    break
            assert all("the secret" not in json.dumps(f) for f in seen), seen
            assert all(f.get("channel") == room for f in seen if f["type"] == "message")

    run(main())


# -- resources -------------------------------------------------------------------


def test_request_headers_over_the_limit_get_431(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
) -> None:
    """httptools sets no limit on headers: 100 MB of short header lines in
    one request took the process from 50 MB to 1.5 GB, and the request was
    then served."""
    from pgcast.gateway._linger import MAX_HEADER_BYTES

    gw = gateway()
    start = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n".encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as sock:
        sock.sendall(start + b"X-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert f"request headers over {MAX_HEADER_BYTES} bytes".encode() in answer
    # A flood of short header lines, for a WebSocket upgrade too: cut off early.
    for path in ("/healthz", "/ws"):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as sock:
            sent = 0
            try:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n".encode())
                for _ in range(400):  # 20 MB at most
                    sock.sendall(b"X-B: c\r\n" * 6400)
                    sent += 1
                sock.sendall(b"\r\n")
                answer = sock.recv(4096)
            except (ConnectionResetError, BrokenPipeError, TimeoutError):
                answer = b""
            assert not answer.startswith(b"HTTP/1.1 200"), path
            assert sent < 400, f"{path}: the server read 20 MB of headers"
    # Headers under the limit (a big cookie, a long token) are fine.
    r = httpx.get(f"{gw.http}/healthz", headers={"Cookie": "c=" + "a" * 32_000},
                  timeout=TIMEOUT, trust_env=False)
    assert r.status_code == 200
    run(honest_client_still_served(gw, unique_channel, psql))


def test_a_client_pinging_without_reading_is_not_read_until_it_reads(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
) -> None:
    """Each WebSocket ping is answered by a pong; a client that never reads
    made the gateway buffer them all (2 million pings: +250 MB in 10 s).
    Now reading stops while the socket is full, so the client's own sends
    block after what the kernel buffers."""
    gw = gateway(sndbuf=16384)
    ping = bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125  # masked, 125 bytes
    burst = ping * 1000
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", gw.port))
        sock.sendall(_handshake(gw.port))
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        sock.settimeout(3.0)
        sent = 0
        deadline = time.monotonic() + 20
        try:
            while sent < 200 and time.monotonic() < deadline:  # 26 MB at most
                sock.sendall(burst)
                sent += 1
        except TimeoutError:
            pass  # the gateway stopped reading: what this test wants
        assert sent < 200, "the gateway read 200,000 pings whose pongs were never read"
        run(honest_client_still_served(gw, unique_channel, psql))
        # Once the client reads, the pongs flow and reading resumes.
        sock.settimeout(0.5)
        got = 0
        with_deadline = time.monotonic() + TIMEOUT
        while got < 1_000_000 and time.monotonic() < with_deadline:
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                break
            if not data:
                break
            got += len(data)
        assert got > 100_000
        sock.settimeout(TIMEOUT)
        sock.sendall(ping)


def test_compression_is_never_negotiated(gateway: Callable[..., Gateway]) -> None:
    """No permessage-deflate: a compressed frame (a 16 KiB frame that
    inflates to gigabytes) cannot even be sent."""
    gw = gateway()

    async def main() -> None:
        async with ws_connect(gw.ws, compression="deflate") as ws:
            assert ws.response is not None
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}

    run(main())


def test_distinct_channels_of_all_clients_are_bounded(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
) -> None:
    """Each client may have 100 channels, and there may be thousands of
    clients: LISTENs without bound (40,000 in 8 s from one address; each
    subscribe then took 30 ms under the gateway's lock, growing with every
    channel, and PostgreSQL scans the list on every notification)."""
    gw = gateway(max_channels=4, max_channels_per_address=None)  # one address here
    a = [f"{unique_channel}_a{i}" for i in range(3)]
    b = [f"{unique_channel}_b{i}" for i in range(2)]

    async def main() -> None:
        async with ws_connect(gw.ws) as one, ws_connect(gw.ws) as two:
            await subscribe(one, *a)
            reply = await request(two, {"type": "subscribe", "channels": b})
            assert reply["type"] == "error"
            assert "limit of 4 distinct channels (max_channels)" in reply["message"]
            # Channels someone already has cost nothing; one more still fits.
            await subscribe(two, a[0], a[1], b[0])
            async with httpx.AsyncClient(timeout=TIMEOUT, trust_env=False) as client:
                r = await client.get(f"{gw.http}/sse", params={"channel": b[1]})
                assert r.status_code == 503 and "max_channels" in r.text
            assert len(gw.hub.listening()) == 4
            await asyncio.to_thread(psql, f"NOTIFY \"{a[2]}\", 'ok'")
            frame = await recv(one)
            assert (frame["channel"], frame["payload"]) == (a[2], "ok")
            # Room again once channels are given up.
            await request(one, {"type": "unsubscribe", "channels": [a[2]]})
            await subscribe(two, b[1])

    run(main())


def test_pgcast_serve_max_channels_option() -> None:
    from pgcast.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve"]).max_channels == 10_000
    assert parser.parse_args(["serve", "--max-channels", "7"]).max_channels == 7


# -- SSE, the transport with no frames back ----------------------------------------


def test_an_sse_stream_ends_when_its_token_expires(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
) -> None:
    """A long-lived SSE stream outlives no token: it ends with a
    ``disconnected`` notice (code 4001) at the token's expiry; the same
    token afterwards is refused (403)."""
    expires = time.time() + 1.5

    def authorizer(connection: Any, token: str | None) -> Access:
        return Access.globs(read=[unique_channel], expires=expires)

    gw = gateway(allow=[], authorizer=authorizer)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT, trust_env=False) as client:
            url = f"{gw.http}/sse?channel={unique_channel}&token=t"
            async with client.stream("GET", url) as r:
                assert r.status_code == 200
                frames = []
                async with asyncio.timeout(TIMEOUT):
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            frames.append(json.loads(line[5:]))
                            if frames[-1]["type"] == "subscribed":
                                await asyncio.to_thread(psql, f"NOTIFY \"{unique_channel}\"")
            assert [f["type"] for f in frames] == ["subscribed", "message", "notice"]
            assert frames[-1]["code"] == 4001 and "access expired" in frames[-1]["message"]
            assert time.time() >= expires
            r = await client.get(url)
            assert r.status_code == 403 and "expired" in r.text

    run(main())
    assert gw.metrics()['pgcast_gateway_disconnects_total{reason="expired"}'] == 1


def test_an_sse_client_that_never_reads_is_dropped_and_others_are_served(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
) -> None:
    """An SSE stream nobody reads fills its queue (bounded) and is closed as
    a slow consumer; the socket is let go; a WebSocket subscriber of the same
    channel gets every message."""
    gw = gateway(sndbuf=16384, queue_size=100)
    count, payload = 400, "x" * 1000

    async def main() -> None:
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.settimeout(TIMEOUT)
            stalled.connect(("127.0.0.1", gw.port))
            stalled.sendall(f"GET /sse?channel={unique_channel} HTTP/1.1\r\n"
                            f"Host: 127.0.0.1:{gw.port}\r\n\r\n".encode())
            assert stalled.recv(64).startswith(b"HTTP/1.1 200")
            async with ws_connect(gw.ws) as good:
                await subscribe(good, unique_channel)
                for batch in range(0, count, 50):  # at the pace of the good client
                    await asyncio.to_thread(
                        psql, f"SELECT pg_notify('{unique_channel}', '{payload}' || g) "
                              f"FROM generate_series({batch}, {batch + 49}) g")
                    for i in range(batch, batch + 50):
                        assert (await recv(good))["payload"] == f"{payload}{i}"
            deadline = time.monotonic() + 3 * TIMEOUT
            while gw.hub.clients_by_transport()["sse"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not gw.hub.clients_by_transport()["sse"], "the stalled stream stayed"

    run(main())
    assert gw.metrics()['pgcast_gateway_disconnects_total{reason="slow_consumer"}'] == 1


def test_an_sse_stream_nobody_reads_is_dropped_even_when_nothing_more_comes(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SSE has no pings: a stream that stopped reading once its socket was
    full, with less than a queue's worth behind it and a quiet channel, was
    never dropped (no overflow), holding its socket and frames for good."""
    from pgcast.gateway import sse

    monkeypatch.setattr(sse, "STALL_TIMEOUT", 1.0)
    gw = gateway(sndbuf=16384)
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.settimeout(TIMEOUT)
        stalled.connect(("127.0.0.1", gw.port))
        stalled.sendall(f"GET /sse?channel={unique_channel} HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{gw.port}\r\n\r\n".encode())
        assert stalled.recv(64).startswith(b"HTTP/1.1 200")
        psql(f"SELECT pg_notify('{unique_channel}', repeat('x', 1000) || g) "
             "FROM generate_series(1, 300) g")  # more than the buffers, less than the queue
        deadline = time.monotonic() + TIMEOUT
        while gw.hub.clients_by_transport()["sse"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not gw.hub.clients_by_transport()["sse"], "the stalled stream stayed"
    assert gw.metrics()['pgcast_gateway_disconnects_total{reason="slow_consumer"}'] == 1
    run(honest_client_still_served(gw, unique_channel, psql))


def _masked(text: str) -> bytes:
    """A client's text frame (masked with a zero key), under 126 bytes."""
    data = text.encode()
    assert len(data) < 126
    return bytes([0x81, 0x80 | len(data)]) + b"\0\0\0\0" + data


def test_a_resume_nobody_reads_is_dropped_not_polled_forever(
    gateway: Callable[..., Gateway], unique_channel: str, conn: psycopg.Connection[Any],
    durable_schema: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replay waits for the client's queue to drain before reading more,
    so it never overflows: a client that resumed from 0 and never read was
    never dropped where nothing else finds it out (the generic ASGI path of
    a server without pings), its replay polling the queue every 10 ms."""
    from pgcast.gateway import _resume

    monkeypatch.setattr(_resume, "STALL_TIMEOUT", 1.0)
    gw = gateway(sndbuf=16384, queue_size=20, durable=[f"{unique_channel}*"], ws="asgi")
    conn.execute("SELECT pgcast.notify(%s, repeat('x', 1000) || g) "
                 "FROM generate_series(1, 2000) g", (unique_channel,))
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.settimeout(TIMEOUT)
        stalled.connect(("127.0.0.1", gw.port))
        stalled.sendall(_handshake(gw.port))
        assert stalled.recv(4096).startswith(b"HTTP/1.1 101")
        stalled.sendall(_masked(json.dumps({"type": "subscribe", "channels": [unique_channel],
                                            "since": 0})))
        deadline = time.monotonic() + TIMEOUT
        while gw.hub.clients_by_transport()["websocket"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not gw.hub.clients_by_transport()["websocket"], "the stalled resume stayed"
    assert gw.metrics()['pgcast_gateway_disconnects_total{reason="slow_consumer"}'] == 1


def test_a_raw_notify_imitating_a_log_reference_does_not_cut_everyone_off(
    gateway: Callable[..., Gateway], fresh_dsn: str, unique_channel: str,
) -> None:
    """Any database role may NOTIFY. One ``\\x1epgcast:<id>`` on a plain
    channel of a database without the pgcast schema ended the gateway's
    LISTEN loop: every client got ``reconnected`` and lost what came
    meanwhile; repeated, nobody got anything."""
    gw = gateway(dsn=fresh_dsn)

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            await subscribe(ws, unique_channel)
            async with await psycopg.AsyncConnection.connect(fresh_dsn,
                                                             autocommit=True) as other:
                for i in range(3):
                    await other.execute("SELECT pg_notify(%s, %s)",
                                        (unique_channel, f"{REF_PREFIX}{i + 1}"))
                    await other.execute("SELECT pg_notify(%s, %s)",
                                        (unique_channel, f"plain {i}"))
            for i in range(3):
                frame = await recv(ws)
                assert (frame["type"], frame.get("payload")) == ("message", f"plain {i}"), frame
        assert gw.metrics()["pgcast_gateway_reconnects_total"] == 0

    run(main())


def test_a_resume_of_many_channels_stops_reading_once_the_client_is_dropped(
    gateway: Callable[..., Gateway], unique_channel: str, conn: psycopg.Connection[Any],
    durable_schema: None,
) -> None:
    """One subscribe frame may resume 100 durable channels from 0: the
    replay read a first batch of each (up to 100 x 500 rows) even after the
    client had overflowed and been dropped at the first few."""
    gw = gateway(sndbuf=16384, queue_size=20, durable=[f"{unique_channel}*"])
    channels = [f"{unique_channel}_{i}" for i in range(50)]
    for channel in channels:
        conn.execute("SELECT pgcast.notify(%s, repeat('x', 2000) || g) "
                     "FROM generate_series(1, 50) g", (channel,))
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.settimeout(TIMEOUT)
        stalled.connect(("127.0.0.1", gw.port))
        stalled.sendall(_handshake(gw.port))
        assert stalled.recv(4096).startswith(b"HTTP/1.1 101")
        frame = json.dumps({"type": "subscribe", "channels": channels, "since": 0}).encode()
        stalled.sendall(bytes([0x81, 0xFE]) + len(frame).to_bytes(2, "big") + b"\0\0\0\0"
                        + frame)
        gw.wait_metric('pgcast_gateway_disconnects_total{reason="slow_consumer"}',
                       lambda n: n == 1)
        time.sleep(0.5)  # what the replay would still read
    replayed = gw.metrics()["pgcast_gateway_replayed_messages_total"]
    # The socket and the queue took ~70 (2 KB each); then each channel left
    # cost a batch (10: half the queue) after the client was gone: 420.
    assert replayed < 5 * len(channels), replayed


def test_a_message_of_a_million_fragments_is_one_buffer(
    gateway: Callable[..., Gateway], unique_channel: str, psql: Callable[..., str],
) -> None:
    """The limit on a client message (1 MiB then; 4 x max_frame_bytes, 64 KiB,
    since round 3) counts its payload bytes: sent as
    1-byte fragments, a message was a million bytes objects (7 MB sent, 50 MB
    held until it ended). Now its fragments go into one buffer; the whole is
    then refused for its size, and fragmented requests under it still work."""
    from pgcast.gateway._wsdirect import DirectProtocol

    gw = gateway()
    count = 60_000  # under the 64 KiB the server reads

    def fragment(data: bytes, opcode: int = 0x0, fin: bool = False) -> bytes:
        return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(data)]) + b"\0\0\0\0" + data

    def pending_fragments() -> list[int]:
        return [len(p.frames) for p in gw.server.server_state.connections
                if isinstance(p, DirectProtocol) and p.frames]

    with socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as sock:
        sock.sendall(_handshake(gw.port))
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        sock.sendall(fragment(b'{"type": "ping"', 0x1))
        for _ in range(count // 10_000):
            sock.sendall(fragment(b" ") * 10_000)
        deadline = time.monotonic() + TIMEOUT
        while sum(pending_fragments()) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # whatever was sent has been read
        assert pending_fragments() == [1]
        sock.sendall(fragment(b"}", fin=True))
        reply = json.loads(sock.recv(4096)[2:])
        assert reply["type"] == "error"
        assert f"frame is {count + 16} bytes; the limit is 16384" in reply["message"]
        parts = [b'{"type":', b' "ping",', b' "ref": 7}']
        sock.sendall(fragment(parts[0], 0x1) + fragment(parts[1])
                     + fragment(parts[2], fin=True))
        assert json.loads(sock.recv(4096)[2:]) == {"type": "pong", "ref": 7}
    run(honest_client_still_served(gw, unique_channel, psql))
