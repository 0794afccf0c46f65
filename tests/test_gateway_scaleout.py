"""Scale-out (issue 10): three gateway processes on one database, clients
spread over them on a durable channel; one gateway is killed with SIGKILL
mid-stream; its clients reconnect to the others and resume from the last id
they saw; every client ends with every message exactly once, in order.
Loopback only; every wait bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import psycopg
from websockets.exceptions import ConnectionClosed

from pgcast.durable import install_schema
from test_gateway_serve_ops import _PIDS, serve
from test_gateway_server import ws_connect

MESSAGES = 300
CLIENTS = 9
CHANNEL = "ops_scale"


def test_clients_of_a_killed_gateway_resume_on_the_others(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_schema(conn)
        row = conn.execute("SELECT coalesce(max(id), 0) FROM pgcast.log").fetchone()
        start = int(row[0]) if row else 0
    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(serve(dsn, "--durable", "ops_scale*"))[0]
                 for _ in range(3)]
        killed = ports[0]
        subscribed = asyncio.Event()
        counts = [0] * CLIENTS
        moved: list[int] = []  # clients that had to reconnect elsewhere

        def publish(ready: threading.Event) -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for i in range(1, MESSAGES + 1):
                    conn.execute("SELECT pgcast.notify(%s, %s)", (CHANNEL, f"m{i}"))
                    if i == MESSAGES // 3:
                        os.kill(_PIDS[killed], signal.SIGKILL)  # mid-stream
                    time.sleep(0.003)
            ready.set()

        async def client(n: int) -> list[str]:
            got: list[str] = []
            last = start
            port_index = n % 3
            for _attempt in range(10):  # reconnects, bounded
                port = ports[port_index]
                try:
                    async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
                        await ws.send(json.dumps({"type": "subscribe", "channels": [CHANNEL],
                                                  "since": last}))
                        for _ in range(MESSAGES * 3):
                            frame: dict[str, Any] = json.loads(
                                await asyncio.wait_for(ws.recv(), 20))
                            if frame["type"] == "subscribed":
                                counts[n] = 1
                                if all(counts):
                                    subscribed.set()
                            elif frame["type"] == "message":
                                got.append(frame["payload"])
                                last = int(frame["id"])
                                if len(got) == MESSAGES:
                                    return got
                except (ConnectionClosed, OSError, TimeoutError):
                    moved.append(n)
                port_index = (port_index + 1) % 3
                if ports[port_index] == killed:
                    port_index = (port_index + 1) % 3
            raise AssertionError(f"client {n} got {len(got)} of {MESSAGES}")

        async def main() -> list[list[str]]:
            tasks = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
            await asyncio.wait_for(subscribed.wait(), 30)
            done = threading.Event()
            publisher = threading.Thread(target=publish, args=(done,), daemon=True)
            publisher.start()
            try:
                return await asyncio.wait_for(asyncio.gather(*tasks), 120)
            finally:
                await asyncio.to_thread(publisher.join, 60)

        results = run_long(main())
        # The killed gateway's clients (and only they) had to move.
        assert sorted(set(moved)) == [n for n in range(CLIENTS) if n % 3 == 0], moved
    expected = [f"m{i}" for i in range(1, MESSAGES + 1)]
    for n, got in enumerate(results):
        assert got == expected, (n, len(got), [g for g in got if got.count(g) > 1][:5])


def run_long(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 180))

