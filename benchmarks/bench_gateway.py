"""The gateway's fan-out: 5,000 WebSocket clients on one gateway process.

What is measured, for each server design, in one run:

* **latency to the last client**: the time from a ``NOTIFY`` (sent by the
  benchmark with ``pg_notify``) to the moment the *last* connected client has
  received it; p50 and p99 over the notifications (20, one at a time: the
  next is sent once every client has the previous one);
* **memory per idle client**: the server process's RSS after every client is
  connected and subscribed, minus its RSS before any, divided by the number
  of clients.

The designs (each an ASGI app served by the same uvicorn configuration, in a
process of its own):

* ``pgcast gateway``: :func:`pgcast.gateway.create_app`, one LISTEN
  connection for the process, fanned out to every client;
* ``encode/broadcaster (postgres)``: broadcaster's ``Broadcast`` with its
  asyncpg Postgres backend, one ``subscribe()`` (an unbounded queue) per
  WebSocket, as its README shows;
* ``one LISTEN connection per client``: the seed's design (a database
  connection per browser, here a :func:`pgcast.aio.connect` each). At 5,000
  clients it needs 5,000 connections, over PostgreSQL's ``max_connections``,
  so it runs at the largest size the server allows (leaving 20 connections
  spare, at most 150), the pgcast gateway is measured at that size too, and a
  row records that 5,000 is out of reach. Its PostgreSQL backends' own memory
  (USS, summed) is reported per client as well, since that is where this
  design pays.

The clients are two processes of asyncio clients speaking just enough
WebSocket by hand (handshake, masked text frames out, unmasked frames in) to
keep client-side overhead out of the measurement; they never parse the JSON,
only look for the notification's marker. Server, clients and PostgreSQL share
the machine's 2 cores, so absolute numbers include that contention.

Everything is on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, main, percentile, row

BENCH = "gateway"
CHANNEL = "bench_gateway"
CLIENTS = 5_000
NOTIFICATIONS = 20
SMOKE_CLIENTS = 100
SMOKE_NOTIFICATIONS = 5
#: The designs compared at full size are measured this many times, alternating,
#: and their notifications pooled: the machine is shared, and one run of each
#: can differ from the next by more than the designs differ.
ROUNDS = 3
SMOKE_ROUNDS = 1
CLIENT_PROCESSES = 2
PER_CONNECTION_MAX = 150
CONNECT_TIMEOUT = 300.0
NOTIFY_TIMEOUT = 60.0
HANDSHAKE_CONCURRENCY = 100

DESIGNS = {
    "pgcast": "pgcast gateway",
    "broadcaster": "encode/broadcaster (postgres)",
    "perconn": "one LISTEN connection per client",
}


def raise_nofile() -> None:
    """Many sockets per process: raise the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the servers (each runs as `bench_gateway.py --serve DESIGN PORT DSN`) -----


def build_app(design: str, dsn: str) -> Any:
    """The ASGI app of *design*; every one answers ``{"type":"subscribed"}``
    once its client is listening."""
    if design == "pgcast":
        from pgcast.gateway import create_app

        return create_app(dsn, allow=[CHANNEL], max_clients=100_000, queue_size=1000)

    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    if design == "broadcaster":
        from broadcaster import Broadcast

        broadcast = Broadcast(dsn)
        # broadcaster's subscribe() is not safe for concurrent first subscribers:
        # their LISTENs race on its one asyncpg connection ("another operation is
        # in progress" / InternalClientError). Entering it one at a time is the fix
        # an application would have to make, so the benchmark makes it.
        entering = asyncio.Lock()

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> Any:
            await broadcast.connect()
            yield
            await broadcast.disconnect()

        async def bc_endpoint(ws: WebSocket) -> None:
            await ws.accept()
            subscription = broadcast.subscribe(channel=CHANNEL)
            async with entering:
                subscriber = await subscription.__aenter__()
            async def forward() -> None:
                async for event in subscriber:  # type: ignore[attr-defined]
                    await ws.send_text(event.message)

            try:
                await ws.send_text('{"type":"subscribed"}')
                await _until_disconnect(ws, forward())
            finally:
                async with entering:
                    await subscription.__aexit__(None, None, None)

        return Starlette(routes=[WebSocketRoute("/ws", bc_endpoint)], lifespan=lifespan)

    if design == "perconn":
        import pgcast.aio

        async def pc_endpoint(ws: WebSocket) -> None:
            await ws.accept()
            async with await pgcast.aio.connect(dsn, application_name="bench-perconn") as ps:
                await ps.listen(CHANNEL)
                await ws.send_text('{"type":"subscribed"}')

                async def forward() -> None:
                    async for event in ps.events():
                        if isinstance(event, pgcast.Event):
                            await ws.send_text(event.payload)

                await _until_disconnect(ws, forward())

        return Starlette(routes=[WebSocketRoute("/ws", pc_endpoint)])
    raise ValueError(f"unknown design {design!r}")


async def _until_disconnect(ws: Any, forward: Any) -> None:
    """Run *forward* until the client disconnects (or it ends)."""
    task = asyncio.ensure_future(forward)
    try:
        while not task.done():
            receiving = asyncio.ensure_future(ws.receive())
            await asyncio.wait([task, receiving], return_when=asyncio.FIRST_COMPLETED)
            if receiving.done():
                if receiving.result()["type"] == "websocket.disconnect":
                    return
            else:
                receiving.cancel()
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def serve(design: str, port: int, dsn: str) -> None:
    raise_nofile()
    from pgcast.gateway._serve import GatewayServer, config

    app = build_app(design, dsn)
    server = GatewayServer(config(app, "127.0.0.1", port, log_level="error", backlog=4096,
                                  timeout_graceful_shutdown=5))
    server.run()


# -- the clients (each process runs `bench_gateway.py --clients N PORT PROTO`) --

_KEY = b"\x12\x34\x56\x78"


def _frame(text: str) -> bytes:
    """A masked client text frame."""
    data = text.encode()
    n = len(data)
    header = bytes([0x81])
    if n < 126:
        header += bytes([0x80 | n])
    else:
        header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    masked = bytes(b ^ _KEY[i % 4] for i, b in enumerate(data))
    return header + _KEY + masked


class _Client(asyncio.Protocol):
    def __init__(self, port: int, proto: str, board: _Board) -> None:
        self.port = port
        self.proto = proto
        self.board = board
        self.buf = bytearray()
        self.open = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before subscribing: {exc}"))
        self.board.lost += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(ConnectionError(bytes(buf[:200]).decode("latin-1")))
                return
            del buf[: end + 4]
            self.open = True
            if self.proto == "pgcast":
                assert self.transport is not None
                self.transport.write(_frame(json.dumps(
                    {"type": "subscribe", "channels": [CHANNEL]})))
        while len(buf) >= 2:
            length = buf[1] & 0x7F
            offset = 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, offset = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, offset = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < offset + length:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[offset: offset + length])
            del buf[: offset + length]
            if opcode == 1:
                self._text(payload)
            elif opcode == 9 and self.transport is not None:  # ping -> pong
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + _KEY
                                     + bytes(b ^ _KEY[i % 4] for i, b in enumerate(payload)))

    def _text(self, payload: bytes) -> None:
        at = payload.find(b"n=")
        if at >= 0:
            end = payload.find(b";", at)
            self.board.received(int(payload[at + 2: end]), time.monotonic())
        elif b'"subscribed"' in payload and not self.ready.done():
            self.ready.set_result(None)


class _Board:
    """Per notification: how many clients of this process have it, and when the last did."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.count: dict[int, int] = {}
        self.lost = 0

    def received(self, n: int, at: float) -> None:
        got = self.count.get(n, 0) + 1
        self.count[n] = got
        if got == self.clients:
            print(f"got {n} {at!r}", flush=True)


async def clients_main(n: int, port: int, proto: str) -> None:
    raise_nofile()
    loop = asyncio.get_running_loop()
    board = _Board(n)
    gate = asyncio.Semaphore(HANDSHAKE_CONCURRENCY)
    conns: list[_Client] = []

    async def one() -> None:
        async with gate:
            _, client = await loop.create_connection(
                lambda: _Client(port, proto, board), "127.0.0.1", port)
            conns.append(client)
            await asyncio.wait_for(client.ready, 60)

    async with asyncio.timeout(CONNECT_TIMEOUT):
        await asyncio.gather(*(one() for _ in range(n)))
    print("ready", flush=True)
    # Wait for "quit" on stdin (the coordinator), without blocking the loop.
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "quit":
            break
    for c in conns:
        if c.transport is not None:
            c.transport.abort()


# -- the coordinator -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the server did not listen on {port} within {timeout} s")


def _rss(pid: int) -> int:
    import psutil

    rss: int = psutil.Process(pid).memory_info().rss
    return rss


def _backend_uss(dsn: str) -> int:
    """The summed private memory of the per-connection design's backends."""
    import psutil

    with psycopg.connect(dsn, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'bench-perconn'")]
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().uss
    return total


class _Lines:
    """A subprocess's stdout lines, read by a thread, taken with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.queue: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self.queue.put(line.strip())

        threading.Thread(target=pump, daemon=True).start()

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {prefix!r} line within {timeout} s")
            try:
                line = self.queue.get(timeout=min(left, 1.0))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"a client process exited with {self.proc.returncode} "
                        f"before its {prefix!r} line"
                    ) from None
                continue
            if line.startswith(prefix):
                return line


@contextlib.contextmanager
def _process(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            proc.stdin.write("quit\n")
            proc.stdin.flush()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.close()


def measure(design: str, dsn: str, clients: int, notifications: int) -> dict[str, Any]:
    """Serve *design*, connect *clients*, time *notifications*; the raw results."""
    port = _free_port()
    me = str(Path(__file__).resolve())
    with _process([sys.executable, me, "--serve", design, str(port), dsn]) as server:
        _wait_port(port, server)
        time.sleep(1.0)  # let start-up allocations settle
        before = _rss(server.pid)
        per = [clients // CLIENT_PROCESSES + (i < clients % CLIENT_PROCESSES)
               for i in range(CLIENT_PROCESSES)]
        per = [n for n in per if n]
        with contextlib.ExitStack() as stack:
            procs = [stack.enter_context(_process(
                [sys.executable, me, "--clients", str(n), str(port), design])) for n in per]
            lines = [_Lines(p) for p in procs]
            started = time.monotonic()
            for ln in lines:
                ln.expect("ready", CONNECT_TIMEOUT)
            connect_s = time.monotonic() - started
            time.sleep(1.0)
            after = _rss(server.pid)
            backends = _backend_uss(dsn) if design == "perconn" else None
            latencies = []
            with psycopg.connect(dsn, autocommit=True) as conn:
                for i in range(notifications):
                    sent = time.monotonic()
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"n={i};"))
                    last = max(float(ln.expect(f"got {i} ", NOTIFY_TIMEOUT).split()[2])
                               for ln in lines)
                    latencies.append(last - sent)
                    time.sleep(0.05)
    return {
        "latencies": latencies,
        "rss_per_client": (after - before) / clients,
        "backend_uss_per_client": None if backends is None else backends / clients,
        "connect_s": connect_s,
    }


def _rows(
    design: str, clients: int, results: list[dict[str, Any]], extra: str = ""
) -> list[Row]:
    subject = f"{DESIGNS[design]} ({clients:,} clients)"
    lat = [x * 1000 for r in results for x in r["latencies"]]
    per_round = ", ".join(
        f"{percentile([x * 1000 for x in r['latencies']], 50):,.0f}" for r in results
    )
    connect = ", ".join(f"{r['connect_s']:.1f}" for r in results)
    note = (f"{len(lat)} notifications in {len(results)} run(s), each to every client; "
            f"p50 per run: {per_round} ms; connecting all took {connect} s{extra}")
    mem = [r["rss_per_client"] / 1024 for r in results]
    rows = [
        row(BENCH, subject, "p50 NOTIFY to last client", percentile(lat, 50), "ms", note),
        row(BENCH, subject, "p99 NOTIFY to last client", percentile(lat, 99), "ms"),
        row(BENCH, subject, "memory per idle client", sorted(mem)[len(mem) // 2], "KiB",
            "server process RSS delta / clients, median of the runs"),
    ]
    uss = [r["backend_uss_per_client"] for r in results if r["backend_uss_per_client"]]
    if uss:
        rows.append(row(BENCH, subject, "PostgreSQL backend memory per client",
                        sorted(uss)[len(uss) // 2] / 1024, "KiB",
                        "USS of the per-client backends, summed / clients"))
    return rows


def run(dsn: str, smoke: bool) -> list[Row]:
    """The benchmark rows (see the module docstring)."""
    raise_nofile()
    clients = SMOKE_CLIENTS if smoke else CLIENTS
    notifications = SMOKE_NOTIFICATIONS if smoke else NOTIFICATIONS
    with psycopg.connect(dsn, autocommit=True) as conn:
        row_ = conn.execute("SHOW max_connections").fetchone()
        max_connections = int(row_[0]) if row_ else 100
        used = conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()
    in_use = int(used[0]) if used else 0
    small = max(1, min(PER_CONNECTION_MAX, max_connections - in_use - 20,
                       clients // 5 if smoke else PER_CONNECTION_MAX))
    rounds = SMOKE_ROUNDS if smoke else ROUNDS
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for design, size in (("pgcast", clients), ("broadcaster", clients),
                             ("pgcast", small), ("perconn", small)):
            results.setdefault((design, size), []).append(
                measure(design, dsn, size, notifications))
    rows: list[Row] = []
    rows += _rows("pgcast", clients, results["pgcast", clients])
    rows += _rows("broadcaster", clients, results["broadcaster", clients])
    rows += _rows("pgcast", small, results["pgcast", small])
    rows += _rows("perconn", small, results["perconn", small],
                  f"; the largest size max_connections={max_connections} allows here")
    if clients > max_connections:
        rows.append(row(
            BENCH, f"{DESIGNS['perconn']} ({clients:,} clients)", "clients it can serve",
            max(0, max_connections - in_use), "clients",
            f"not run: {clients:,} clients need {clients:,} connections and this server "
            f"allows max_connections={max_connections}",
        ))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "--clients":
        asyncio.run(clients_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    else:
        main(run)
