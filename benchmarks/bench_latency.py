"""Round-trip latency: ping-pong through NOTIFY between two processes.

The measuring process LISTENs on ``pong`` and sends ``ping <i>``; an echo
process (started as ``python bench_latency.py --echo SUBJECT ...``) LISTENs on
``ping`` and answers each with ``pong <i>``. Both sides use the subject's
library and one connection each, the way an application would. One round trip
is two NOTIFY commands and two deliveries. After a warm-up, every round trip
is timed; p50 and p99 are reported (microseconds). Redis does the same with
PUBLISH/SUBSCRIBE.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from _common import REDIS_HOST, REDIS_PORT, Row, percentile, redis_client, redis_parser, row

import pgcast

BENCH = "latency"
ROUNDS = 3000
SMOKE_ROUNDS = 300
WARMUP = 200
SMOKE_WARMUP = 30
TIMEOUT = 10.0  # for any one answer

HERE = Path(__file__).resolve()


# -- one side of each subject: `talk(...)` sends `first` and then answers ----
# Each side function: (dsn, listen_on, send_to, rounds, measure) -> list of
# round-trip seconds when measuring (sends first), else [] (echoes until "stop").


def side_pgcast_sync(dsn: str, me: str, peer: str, rounds: int, measure: bool) -> list[float]:
    times: list[float] = []
    with pgcast.connect(dsn) as ps:
        ps.listen(me)
        events = ps.events(select_timeout=TIMEOUT, yield_timeouts=True)
        _ready()
        if measure:
            for i in range(rounds):
                start = time.perf_counter()
                ps.notify(peer, str(i))
                event = next(events)
                times.append(time.perf_counter() - start)
                _check(event, i)
            ps.notify(peer, "stop")
        else:
            for event in events:
                if event is None or event.payload == "stop":
                    break
                ps.notify(peer, event.payload)
    return times


def side_pgcast_async(dsn: str, me: str, peer: str, rounds: int, measure: bool) -> list[float]:
    async def main() -> list[float]:
        times: list[float] = []
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(me)
            events = ps.events(select_timeout=TIMEOUT, yield_timeouts=True)
            _ready()
            if measure:
                for i in range(rounds):
                    start = time.perf_counter()
                    await ps.notify(peer, str(i))
                    event = await anext(events)
                    times.append(time.perf_counter() - start)
                    _check(event, i)
                await ps.notify(peer, "stop")
            else:
                async for event in events:
                    if event is None or event.payload == "stop":
                        break
                    await ps.notify(peer, event.payload)
        return times

    return asyncio.run(main())


def side_psycopg3(dsn: str, me: str, peer: str, rounds: int, measure: bool) -> list[float]:
    times: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'LISTEN "{me}"')
        _ready()

        def receive() -> Any:
            # notifies() holds the connection's lock while it yields, so one
            # notification at a time, then the connection is free to send.
            for n in conn.notifies(timeout=TIMEOUT, stop_after=1):
                return n
            return None

        if measure:
            for i in range(rounds):
                start = time.perf_counter()
                conn.execute("SELECT pg_notify(%s, %s)", (peer, str(i)))
                n = receive()
                times.append(time.perf_counter() - start)
                _check(n, i)
            conn.execute("SELECT pg_notify(%s, 'stop')", (peer,))
        else:
            while (n := receive()) is not None and n.payload != "stop":
                conn.execute("SELECT pg_notify(%s, %s)", (peer, n.payload))
    return times


def side_psycopg3_async(dsn: str, me: str, peer: str, rounds: int, measure: bool) -> list[float]:
    async def main() -> list[float]:
        times: list[float] = []
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f'LISTEN "{me}"')
            _ready()

            async def receive() -> Any:
                async for n in conn.notifies(timeout=TIMEOUT, stop_after=1):
                    return n
                return None

            if measure:
                for i in range(rounds):
                    start = time.perf_counter()
                    await conn.execute("SELECT pg_notify(%s, %s)", (peer, str(i)))
                    n = await receive()
                    times.append(time.perf_counter() - start)
                    _check(n, i)
                await conn.execute("SELECT pg_notify(%s, 'stop')", (peer,))
            else:
                while (n := await receive()) is not None and n.payload != "stop":
                    await conn.execute("SELECT pg_notify(%s, %s)", (peer, n.payload))
        return times

    return asyncio.run(main())


def side_asyncpg(dsn: str, me: str, peer: str, rounds: int, measure: bool) -> list[float]:
    import asyncpg

    async def main() -> list[float]:
        times: list[float] = []
        conn = await asyncpg.connect(dsn)
        inbox: asyncio.Queue[str] = asyncio.Queue()
        await conn.add_listener(me, lambda _c, _pid, _ch, payload: inbox.put_nowait(payload))
        _ready()
        try:
            if measure:
                for i in range(rounds):
                    start = time.perf_counter()
                    await conn.execute("SELECT pg_notify($1, $2)", peer, str(i))
                    payload = await asyncio.wait_for(inbox.get(), TIMEOUT)
                    times.append(time.perf_counter() - start)
                    _check_payload(payload, i)
                await conn.execute("SELECT pg_notify($1, 'stop')", peer)
            else:
                while (payload := await asyncio.wait_for(inbox.get(), TIMEOUT)) != "stop":
                    await conn.execute("SELECT pg_notify($1, $2)", peer, payload)
        finally:
            await conn.close()
        return times

    return asyncio.run(main())


def side_psycopg2(dsn: str, me: str, peer: str, rounds: int, measure: bool) -> list[float]:
    import select

    import psycopg2
    import psycopg2.extensions

    times: list[float] = []
    conn = psycopg2.connect(dsn)
    conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    cur = conn.cursor()
    cur.execute(f'LISTEN "{me}"')
    _ready()

    def receive() -> str | None:
        while not conn.notifies:
            if select.select([conn], [], [], TIMEOUT) == ([], [], []):
                return None
            conn.poll()
        return str(conn.notifies.pop(0).payload)

    try:
        if measure:
            for i in range(rounds):
                start = time.perf_counter()
                cur.execute("SELECT pg_notify(%s, %s)", (peer, str(i)))
                payload = receive()
                times.append(time.perf_counter() - start)
                _check_payload(payload, i)
            cur.execute("SELECT pg_notify(%s, 'stop')", (peer,))
        else:
            while (payload := receive()) is not None and payload != "stop":
                cur.execute("SELECT pg_notify(%s, %s)", (peer, payload))
    finally:
        conn.close()
    return times


def side_redis(dsn: str, me: str, peer: str, rounds: int, measure: bool) -> list[float]:
    import redis

    times: list[float] = []
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(me)
    while pubsub.get_message(timeout=TIMEOUT) is None and not pubsub.subscribed:
        pass  # the subscription is confirmed before the first ping
    _ready()

    def receive() -> str | None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=TIMEOUT)
            if message is not None:
                return str(message["data"].decode())
        return None

    try:
        if measure:
            for i in range(rounds):
                start = time.perf_counter()
                client.publish(peer, str(i))
                payload = receive()
                times.append(time.perf_counter() - start)
                _check_payload(payload, i)
            client.publish(peer, "stop")
        else:
            while (payload := receive()) is not None and payload != "stop":
                client.publish(peer, payload)
    finally:
        pubsub.close()
        client.close()
    return times


SIDES: dict[str, Callable[[str, str, str, int, bool], list[float]]] = {
    "pgcast sync": side_pgcast_sync,
    "pgcast asyncio": side_pgcast_async,
    "raw psycopg 3": side_psycopg3,
    "raw psycopg 3 asyncio": side_psycopg3_async,
    "raw psycopg2": side_psycopg2,
    "raw asyncpg": side_asyncpg,
    "Redis pub/sub (redis-py)": side_redis,
}


def _ready() -> None:
    print("ready", flush=True)


def _check(event: Any, i: int) -> None:
    _check_payload(None if event is None else event.payload, i)


def _check_payload(payload: str | None, i: int) -> None:
    if payload != str(i):
        raise RuntimeError(f"round trip {i}: expected {i!r}, got {payload!r}")


def measure(dsn: str, subject: str, rounds: int) -> list[float]:
    """Run the echo process and the timed side; the round-trip times."""
    tag = uuid.uuid4().hex[:8]
    ping, pong = f"bench_ping_{tag}", f"bench_pong_{tag}"
    echo = subprocess.Popen(
        [sys.executable, str(HERE), "--echo", subject, dsn, ping, pong],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert echo.stdout is not None
        line = echo.stdout.readline()  # the echo side LISTENs before we send
        if line.strip() != "ready":
            raise RuntimeError(f"the {subject} echo process did not start: {line!r}")
        with contextlib.redirect_stdout(io.StringIO()):
            times = SIDES[subject](dsn, pong, ping, rounds, True)
        echo.wait(TIMEOUT)
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait(TIMEOUT)
    return times


def run(dsn: str, smoke: bool) -> list[Row]:
    """p50 and p99 of the round trip for every subject."""
    rounds = SMOKE_ROUNDS if smoke else ROUNDS
    warmup = SMOKE_WARMUP if smoke else WARMUP
    rows = []
    redis_ok = redis_client() is not None
    for subject in SIDES:
        if subject.startswith("Redis") and not redis_ok:
            for metric in ("p50", "p99"):
                rows.append(
                    row(BENCH, subject, metric, float("nan"), "us", "no Redis on 127.0.0.1:6379")
                )
            continue
        times = measure(dsn, subject, rounds + warmup)[warmup:]
        note = f"{rounds:,} round trips after {warmup} warm-up"
        if subject.startswith("Redis"):
            note += f"; TCP loopback; {redis_parser()}"
        for metric, p in (("p50", 50), ("p99", 99)):
            rows.append(row(BENCH, subject, metric, percentile(times, p) * 1e6, "us", note))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--echo":
        _, _, subject, dsn, me, peer = sys.argv
        SIDES[subject](dsn, me, peer, 0, False)
    else:
        from _common import main

        main(run)
