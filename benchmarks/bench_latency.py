"""Round-trip latency: ping-pong through NOTIFY between two processes.

The measuring process LISTENs on ``pong`` and sends ``ping <i>``; an echo
process (``python bench_latency.py --echo SUBJECT DSN PING PONG``) LISTENs on
``ping`` and answers each with ``pong <i>``. Both sides use the subject's
library, one connection each, the way an application would: one round trip
is two NOTIFY commands and two deliveries. Redis does the same with
PUBLISH/SUBSCRIBE.

Every subject's echo process and connection are opened first; then the
subjects take turns in chunks of round trips (round-robin), so the load other
processes put on the shared machine falls on all of them alike. After a
warm-up chunk, every round trip is timed; p50 and p99 are reported (µs).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path

import psycopg
from _common import REDIS_HOST, REDIS_PORT, Row, percentile, redis_client, redis_parser, row

import pgcast

BENCH = "latency"
ROUNDS = 3000
SMOKE_ROUNDS = 300
CHUNK = 100
WARMUP = 200
SMOKE_WARMUP = 30
TIMEOUT = 10.0  # for any one answer

HERE = Path(__file__).resolve()


class SyncSide:
    """One side of a sync subject: connect and listen, send, receive, close."""

    def __init__(self, dsn: str, me: str, peer: str) -> None:
        self.peer = peer

    def send(self, payload: str) -> None:
        raise NotImplementedError

    def receive(self) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class AsyncSide:
    """One side of an asyncio subject; :meth:`start` runs in the event loop."""

    def __init__(self, dsn: str, me: str, peer: str) -> None:
        self.dsn, self.me, self.peer = dsn, me, peer

    async def start(self) -> None:
        raise NotImplementedError

    async def send(self, payload: str) -> None:
        raise NotImplementedError

    async def receive(self) -> str | None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class PgcastSync(SyncSide):
    def __init__(self, dsn: str, me: str, peer: str) -> None:
        super().__init__(dsn, me, peer)
        self.ps = pgcast.connect(dsn)
        self.ps.listen(me)
        self.events = self.ps.events(select_timeout=TIMEOUT, yield_timeouts=True)

    def send(self, payload: str) -> None:
        self.ps.notify(self.peer, payload)

    def receive(self) -> str | None:
        event = next(self.events)
        return None if event is None else event.payload

    def close(self) -> None:
        self.ps.close()


class PgcastAsync(AsyncSide):
    async def start(self) -> None:
        self.ps = await pgcast.aio.connect(self.dsn)
        await self.ps.listen(self.me)
        self.events = self.ps.events(select_timeout=TIMEOUT, yield_timeouts=True)

    async def send(self, payload: str) -> None:
        await self.ps.notify(self.peer, payload)

    async def receive(self) -> str | None:
        event = await anext(self.events)
        return None if event is None else event.payload

    async def close(self) -> None:
        await self.ps.close()


class Psycopg3(SyncSide):
    def __init__(self, dsn: str, me: str, peer: str) -> None:
        super().__init__(dsn, me, peer)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute(f'LISTEN "{me}"')

    def send(self, payload: str) -> None:
        self.conn.execute("SELECT pg_notify(%s, %s)", (self.peer, payload))

    def receive(self) -> str | None:
        # notifies() holds the connection's lock while it yields: take one
        # notification, leave the generator, and the connection can send.
        for n in self.conn.notifies(timeout=TIMEOUT, stop_after=1):
            return n.payload
        return None

    def close(self) -> None:
        self.conn.close()


class Psycopg3Async(AsyncSide):
    async def start(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        await self.conn.execute(f'LISTEN "{self.me}"')

    async def send(self, payload: str) -> None:
        await self.conn.execute("SELECT pg_notify(%s, %s)", (self.peer, payload))

    async def receive(self) -> str | None:
        async for n in self.conn.notifies(timeout=TIMEOUT, stop_after=1):
            return n.payload
        return None

    async def close(self) -> None:
        await self.conn.close()


class Psycopg2(SyncSide):
    def __init__(self, dsn: str, me: str, peer: str) -> None:
        import psycopg2
        import psycopg2.extensions

        super().__init__(dsn, me, peer)
        self.conn = psycopg2.connect(dsn)
        self.conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        self.cur = self.conn.cursor()
        self.cur.execute(f'LISTEN "{me}"')

    def send(self, payload: str) -> None:
        self.cur.execute("SELECT pg_notify(%s, %s)", (self.peer, payload))

    def receive(self) -> str | None:
        import select

        conn = self.conn
        while not conn.notifies:
            if select.select([conn], [], [], TIMEOUT) == ([], [], []):
                return None
            conn.poll()
        return str(conn.notifies.pop(0).payload)

    def close(self) -> None:
        self.conn.close()


class Asyncpg(AsyncSide):
    async def start(self) -> None:
        import asyncpg

        self.conn = await asyncpg.connect(self.dsn)
        self.inbox: asyncio.Queue[str] = asyncio.Queue()
        await self.conn.add_listener(
            self.me, lambda _c, _p, _ch, payload: self.inbox.put_nowait(payload)
        )

    async def send(self, payload: str) -> None:
        await self.conn.execute("SELECT pg_notify($1, $2)", self.peer, payload)

    async def receive(self) -> str | None:
        try:
            return await asyncio.wait_for(self.inbox.get(), TIMEOUT)
        except TimeoutError:
            return None

    async def close(self) -> None:
        await self.conn.close()


class Redis(SyncSide):
    def __init__(self, dsn: str, me: str, peer: str) -> None:
        import redis

        super().__init__(dsn, me, peer)
        self.client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(me)
        deadline = time.monotonic() + TIMEOUT
        while not self.pubsub.subscribed and time.monotonic() < deadline:
            self.pubsub.get_message(timeout=0.1)  # the confirmation

    def send(self, payload: str) -> None:
        self.client.publish(self.peer, payload)

    def receive(self) -> str | None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=TIMEOUT)
            if message is not None:
                return str(message["data"].decode())
        return None

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


SUBJECTS: dict[str, type[SyncSide] | type[AsyncSide]] = {
    "pgcast sync": PgcastSync,
    "pgcast asyncio": PgcastAsync,
    "raw psycopg 3": Psycopg3,
    "raw psycopg 3 asyncio": Psycopg3Async,
    "raw psycopg2": Psycopg2,
    "raw asyncpg": Asyncpg,
    "Redis pub/sub (redis-py)": Redis,
}


def _expect(payload: str | None, i: int) -> None:
    if payload != str(i):
        raise RuntimeError(f"round trip {i}: expected {str(i)!r}, got {payload!r}")


# -- the echo process ---------------------------------------------------------------


def echo(subject: str, dsn: str, me: str, peer: str) -> None:
    """Answer every ping with the same payload until ``stop``."""
    cls = SUBJECTS[subject]
    if issubclass(cls, AsyncSide):
        side = cls(dsn, me, peer)

        async def main() -> None:
            await side.start()
            print("ready", flush=True)
            try:
                while (payload := await side.receive()) not in (None, "stop"):
                    assert payload is not None
                    await side.send(payload)
            finally:
                await side.close()

        asyncio.run(main())
        return
    sync = cls(dsn, me, peer)
    print("ready", flush=True)
    try:
        while (payload := sync.receive()) not in (None, "stop"):
            assert payload is not None
            sync.send(payload)
    finally:
        sync.close()


# -- the measuring side ------------------------------------------------------------


class Measured:
    """A subject's echo process and measuring side, driven chunk by chunk."""

    def __init__(self, subject: str, dsn: str) -> None:
        tag = uuid.uuid4().hex[:8]
        ping, pong = f"bench_ping_{tag}", f"bench_pong_{tag}"
        self.subject = subject
        self.times: list[float] = []
        self.sent = 0
        self.process = subprocess.Popen(
            [sys.executable, str(HERE), "--echo", subject, dsn, ping, pong],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the echo side LISTENs first
        if line.strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"the {subject} echo process did not start: {line!r}")
        cls = SUBJECTS[subject]
        self.runner: asyncio.Runner | None = None
        if issubclass(cls, AsyncSide):
            self.runner = asyncio.Runner()
            self.aside: AsyncSide = cls(dsn, pong, ping)
            self.runner.run(self.aside.start())
        else:
            self.side: SyncSide = cls(dsn, pong, ping)

    def chunk(self, count: int, keep: bool) -> None:
        """*count* round trips; their times are kept if *keep*."""
        start = self.sent
        self.sent += count
        if self.runner is not None:
            times = self.runner.run(self._achunk(start, count))
        else:
            times = []
            side = self.side
            clock = time.perf_counter
            for i in range(start, start + count):
                t0 = clock()
                side.send(str(i))
                payload = side.receive()
                times.append(clock() - t0)
                _expect(payload, i)
        if keep:
            self.times.extend(times)

    async def _achunk(self, start: int, count: int) -> list[float]:
        times = []
        side = self.aside
        clock = time.perf_counter
        for i in range(start, start + count):
            t0 = clock()
            await side.send(str(i))
            payload = await side.receive()
            times.append(clock() - t0)
            _expect(payload, i)
        return times

    def close(self) -> None:
        try:
            if self.runner is not None:
                self.runner.run(_then(self.aside.send("stop"), self.aside.close()))
                self.runner.close()
            else:
                self.side.send("stop")
                self.side.close()
            self.process.wait(TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(TIMEOUT)


async def _then(first: Awaitable[None], second: Awaitable[None]) -> None:
    await first
    await second


def run(dsn: str, smoke: bool) -> list[Row]:
    """p50 and p99 of the round trip for every subject."""
    rounds = SMOKE_ROUNDS if smoke else ROUNDS
    warmup = SMOKE_WARMUP if smoke else WARMUP
    subjects = list(SUBJECTS)
    skipped: dict[str, str] = {}
    if redis_client() is None:
        skipped["Redis pub/sub (redis-py)"] = "no Redis answers on 127.0.0.1:6379"
    measured = [Measured(s, dsn) for s in subjects if s not in skipped]
    try:
        for m in measured:
            m.chunk(warmup, keep=False)
        done = 0
        while done < rounds:
            count = min(CHUNK, rounds - done)
            for m in measured:
                m.chunk(count, keep=True)
            done += count
    finally:
        for m in measured:
            m.close()
    rows = []
    by_name = {m.subject: m for m in measured}
    for subject in subjects:
        for metric, p in (("p50", 50), ("p99", 99)):
            if subject in skipped:
                rows.append(row(BENCH, subject, metric, float("nan"), "us", skipped[subject]))
                continue
            note = f"{rounds:,} round trips after {warmup} warm-up, subjects in turns of {CHUNK}"
            if subject.startswith("Redis"):
                note += f"; TCP loopback; {redis_parser()}"
            value = percentile(by_name[subject].times, p) * 1e6
            rows.append(row(BENCH, subject, metric, value, "us", note))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--echo":
        echo(*sys.argv[2:6])
    else:
        from _common import main

        main(run)
