"""Resumes share the gateway's one replay connection (red-team note: "Resume
queries queue for it without a time limit on that wait, so many resuming
attackers can delay everyone's resume").

Served first come, first served, one honest client resuming one channel
waited, at each of its queries, behind one query of every other client
resuming: 200 clients each resuming 50 channels delayed it 3.6 s, 1,000 of
them 34 s. Now the least served client goes first (a short resume passes the
long ones), and a query that gets no turn within ``replay_wait`` fails with
an error naming that setting, with nothing changed: a retry gets everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import test_gateway_server
from pgcast.gateway import create_app
from pgcast.gateway._turns import ReplayBusy, Turns
from test_gateway_replay_stall import FreezingProxy, sse_events
from test_gateway_server import TIMEOUT, Gateway, recv, request, run, ws_connect

#: The fixtures that start a gateway and install the durable schema.
gateway = test_gateway_server.gateway
durable_schema = test_gateway_server.durable_schema
publish_durably = test_gateway_server.publish_durably


class CountingProxy(FreezingProxy):
    """A :class:`FreezingProxy` that counts the queries sent on the replay
    connections (psycopg sends one query per write and waits for its result)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.replay_queries = 0

    async def _pump(self, pipe: int, src: asyncio.StreamReader,
                    dst: asyncio.StreamWriter, from_client: bool) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            for _ in range(10**9):
                data = await src.read(65536)
                if not data:
                    break
                if from_client and pipe in self.replay_pipes:
                    self.replay_queries += 1
                dst.write(data)
                await dst.drain()
        dst.close()


# -- the order of turns, without a database ---------------------------------------


class Who:
    def __init__(self, rows: int) -> None:
        self.replay_rows = rows


def test_turns_go_to_the_least_served_first_then_first_come() -> None:
    async def main() -> list[str]:
        turns, order = Turns(), []
        release = asyncio.Event()

        async def query(name: str, who: Who | None) -> None:
            async with turns.turn(who, 5.0):
                order.append(name)
                if name == "holder":
                    await release.wait()

        holder = asyncio.create_task(query("holder", Who(0)))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(query(name, Who(rows)))
                   for name, rows in (("big", 5000), ("mid", 500), ("small", 3),
                                      ("mid2", 500), ("none", 0))]
        await asyncio.sleep(0.01)
        assert turns.waiting == 5
        release.set()
        await asyncio.wait_for(asyncio.gather(holder, *waiting), TIMEOUT)
        return order

    assert run(main()) == ["holder", "none", "small", "mid", "mid2", "big"]


def test_a_turn_not_given_within_the_wait_fails_and_the_rest_go_on() -> None:
    async def main() -> None:
        turns, order = Turns(), []
        release = asyncio.Event()

        async def query(name: str, wait: float) -> None:
            async with turns.turn(Who(0), wait):
                order.append(name)
                if name == "holder":
                    await release.wait()

        holder = asyncio.create_task(query("holder", 5.0))
        await asyncio.sleep(0)
        patient = asyncio.create_task(query("patient", 5.0))
        with pytest.raises(ReplayBusy, match=r"no turn within 0\.05 s \(replay_wait, "
                                             r"pgcast serve --replay-wait\)"):
            await query("hasty", 0.05)
        cancelled = asyncio.create_task(query("cancelled", 5.0))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        release.set()
        await asyncio.wait_for(asyncio.gather(holder, patient), TIMEOUT)
        assert order == ["holder", "patient"]
        assert cancelled.cancelled()
        # Free again: the next turn is given at once.
        await asyncio.wait_for(query("later", 0.05), TIMEOUT)
        assert turns.waiting == 0
        # Handed the turn just as it is cancelled: it passes the turn on.
        held = turns.turn(Who(0), 5.0)
        await held.__aenter__()
        first = asyncio.create_task(query("first", 5.0))
        await asyncio.sleep(0)
        second = asyncio.create_task(query("second", 5.0))
        await asyncio.sleep(0)
        await held.__aexit__(None, None, None)  # hands it to "first"...
        first.cancel()  # ...which is cancelled before it runs
        await asyncio.wait_for(second, TIMEOUT)
        assert first.cancelled()
        assert order[-1] == "second"

    run(main())


def test_replay_wait_is_validated() -> None:
    for bad in (0, -1, "10", True):
        with pytest.raises(ValueError, match="replay_wait must be a number of seconds > 0"):
            create_app("", replay_wait=bad)  # type: ignore[arg-type]
    from pgcast.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve"]).replay_wait == 10.0
    assert parser.parse_args(["serve", "--replay-wait", "2.5"]).replay_wait == 2.5


# -- through the gateway --------------------------------------------------------------


ATTACKERS = 40
ATTACK_CHANNELS = 5
ATTACK_ROWS = 100


def test_an_honest_resume_passes_many_long_ones(
    gateway: Callable[..., Gateway], dsn: str, conn: psycopg.Connection[Any],
    unique_channel: str, durable_schema: None,
) -> None:
    """40 clients each resume 5 channels of 100 messages, reading as fast as
    they can, in batches of 5 (queue_size 10): each keeps a query waiting
    for the replay connection all the time. One client then resumes 3
    messages of another channel: it gets all three, once, in order, while
    fewer than 40 replay queries ran, its own included (about 15 here; first
    come, first served it waited behind one query of each other client at
    each of its own queries: 171 here)."""
    attack = [f"{unique_channel}_a{i}" for i in range(ATTACK_CHANNELS)]
    conn.execute("SELECT pgcast.notify(c, repeat('x', 100)) FROM unnest(%s::text[]) AS c, "
                 "generate_series(1, %s)", (attack, ATTACK_ROWS))
    honest = f"{unique_channel}_h"
    ids = publish_durably(conn, honest, "one", "two", "three")

    async def attacker(url: str, received: list[int], index: int) -> None:
        async with ws_connect(url, max_queue=None) as ws:
            reply = await request(ws, {"type": "subscribe", "channels": attack, "since": 0})
            assert reply["type"] == "subscribed", reply
            for _ in range(ATTACK_CHANNELS * ATTACK_ROWS):
                frame = await recv(ws, timeout=60)
                assert frame["type"] == "message", frame
                received[index] += 1

    async def main() -> None:
        proxy = CountingProxy(dsn)
        port = await proxy.start()
        tasks: list[asyncio.Task[None]] = []
        try:
            via = make_conninfo(dsn, host="127.0.0.1", port=port, sslmode="disable")
            gw = await asyncio.to_thread(gateway, dsn=via, durable=[f"{unique_channel}_*"],
                                         queue_size=10, rate_limits=None)
            received = [0] * ATTACKERS
            tasks = [asyncio.create_task(attacker(gw.ws, received, i))
                     for i in range(ATTACKERS)]
            # Every attacker well under way (each has read more rows than
            # the honest resume will).
            for _ in range(int(TIMEOUT / 0.02)):
                if min(received) >= 20:
                    break
                await asyncio.sleep(0.02)
            assert min(received) >= 20, received
            async with ws_connect(gw.ws) as ws:
                before = proxy.replay_queries
                reply = await request(ws, {"type": "subscribe", "channels": [honest],
                                           "since": 0})
                assert reply["type"] == "subscribed", reply
                assert reply["recovered"] == {honest: True}
                frames = [await recv(ws, timeout=60) for _ in range(3)]
                ran = proxy.replay_queries - before
                assert [(f["id"], f["payload"]) for f in frames] == list(
                    zip(ids, ["one", "two", "three"], strict=True))
                # Still resuming, every one of them, and nothing more came.
                assert max(received) < ATTACK_CHANNELS * ATTACK_ROWS, received
                with pytest.raises(AssertionError, match="no frame"):
                    await recv(ws, timeout=0.2)
            assert ran < ATTACKERS, (
                f"{ran} replay queries ran while the honest client resumed")
            # The long resumes complete too: every message once, in order.
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
            assert received == [ATTACK_CHANNELS * ATTACK_ROWS] * ATTACKERS
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await proxy.close()

    asyncio.run(asyncio.wait_for(main(), 180))


def test_a_resume_with_no_turn_within_replay_wait_gets_an_error_and_loses_nothing(
    gateway: Callable[..., Gateway], dsn: str, conn: psycopg.Connection[Any],
    unique_channel: str, durable_schema: None,
) -> None:
    """One client's query holds the replay connection (its peer does not
    answer, well within database_timeout); another's resume gets no turn
    within replay_wait: an error naming the setting, nothing changed (no
    subscription, no message). Once the connection is free, a retry from the
    same position gets every message, once, in order; over SSE too."""
    held, other = f"{unique_channel}_held", f"{unique_channel}_other"
    publish_durably(conn, held, "h1")
    ids = publish_durably(conn, other, "one", "two", "three")

    async def main() -> None:
        proxy = FreezingProxy(dsn)
        port = await proxy.start()
        try:
            via = make_conninfo(dsn, host="127.0.0.1", port=port, sslmode="disable")
            gw = await asyncio.to_thread(gateway, dsn=via, durable=[f"{unique_channel}_*"],
                                         replay_wait=0.5, database_timeout=30)
            async with ws_connect(gw.ws) as holder, ws_connect(gw.ws) as ws:
                proxy.hold = held.encode()  # queries naming that channel get no answer
                await holder.send(json.dumps({"type": "subscribe", "channels": [held],
                                              "since": 0}))
                await asyncio.sleep(0.2)  # its query holds the connection
                reply = await request(ws, {"type": "subscribe", "channels": [other],
                                           "since": 0, "ref": 7})
                assert reply["type"] == "error" and reply["ref"] == 7, reply
                assert "no turn within 0.5 s (replay_wait, pgcast serve --replay-wait)" \
                    in reply["message"], reply
                assert "nothing changed" in reply["message"], reply
                # Nothing changed: not subscribed, so no message comes.
                with pytest.raises(AssertionError, match="no frame"):
                    await recv(ws, timeout=0.3)
                # SSE: the error event names the limit; EventSource retries.
                url = f"{gw.http}/sse?channel={other}"
                head = {"Last-Event-ID": json.dumps({other: ids[0]})}
                events = await sse_events(url, head, until=lambda e: e["type"] == "error")
                assert "replay_wait" in events[-1]["message"], events
                proxy.hold = None
                # The holder's resume completes; the retries get everything.
                reply = await recv(holder)
                assert reply["type"] == "subscribed", reply
                assert (await recv(holder))["payload"] == "h1"
                reply = await request(ws, {"type": "subscribe", "channels": [other],
                                           "since": 0})
                assert reply["type"] == "subscribed", reply
                assert reply["recovered"] == {other: True}
                frames = [await recv(ws) for _ in range(3)]
                assert [f["id"] for f in frames] == ids
                assert [f["payload"] for f in frames] == ["one", "two", "three"]
                events = await sse_events(url, head, until=lambda e: e.get("payload") == "three")
                assert [e.get("payload") for e in events[1:]] == ["two", "three"], events
            async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
                text = (await client.get(f"{gw.http}/metrics")).text
            assert "pgcast_gateway_replay_busy_total 2" in text, text
        finally:
            proxy.hold = None
            await proxy.close()

    run(main())
