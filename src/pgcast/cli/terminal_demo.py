"""The terminal demo: a listener printing notifications sent from Python and psql.

``pgcast demo --terminal`` (and :func:`run`) starts a temporary embedded
server when no DSN is given, opens a listener on channel ``data``, sends a few
notifications from a second pgcast connection and one from ``psql`` in another
process, and prints each as it arrives, with its sender's pid and how long it
took. Then it keeps listening, printing the exact psql command to try, until
Ctrl-C or ``seconds`` have passed.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

from .. import client
from .._event import Event

__all__ = ["run"]

CHANNEL = "data"


@contextlib.contextmanager
def _database(dsn: str | None) -> Iterator[tuple[str, list[str] | None]]:
    """Yield a DSN and the psql argv prefix to reach it (None: no psql known)."""
    if dsn is not None:
        yield dsn, (["psql", dsn] if _which("psql") else None)
        return
    from ..embedded import EmbeddedServer

    with EmbeddedServer() as srv:
        yield srv.dsn, [str(srv.bin_dir / "psql"), srv.dsn]


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def _show(out: TextIO, event: Event, sent: dict[str, float], own_pids: dict[int, str]) -> None:
    started = sent.pop(event.payload, None)
    took = "" if started is None else f"  after {(time.perf_counter() - started) * 1e3:.2f} ms"
    who = own_pids.get(event.pid, "another process")
    print(f"  <- {event.channel}: {event.payload!r}  from pid {event.pid} ({who}){took}",
          file=out, flush=True)


def run(dsn: str | None = None, *, seconds: float | None = None, out: TextIO = sys.stdout) -> int:
    """Run the demo; returns the exit code. *seconds* bounds the final listening.

    SIGTERM (in the main thread) unwinds like Ctrl-C: the connections are
    closed, the temporary server stopped and its directory deleted, and the
    process exits 143.
    """
    terminated = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return _run(dsn, seconds, out, terminated)
    # The handler only sets a flag: the demo stops at its next pause, never in
    # the middle of a notify or of a connection's close.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    try:
        return _run(dsn, seconds, out, terminated)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pause(terminated: threading.Event, seconds: float) -> None:
    if terminated.wait(seconds):
        raise SystemExit(128 + signal.SIGTERM)


def _run(dsn: str | None, seconds: float | None, out: TextIO, terminated: threading.Event) -> int:
    print("pgcast terminal demo", file=out)
    with _database(dsn) as (url, psql), client.connect(url) as listener, \
            client.connect(url) as sender:
        listener.listen(CHANNEL)
        print(f"database:  {url}", file=out)
        print(f"listening: channel {CHANNEL!r} as pid {listener.backend_pid}\n", file=out)
        sent: dict[str, float] = {}
        own = {sender.backend_pid: "pgcast sender", listener.backend_pid: "listener"}
        stop = threading.Event()

        def printer() -> None:
            for event in listener.events(select_timeout=0.2, yield_timeouts=True):
                if isinstance(event, Event):
                    _show(out, event, sent, own)
                elif event is not None:  # a Reconnected marker: say so
                    print(f"  (reconnected: {event})", file=out, flush=True)
                if stop.is_set():
                    return

        thread = threading.Thread(target=printer, name="pgcast-demo", daemon=True)
        thread.start()
        try:
            for colour in ("red", "green", "blue"):
                print(f"  -> notify({CHANNEL!r}, {colour!r}) from pid {sender.backend_pid}",
                      file=out, flush=True)
                sent[colour] = time.perf_counter()
                sender.notify(CHANNEL, colour)
                _pause(terminated, 0.3)
            if psql is not None:
                command = [*psql, "-X", "-q", "-c", f"NOTIFY {CHANNEL}, 'green'"]
                print(f"  -> {shlex.join(command)}", file=out, flush=True)
                sent["green"] = time.perf_counter()
                subprocess.run(command, check=True, timeout=30, capture_output=True)
                _pause(terminated, 0.3)
                print(f"\nTry it yourself from another terminal:\n  "
                      f"{shlex.join([*psql, '-c', f'NOTIFY {CHANNEL}, {chr(39)}hello{chr(39)}'])}",
                      file=out)
            limit = "" if seconds is None else f" for {seconds:g} s"
            print(f"\nListening{limit}; Ctrl-C to stop.", file=out, flush=True)
            deadline = None if seconds is None else time.monotonic() + seconds
            while thread.is_alive() and (deadline is None or time.monotonic() < deadline):
                thread.join(0.1)
                _pause(terminated, 0.1)
        except KeyboardInterrupt:
            print("\nbye", file=out)
        finally:
            stop.set()
            thread.join(5)
    return 0
