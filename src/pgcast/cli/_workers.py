"""``pgcast serve --workers N``: N gateway processes sharing one port.

Each worker is an ordinary ``pgcast serve`` process (its own uvicorn server,
its own single LISTEN connection, the same graceful shutdown: 1001 to every
client), started with the same arguments and binding the port with
``SO_REUSEPORT``, so the kernel spreads new connections across them. This
process only supervises: it resolves the DSN once (the workers never race
to start an embedded server), passes SIGTERM and SIGINT on, and exits with
the worst exit code once every worker ended. A worker that dies is not
restarted: run the command under a supervisor (systemd, a container
runtime) that restarts the whole group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from ._common import UsageError

__all__ = ["REUSE_PORT_FLAG", "run_workers", "worker_argv"]

#: The hidden flag a worker is started with: bind with SO_REUSEPORT.
REUSE_PORT_FLAG = "--reuse-port"


def worker_argv(argv: Sequence[str]) -> list[str]:
    """*argv* (``serve ...``) without ``--workers N``, plus the worker flag."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [*out, REUSE_PORT_FLAG]


def run_workers(argv: Sequence[str], workers: int, dsn: str) -> int:
    """Start *workers* ``pgcast`` processes with *argv* and supervise them."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UsageError("--workers needs SO_REUSEPORT, which this system lacks")
    env = {**os.environ, "PGCAST_DSN": dsn}
    procs = [
        subprocess.Popen([sys.executable, "-m", "pgcast.cli", *worker_argv(argv)], env=env)
        for _ in range(workers)
    ]
    print(f"pgcast serve: {workers} workers (pids {', '.join(str(p.pid) for p in procs)})",
          file=sys.stderr, flush=True)

    def forward(sig: int, frame: FrameType | None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    originals = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(proc.poll() is None for proc in procs):
            time.sleep(0.2)
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)
        for proc in procs:  # only if this process itself is being torn down
            if proc.poll() is None:
                proc.terminate()
    return max(proc.returncode or 0 for proc in procs)
