"""The gateway's fan-out against the floor and its peers, at 5,000 to 50,000 clients.

What is measured, for each server, in one run (issue 10):

* **latency to the last client**: from a ``NOTIFY`` (``pg_notify`` from the
  benchmark) to the moment the *last* client has it; p50 and p99 over the
  notifications, sent one at a time (the next once every client has the last);
* **memory per idle client**: the server's RSS (its workers' summed) once every
  client is connected and subscribed, minus its RSS before any, per client;
* **connections accepted per second**: clients / the time from the first
  connection to the last ``subscribed`` (the load opens 256 at a time per
  load process);
* **saturation throughput**: frames delivered per second when NOTIFYs come
  faster than they can be fanned out: a burst of notifications in one
  transaction, timed until every client has the last one.

The servers (``_fanout_servers.py``): a raw floor (one frame built per
NOTIFY, ``transport.write()`` to all), the ``websockets`` library's server with
``broadcast()``, ``pgcast serve`` (one worker, and ``--workers 2``),
encode/broadcaster, and at a small size a database connection per client.
The clients are processes of one epoll loop each, from their own loopback
source address (127.0.0.2, .3, ...: ephemeral ports are per source address),
never parsing more than a frame header and a marker: ``fanout_load.c``,
compiled with the machine's C compiler at the first run (the same loop in
Python, ``_fanout_load.py``, costs 25 us a frame, as much as the servers
measured, and is used only where there is no compiler; the rows say which).

Limits of this machine, stated in the rows: a process may hold at most its
hard descriptor limit (20,000 here; raising it needs a privilege this
sandbox does not grant), so one server process serves at most 19,000 clients
here; 50,000 are measured on ``pgcast serve --workers 3``. Server, clients
and PostgreSQL share 2 cores, so absolute numbers include that contention;
the ratios between servers of one run are what the targets judge.

Everything is on 127.0.0.1-127.0.0.9; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import queue
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
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
HERE = Path(__file__).resolve().parent
NOTIFICATIONS = 20
SMOKE_NOTIFICATIONS = 5
#: (design, clients, rounds): the 5,000-client designs are measured ROUNDS
#: times, alternating, their notifications pooled (the machine is shared).
ROUNDS = 3
#: One load process holds at most this many clients (the descriptor limit).
PER_LOAD = 19_000
CONNECT_TIMEOUT = 300.0
NOTIFY_TIMEOUT = 60.0
BURST_FRAMES = 500_000  # frames per saturation burst: clients x notifications
#: The slowest server measured fans out about 20,000 frames a second.
BURST_TIMEOUT = 300.0

DESIGNS = {
    "floor": "raw floor (one frame, transport.write to all)",
    "websockets": "websockets server + broadcast()",
    "pgcast": "pgcast serve",
    "pgcast-asgi": "pgcast create_app on uvicorn's own WebSocket protocol (generic ASGI)",
    "pgcast2": "pgcast serve --workers 2",
    "pgcast3": "pgcast serve --workers 3",
    "broadcaster": "encode/broadcaster (postgres)",
    "perconn": "one LISTEN connection per client",
}
WORKERS = {"pgcast2": 2, "pgcast3": 3}


def raise_nofile() -> None:
    """Many sockets per process: raise the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the coordinator --------------------------------------------------------


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
    """The RSS of *pid* and of its children (the workers of --workers N)."""
    import psutil

    proc = psutil.Process(pid)
    total: int = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


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
            if line.startswith("lost"):
                raise RuntimeError(f"the server closed a client ({line}) while waiting for "
                                   f"{prefix!r}: the run is not valid")
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



def load_command() -> tuple[list[str], str]:
    """The client load's command (the C one, built once, if a compiler is
    here) and its name for the notes."""
    source = HERE / "fanout_load.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = Path(tempfile.gettempdir()) / f"pgcast-bench-fanout_load-{digest}"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not binary.exists() and compiler is not None:
        built = binary.with_suffix(".tmp")
        done = subprocess.run([compiler, "-O2", "-o", str(built), str(source)],
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode == 0:
            built.replace(binary)
        else:
            print(f"gateway: building fanout_load.c failed, the Python load is used:\n"
                  f"{done.stderr}", file=sys.stderr)
    if binary.exists():
        return [str(binary)], "C epoll load (fanout_load.c)"
    return [sys.executable, str(HERE / "_fanout_load.py")], "Python epoll load (_fanout_load.py)"


def _server_argv(design: str, port: int, dsn: str) -> list[str]:
    if design in WORKERS:
        return [sys.executable, "-m", "pgcast", "serve", "--dsn", dsn, "--port", str(port),
                "--allow", CHANNEL, "--workers", str(WORKERS[design]),
                "--max-clients", "100000", "--log-level", "error", "--no-access-log",
                # every load process connects from one address: no per-address cap
                "--max-clients-per-address", "0"]
    return [sys.executable, str(HERE / "_fanout_servers.py"), design, str(port), dsn]


def measure(design: str, dsn: str, clients: int, notifications: int,
            burst: bool = True) -> dict[str, Any]:
    """Serve *design*, connect *clients*, time *notifications* and a burst."""
    port = _free_port()
    with _process(_server_argv(design, port, dsn)) as server:
        _wait_port(port, server)
        time.sleep(1.5 if design in WORKERS else 1.0)  # let start-up allocations settle
        before = _rss(server.pid)
        loads = max(2 if clients >= 1000 else 1, math.ceil(clients / PER_LOAD))
        per = [clients // loads + (i < clients % loads) for i in range(loads)]
        with contextlib.ExitStack() as stack:
            load, _ = load_command()
            procs = [stack.enter_context(_process(
                [*load, str(n), str(port), f"127.0.0.{2 + i}"])) for i, n in enumerate(per)]
            lines = [_Lines(p) for p in procs]
            connect_s = max(float(ln.expect("ready", CONNECT_TIMEOUT).split()[1])
                            for ln in lines)
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
                rate = None
                if burst:
                    count = max(10, min(500, BURST_FRAMES // clients))
                    first = notifications
                    final = first + count - 1
                    sent = time.monotonic()
                    conn.execute(
                        "SELECT count(pg_notify(%s, 'n=' || i || ';')) "
                        "FROM generate_series(%s::int, %s::int) AS i", (CHANNEL, first, final))
                    last = max(float(ln.expect(f"got {final} ", BURST_TIMEOUT).split()[2])
                               for ln in lines)
                    rate = clients * count / (last - sent)
    return {
        "latencies": latencies,
        "rss_per_client": (after - before) / clients,
        "backend_uss_per_client": None if backends is None else backends / clients,
        "connect_s": connect_s,
        "accept_rate": clients / connect_s,
        "frames_per_s": rate,
    }


def subject(design: str, clients: int) -> str:
    return f"{DESIGNS[design]} ({clients:,} clients)"


def _rows(design: str, clients: int, results: list[dict[str, Any]], extra: str = "") -> list[Row]:
    name = subject(design, clients)
    lat = [x * 1000 for r in results for x in r["latencies"]]
    per_round = ", ".join(
        f"{percentile([x * 1000 for x in r['latencies']], 50):,.0f}" for r in results)
    note = (f"{len(lat)} notifications in {len(results)} run(s), each to every client; "
            f"p50 per run: {per_round} ms{extra}")

    def median_of(key: str) -> float:
        values = sorted(r[key] for r in results if r[key] is not None)
        return values[len(values) // 2] if values else math.nan

    rows = [
        row(BENCH, name, "p50 NOTIFY to last client", percentile(lat, 50), "ms", note),
        row(BENCH, name, "p99 NOTIFY to last client", percentile(lat, 99), "ms"),
        row(BENCH, name, "memory per idle client", median_of("rss_per_client") / 1024, "KiB",
            "server RSS delta (workers summed) / clients, median of the runs"),
        row(BENCH, name, "connections accepted per second", median_of("accept_rate"), "conn/s",
            "clients / (first connect to last subscribed), median; runs: "
            + ", ".join(f"{r['accept_rate']:,.0f}" for r in results)),
    ]
    if any(r["frames_per_s"] for r in results):
        rows.append(row(BENCH, name, "saturation throughput", median_of("frames_per_s"),
                        "frames/s", "a burst in one transaction, clients x notifications / "
                        "time to the last client's last frame; runs: "
                        + ", ".join(f"{r['frames_per_s'] or 0:,.0f}" for r in results)))
    uss = [r["backend_uss_per_client"] for r in results if r["backend_uss_per_client"]]
    if uss:
        rows.append(row(BENCH, name, "PostgreSQL backend memory per client",
                        sorted(uss)[len(uss) // 2] / 1024, "KiB",
                        "USS of the per-client backends, summed / clients"))
    return rows


def plan(smoke: bool, max_connections: int, in_use: int) -> list[tuple[str, int, int]]:
    """(design, clients, rounds) in the order they run."""
    small = max(1, min(150, max_connections - in_use - 20))
    if smoke:
        return [(d, 200, 1) for d in ("floor", "websockets", "pgcast", "pgcast2",
                                      "broadcaster")] + [("perconn", min(small, 40), 1)]
    out = [(d, 5_000, ROUNDS) for d in ("floor", "websockets", "pgcast", "pgcast2",
                                         "broadcaster")]
    out += [("pgcast-asgi", 5_000, 1)]
    out += [(d, 19_000, 1) for d in ("floor", "websockets", "pgcast")]
    out += [("pgcast3", 50_000, 1), ("pgcast", small, 1), ("perconn", small, 1)]
    return out


def run(dsn: str, smoke: bool) -> list[Row]:
    """The benchmark rows (see the module docstring)."""
    raise_nofile()
    notifications = SMOKE_NOTIFICATIONS if smoke else NOTIFICATIONS
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute("SHOW max_connections").fetchone()
        max_connections = int(found[0]) if found else 100
        used = conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()
    in_use = int(used[0]) if used else 0
    steps = plan(smoke, max_connections, in_use)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    failed: dict[tuple[str, int], list[str]] = {}
    for round_ in range(max(r for _, _, r in steps)):
        for design, clients, rounds in steps:
            if round_ < rounds:
                print(f"gateway: {subject(design, clients)}, run {round_ + 1}", file=sys.stderr,
                      flush=True)
                try:
                    results.setdefault((design, clients), []).append(measure(
                        design, dsn, clients, notifications, burst=design != "perconn"))
                except (RuntimeError, TimeoutError) as exc:
                    # One server failing a run must not lose the others' rows.
                    failed.setdefault((design, clients), []).append(str(exc))
    rows: list[Row] = []
    _, load = load_command()
    for (design, clients), measured in results.items():
        extra = f"; {load}" + (f"; the largest size max_connections={max_connections} "
                               "allows here" if design == "perconn" else "")
        rows += _rows(design, clients, measured, extra)
    for (design, clients), errors in failed.items():
        rows.append(row(BENCH, subject(design, clients), "failed runs", len(errors), "runs",
                        "FAILED: " + "; ".join(errors)))
    rows.append(row(BENCH, subject("pgcast", 50_000), "clients one process may hold here",
                    PER_LOAD, "clients",
                    "not run: 50,000 sockets in one process need a descriptor limit over "
                    "50,000, and this sandbox's hard limit is 20,000 and cannot be raised; "
                    "50,000 ran on --workers 3"))
    return rows


if __name__ == "__main__":
    main(run)
