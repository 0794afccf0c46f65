"""Issue 12 item 6, the silent door: the replay connection's peer stops
answering without closing the socket (a NAT or firewall dropped the flow, a
host vanished). A TCP proxy between the gateway and PostgreSQL freezes the
replay connection's traffic, keeping the sockets open.

Without a bound, the frozen query held the replay lock forever, and every
later resume hung with it. Now a query unanswered within
``database_timeout`` closes its connection and runs once more on a fresh one;
if that fails too, the client gets an error frame, the subscription is
undone, and it can subscribe again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import test_gateway_server
from pgcast.embedded import EmbeddedServer
from test_gateway_server import TIMEOUT, Gateway, recv, request, run, ws_connect

#: The fixtures that start a gateway and install the durable schema.
gateway = test_gateway_server.gateway
durable_schema = test_gateway_server.durable_schema
publish_durably = test_gateway_server.publish_durably

REPLAY_APP = b"pgcast-gateway-replay"


class FreezingProxy:
    """Forwards TCP to PostgreSQL; :meth:`freeze` stops forwarding on the
    replay connections (open ones, and with ``new=True`` later ones too)
    while their sockets stay open."""

    def __init__(self, dsn: str) -> None:
        info = conninfo_to_dict(dsn)
        self.host = str(info.get("host") or "127.0.0.1")
        self.port = int(info.get("port") or 5432)
        self.frozen: set[int] = set()
        self.freeze_new = False
        self.replay_pipes: list[int] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        #: Client data containing these bytes is held back while set.
        self.hold: bytes | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def freeze(self, *, new: bool = False) -> None:
        self.frozen.update(self.replay_pipes)
        self.freeze_new = new

    def thaw(self) -> None:
        self.frozen.clear()
        self.freeze_new = False

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.host.startswith("/"):
            return await asyncio.open_unix_connection(
                os.path.join(self.host, f".s.PGSQL.{self.port}"))
        return await asyncio.open_connection(self.host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._upstream()
        self.writers += [writer, up_writer]
        pipe = id(writer)
        first = await reader.read(65536)  # the startup packet names the application
        if REPLAY_APP in first:
            self.replay_pipes.append(pipe)
            if self.freeze_new:
                self.frozen.add(pipe)
        up_writer.write(first)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(pipe, src, dst, src is reader))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, pipe: int, src: asyncio.StreamReader,
                    dst: asyncio.StreamWriter, from_client: bool) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            for _ in range(10**9):
                data = await src.read(65536)
                if not data:
                    break
                # Swallow nothing: hold it back until thawed.
                while pipe in self.frozen or (
                        from_client and self.hold is not None and self.hold in data):
                    await asyncio.sleep(0.05)
                dst.write(data)
                await dst.drain()
        dst.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task


async def sse_events(url: str, headers: dict[str, str],
                     until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The stream's data events up to the first for which *until* holds."""
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
            client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        lines = response.aiter_lines()
        for _ in range(1000):
            line = await asyncio.wait_for(anext(lines), TIMEOUT)
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if until(events[-1]):
                    return events
    raise AssertionError(f"the stream ended or ran on: {events}")


def test_a_replay_connection_that_stops_answering_is_replaced(
    gateway: Callable[..., Gateway], dsn: str, conn: psycopg.Connection[Any],
    unique_channel: str, durable_schema: None,
) -> None:
    ids = publish_durably(conn, unique_channel, "one", "two", "three")

    async def resume(gw: Gateway) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with ws_connect(gw.ws) as ws:
            reply = await request(ws, {"type": "subscribe", "channels": [unique_channel],
                                       "since": 0})
            frames = [] if reply["type"] == "error" else [await recv(ws) for _ in range(3)]
            return reply, frames

    async def main() -> None:
        proxy = FreezingProxy(dsn)
        port = await proxy.start()
        try:
            # The proxy serves every connection; only the replay ones freeze.
            via = make_conninfo(dsn, host="127.0.0.1", port=port, sslmode="disable")
            gw = await asyncio.to_thread(
                gateway, dsn=via, durable=[unique_channel], database_timeout=1.0)
            reply, frames = await resume(gw)
            assert reply["type"] == "subscribed"
            assert [f["id"] for f in frames] == ids
            # Its peer goes silent: the next resume runs on a fresh connection.
            proxy.freeze()
            reply, frames = await resume(gw)
            assert reply["type"] == "subscribed", reply
            assert [f["payload"] for f in frames] == ["one", "two", "three"]
            # Silent for the fresh one too: an error frame, nothing left behind.
            proxy.freeze(new=True)
            async with ws_connect(gw.ws) as ws:
                reply = await request(ws, {"type": "subscribe", "channels": [unique_channel],
                                           "since": 0})
                if reply["type"] == "subscribed":
                    reply = await recv(ws, timeout=TIMEOUT)
                assert reply["type"] == "error", reply
                assert "no answer within 1 s" in reply["message"], reply
                assert "subscribe again" in reply["message"], reply
                proxy.thaw()
                reply = await request(ws, {"type": "subscribe", "channels": [unique_channel],
                                           "since": ids[1]})
                assert reply["channels"] == [unique_channel]
                assert reply["recovered"] == {unique_channel: True}
                assert (await recv(ws))["payload"] == "three"
            # SSE: the error event ends the stream; EventSource's retry resumes.
            proxy.freeze(new=True)
            url = f"{gw.http}/sse?channel={unique_channel}"
            head = {"Last-Event-ID": json.dumps({unique_channel: 0})}
            events = await sse_events(url, head, until=lambda e: e["type"] == "error")
            # The log is read before the subscription (whether the resume
            # is complete): the error comes first, nothing changed.
            assert [e["type"] for e in events] == ["error"], events
            assert "no answer within 1 s" in events[-1]["message"], events
            proxy.thaw()
            events = await sse_events(url, head, until=lambda e: e.get("payload") == "three")
            assert [e.get("payload") for e in events[1:]] == ["one", "two", "three"], events
        finally:
            proxy.thaw()
            await proxy.close()

    run(main())


def test_metrics_answer_while_the_database_stops_answering(
    gateway: Callable[..., Gateway], dsn: str,
) -> None:
    """Every /metrics request waits for the one read of the NOTIFY queue
    usage in flight: a peer that stops answering it (the query held back by
    the proxy) must not hang them all. They answer without the gauge."""

    async def main() -> None:
        proxy = FreezingProxy(dsn)
        port = await proxy.start()
        try:
            via = make_conninfo(dsn, host="127.0.0.1", port=port, sslmode="disable")
            gw = await asyncio.to_thread(
                gateway, dsn=via, database_timeout=1.0, metrics_cache=0.001)
            proxy.hold = b"pg_notification_queue_usage"
            async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
                replies = await asyncio.gather(
                    *(client.get(f"{gw.http}/metrics") for _ in range(20)))
                assert {r.status_code for r in replies} == {200}
                assert all("pgcast_gateway_notify_queue_usage " not in r.text
                           for r in replies)
                assert "pgcast_gateway_clients" in replies[0].text
                proxy.hold = None
                r = await client.get(f"{gw.http}/metrics")
                assert "pgcast_gateway_notify_queue_usage " in r.text, r.text
        finally:
            proxy.hold = None
            proxy.thaw()
            await proxy.close()

    run(main())


@pytest.mark.usefixtures("durable_schema")
def test_the_replay_connection_comes_back_after_a_server_restart(
    gateway: Callable[..., Gateway], server: EmbeddedServer, conn: psycopg.Connection[Any],
    unique_channel: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """The other loud door: PostgreSQL restarts between two resumes. The
    replay connection from before is dead; the next resume replays on a
    fresh one (no error frame), and the channel is live afterwards."""
    ids = publish_durably(conn, unique_channel, "one", "two", "three")
    gw = gateway(durable=[unique_channel], database_timeout=30)

    async def frame(ws: Any) -> dict[str, Any]:
        for _ in range(10):  # past the "reconnected" notice, whenever it comes
            got = await recv(ws, timeout=30)
            if got["type"] != "notice":
                return got
        raise AssertionError("only notices")

    async def resume(ws: Any, since: int, count: int) -> list[str]:
        await ws.send(json.dumps({"type": "subscribe", "channels": [unique_channel],
                                  "since": since}))
        reply = await frame(ws)
        assert reply["type"] == "subscribed", reply
        assert reply["recovered"] == {unique_channel: True}, reply
        return [(await frame(ws))["payload"] for _ in range(count)]

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            assert await resume(ws, 0, 3) == ["one", "two", "three"]
        await asyncio.to_thread(server.restart)
        async with ws_connect(gw.ws) as ws:
            # Whether or not the LISTEN connection is back yet, the subscribe
            # waits for it (database_timeout); the replay reopens its own.
            assert await resume(ws, ids[0], 2) == ["two", "three"]
            with psycopg.connect(server.dsn, autocommit=True) as c:
                (four,) = publish_durably(c, unique_channel, "four")
            live = await frame(ws)
            assert (live["payload"], live["id"]) == ("four", four)

    caplog.set_level(logging.INFO, logger="pgcast.gateway")
    run(main())
    assert "the replay connection broke; reopening it" in caplog.text
