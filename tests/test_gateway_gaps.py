"""The gateway says when a resume cannot be complete (issue 13), by every door:
a WebSocket subscribe with ``since`` (and ``epoch``), an SSE ``Last-Event-ID``
or ``?since=`` (with ``?epoch=``), a prune racing the replay, and the
gateway's own reconnect. Each test tries to get a false ``recovered: true``
(or a silent replay) and checks that it cannot.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

import test_gateway_server
from pgcast.durable import install_schema
from pgcast.gateway import _resume
from pgcast.gateway._router import Outbox
from test_gateway_server import TIMEOUT, Gateway, recv, request, run, ws_connect

gateway = test_gateway_server.gateway
durable_schema = test_gateway_server.durable_schema
publish_durably = test_gateway_server.publish_durably
Conn = psycopg.Connection[Any]


def delete(conn: Conn, ids: list[int]) -> None:
    conn.execute("DELETE FROM pgcast.log WHERE id = ANY(%s)", (ids,))


def epoch_of(conn: Conn) -> str:
    return str(conn.execute("SELECT epoch FROM pgcast.meta").fetchone()[0])  # type: ignore[index]


async def frames(ws: Any, n: int) -> list[dict[str, Any]]:
    return [await recv(ws) for _ in range(n)]


async def sse(url: str, headers: dict[str, str], until: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of the stream up to the message whose payload is *until*."""
    got: list[tuple[str, dict[str, Any]]] = []
    name = "message"
    async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
            client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        lines = response.aiter_lines()
        for _ in range(1000):
            line = await asyncio.wait_for(anext(lines), TIMEOUT)
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                got.append((name, json.loads(line[6:])))
                name = "message"
                if got[-1][1].get("payload") == until:
                    return got
    raise AssertionError(f"the stream ended or ran on: {got}")


# -- WebSocket ------------------------------------------------------------------------


def test_ws_resume_says_whether_it_is_complete(
    gateway: Callable[..., Gateway], conn: Conn, unique_channel: str, durable_schema: None,
) -> None:
    ch, other = unique_channel, unique_channel + "_b"
    gw = gateway(durable=[f"{unique_channel}*"])
    ids = publish_durably(conn, ch, "a", "b", "c", "d")
    kept = publish_durably(conn, other, "x", "y")
    delete(conn, ids[:2])  # a and b are gone from ch; other is complete
    epoch = epoch_of(conn)

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            reply = await request(ws, {"type": "subscribe", "channels": [ch, other],
                                       "since": {ch: ids[0], other: kept[0]},
                                       "epoch": epoch, "ref": 1})
            assert reply == {
                "type": "subscribed", "channels": [ch, other], "epoch": epoch, "ref": 1,
                "recovered": {ch: False, other: True}, "oldest": {ch: ids[2]},
                "reason": {ch: "pruned"},
            }
            got = await frames(ws, 3)
            assert sorted(f["payload"] for f in got) == ["c", "d", "y"]  # no notice
        async with ws_connect(gw.ws) as ws:  # from after the deleted ones: complete
            reply = await request(ws, {"type": "subscribe", "channels": [ch],
                                       "since": ids[1]})
            assert reply["recovered"] == {ch: True} and "oldest" not in reply
            assert [f["payload"] for f in await frames(ws, 2)] == ["c", "d"]
        async with ws_connect(gw.ws) as ws:  # no since: the epoch, nothing else
            reply = await request(ws, {"type": "subscribe", "channels": [ch]})
            assert reply == {"type": "subscribed", "channels": [ch], "epoch": epoch}

    run(main())
    metrics = gw.metrics()
    assert metrics["pgcast_gateway_replays_total"] == 3
    assert metrics["pgcast_gateway_incomplete_resumes_total"] == 1
    assert metrics["pgcast_gateway_replayed_messages_total"] == 5


def test_ws_position_of_another_epoch_replays_from_the_start(
    gateway: Callable[..., Gateway], conn: Conn, unique_channel: str, durable_schema: None,
) -> None:
    gw = gateway(durable=[unique_channel])
    ids = publish_durably(conn, unique_channel, "a", "b")

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            # Resuming after b "of another log": numerically complete, but not.
            reply = await request(ws, {"type": "subscribe", "channels": [unique_channel],
                                       "since": ids[1], "epoch": "not-this-log"})
            assert reply["recovered"] == {unique_channel: False}
            assert reply["reason"] == {unique_channel: "epoch"}
            assert reply["oldest"][unique_channel] is not None
            got = await frames(ws, 2)
            assert [f["payload"] for f in got] == ["a", "b"]
            bad = await request(ws, {"type": "subscribe", "channels": [unique_channel + "x"],
                                     "since": 0, "epoch": 5})
            assert bad["type"] == "error" and "epoch must be the string" in bad["message"]

    run(main())


# -- SSE ------------------------------------------------------------------------------


def test_sse_resume_sends_a_gap_notice_before_the_replay(
    gateway: Callable[..., Gateway], conn: Conn, unique_channel: str, durable_schema: None,
) -> None:
    gw = gateway(durable=[unique_channel])
    ids = publish_durably(conn, unique_channel, "a", "b", "c")
    delete(conn, ids[1:2])  # b: not even a prefix
    url = f"{gw.http}/sse?channel={unique_channel}"

    async def main() -> None:
        head = {"Last-Event-ID": json.dumps({unique_channel: ids[0]})}
        got = await sse(url, head, until="c")
        names = [name for name, _ in got]
        assert names == ["message", "notice", "message"]
        (_, subscribed), (_, notice), (_, message) = got
        assert subscribed["recovered"] == {unique_channel: False}
        assert {k: notice[k] for k in ("event", "channel", "since", "oldest", "reason")} == {
            "event": "gap", "channel": unique_channel, "since": ids[0], "oldest": ids[0],
            "reason": "pruned"}
        assert message["payload"] == "c"
        # Complete from c's position on: no notice.
        got = await sse(f"{url}&since={ids[1]}", {}, until="c")
        assert [name for name, _ in got] == ["message", "message"]
        assert got[0][1]["recovered"] == {unique_channel: True}
        # ?epoch= of another log: a notice, and everything from the start.
        got = await sse(f"{url}&since={ids[2]}&epoch=elsewhere", {}, until="c")
        assert got[1][0] == "notice" and got[1][1]["reason"] == "epoch"
        assert [d.get("payload") for _, d in got[2:]] == ["a", "c"]

    run(main())


def test_sse_refuses_a_bad_epoch(gateway: Callable[..., Gateway], unique_channel: str) -> None:
    gw = gateway(durable=[unique_channel])
    r = httpx.get(f"{gw.http}/sse?channel={unique_channel}&since=1&epoch=%01",
                  timeout=TIMEOUT, trust_env=False)
    assert r.status_code == 400 and "epoch must be the string" in r.text


# -- a prune racing the resume -------------------------------------------------------


def test_a_prune_between_the_reply_and_the_replay_is_announced(
    dsn: str, conn: Conn, unique_channel: str, durable_schema: None,
) -> None:
    """The reply said complete; a prune then deleted messages before the
    replay read them: the replay's own check sends a gap notice first."""
    ch = unique_channel
    ids = publish_durably(conn, ch, "a", "b", "c")

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            async def fetch(query: str, params: Any) -> list[tuple[Any, ...]]:
                cur = await aconn.execute(query, params)
                return await cur.fetchall()

            checked = await _resume.check(fetch, {ch: ids[0]}, None, True)
            assert checked is not None and checked.gaps() == {ch: None}  # "recovered: true"
            await asyncio.to_thread(delete, conn, ids[1:2])
            outbox = Outbox(100)
            resume = _resume.Resume(outbox, lambda: None)
            resume.start(ch, ids[0], checked)
            await resume.replay({ch: ids[0]}, fetch, lambda: False)
            got = [json.loads(f.text) for f in outbox.take()]
            assert [(f["type"], f.get("event"), f.get("payload")) for f in got] == [
                ("notice", "gap", None), ("message", None, "c")]
            assert (got[0]["since"], got[0]["oldest"], got[0]["reason"]) == (ids[0], ids[0],
                                                                             "pruned")

    run(main())


# -- the gateway's own reconnect ------------------------------------------------------


@pytest.fixture
def own_db(dsn: str, conn: Conn) -> Iterator[str]:
    name = f"pgcast_gwgaps_{uuid.uuid4().hex[:12]}"
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = psycopg.conninfo.make_conninfo(dsn, dbname=name)
        with psycopg.connect(url, autocommit=True) as c:
            install_schema(c)
        yield url
    finally:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_live_clients_hear_of_a_gap_across_the_gateways_reconnect(
    own_db: str, gateway: Callable[..., Gateway], conn: Conn,
) -> None:
    """Messages published and pruned while the gateway's LISTEN connection
    is down (the database refuses connections meanwhile, so the reconnect
    cannot come first) reach a live client as a gap notice, then the rest."""
    ch = "feed"
    name = psycopg.conninfo.conninfo_to_dict(own_db)["dbname"]
    gw = gateway(dsn=own_db, durable=[ch])

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            reply = await request(ws, {"type": "subscribe", "channels": [ch]})
            assert reply["type"] == "subscribed"
            with psycopg.connect(own_db, autocommit=True) as other:
                publish_durably(other, ch, "live")
                assert (await recv(ws))["payload"] == "live"
                pid = gw.hub.backend_pid
                conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                    sql.Identifier(name)))
                try:
                    other.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    ids = publish_durably(other, ch, "m1", "m2")
                    delete(other, ids[:1])
                finally:
                    conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                        sql.Identifier(name)))
            got = [await recv(ws) for _ in range(3)]
            assert [(f["type"], f.get("event"), f.get("payload")) for f in got] == [
                ("notice", "gap", None), ("message", None, "m2"),
                ("notice", "reconnected", None)]
            assert got[0]["reason"] == "pruned" and got[0]["channel"] == ch

    run(main())


# -- a version-1 schema: the gateway cannot tell, so it does not say -------------------


@pytest.fixture
def v1_db(dsn: str, conn: Conn) -> Iterator[str]:
    """A new database with the pgcast schema of version 1 only (set up before
    the gateway, so torn down after it)."""
    from pgcast.durable import _schema

    name = f"pgcast_gwv1_{uuid.uuid4().hex[:12]}"
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = psycopg.conninfo.make_conninfo(dsn, dbname=name)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(_schema._BOOTSTRAP)
            c.execute(_schema.MIGRATIONS[0].sql)
            c.execute("INSERT INTO pgcast.schema_version (version, description) "
                      "VALUES (1, 'v1')")
        yield url
    finally:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_on_a_version_1_schema_recovered_is_left_out(
    v1_db: str, gateway: Callable[..., Gateway],
) -> None:
    with psycopg.connect(v1_db, autocommit=True) as c:
        ids = publish_durably(c, "feed", "a", "b")
    gw = gateway(dsn=v1_db, durable=["feed"])

    async def main() -> None:
        async with ws_connect(gw.ws) as ws:
            reply = await request(ws, {"type": "subscribe", "channels": ["feed"],
                                       "since": ids[0]})
            assert reply == {"type": "subscribed", "channels": ["feed"]}  # unknown: not said
            assert (await recv(ws))["payload"] == "b"

    run(main())


def test_sse_last_event_id_carries_the_epoch_across_a_reset_of_the_log(
    own_db: str, gateway: Callable[..., Gateway],
) -> None:
    """EventSource reconnects with the URL it had and its last id: the id
    carries the epoch, so a log reset (TRUNCATE ... RESTART IDENTITY, ids
    starting again) is a gap, not a numerically "complete" resume."""
    gw = gateway(dsn=own_db, durable=["feed"])
    url = f"{gw.http}/sse?channel=feed&since=0"

    async def last_id() -> str:
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
                client.stream("GET", url) as response:
            lines = response.aiter_lines()
            for _ in range(100):
                line = await asyncio.wait_for(anext(lines), TIMEOUT)
                if line.startswith("id: "):
                    return line[4:]
        raise AssertionError("no id: line")

    async def main() -> None:
        with psycopg.connect(own_db, autocommit=True) as c:
            publish_durably(c, "feed", "old1", "old2")
            event_id = await last_id()
            assert json.loads(event_id)[""] == epoch_of(c)
            c.execute("TRUNCATE pgcast.log RESTART IDENTITY")
            publish_durably(c, "feed", "new1", "new2", "new3")
        got = await sse(f"{gw.http}/sse?channel=feed", {"Last-Event-ID": event_id}, "new3")
        assert got[0][1]["recovered"] == {"feed": False}
        assert got[1][0] == "notice" and got[1][1]["reason"] == "epoch"
        assert [d["payload"] for _, d in got[2:]] == ["new1", "new2", "new3"]

    run(main())
