"""Memory: a listener's RSS stays flat over 1,000,000 notifications.

The listener runs in a process of its own (``python bench_memory.py --listen
SUBJECT DSN CHANNEL N``), so its RSS is the listener's alone. It LISTENs and
says ready; the parent sends N small notifications in transactions of
10,000; the listener drains them all, and reads its RSS after a warm-up
(the first 10 %) and at the end. The growth between the two is reported (the
target: under 5 MB).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from _common import Row, prefill, row

import pgcast

BENCH = "memory"
N = 1_000_000
SMOKE_N = 100_000
TIMEOUT = 300.0
HERE = Path(__file__).resolve()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _page_size()


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


def listen_sync(dsn: str, channel: str, n: int) -> dict[str, int]:
    warm = n // 10
    out = {"start": 0, "warm": 0, "end": 0, "count": 0}
    with pgcast.connect(dsn) as ps:
        ps.listen(channel)
        out["start"] = _rss()
        print("ready", flush=True)
        sys.stdin.readline()  # "go": everything has been sent
        count = 0
        deadline = time.monotonic() + TIMEOUT
        for event in ps.events(select_timeout=1.0, yield_timeouts=True):
            if event is None:
                if time.monotonic() > deadline:
                    break
                continue
            count += 1
            if count == warm:
                out["warm"] = _rss()
            elif count == n:
                break
        out["end"] = _rss()
        out["count"] = count
    return out


def listen_async(dsn: str, channel: str, n: int) -> dict[str, int]:
    async def main() -> dict[str, int]:
        warm = n // 10
        out = {"start": 0, "warm": 0, "end": 0, "count": 0}
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(channel)
            out["start"] = _rss()
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            count = 0
            deadline = time.monotonic() + TIMEOUT
            async for event in ps.events(select_timeout=1.0, yield_timeouts=True):
                if event is None:
                    if time.monotonic() > deadline:
                        break
                    continue
                count += 1
                if count == warm:
                    out["warm"] = _rss()
                elif count == n:
                    break
            out["end"] = _rss()
            out["count"] = count
        return out

    return asyncio.run(main())


def listen_callbacks(dsn: str, channel: str, n: int) -> dict[str, int]:
    warm = n // 10
    out = {"start": 0, "warm": 0, "end": 0, "count": 0}
    done = threading.Event()
    with pgcast.connect(dsn) as ps:

        def handler(event: pgcast.Event) -> None:
            out["count"] += 1
            if out["count"] == warm:
                out["warm"] = _rss()
            elif out["count"] == n:
                done.set()

        ps.subscribe(channel, handler)
        out["start"] = _rss()
        print("ready", flush=True)
        sys.stdin.readline()
        runner = ps.run_in_thread()
        done.wait(TIMEOUT)
        runner.stop()
        out["end"] = _rss()
    return out


SUBJECTS = {
    "pgcast sync events()": listen_sync,
    "pgcast asyncio events()": listen_async,
    "pgcast sync callbacks (run_in_thread)": listen_callbacks,
}


def measure(dsn: str, subject: str, n: int) -> dict[str, int]:
    channel = f"bench_mem_{uuid.uuid4().hex[:8]}"
    child = subprocess.Popen(
        [sys.executable, str(HERE), "--listen", subject, dsn, channel, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {subject} listener did not start")
        prefill(dsn, channel, n)
        child.stdin.write("go\n")
        child.stdin.flush()
        result: dict[str, int] = json.loads(child.stdout.readline())
        child.wait(TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    if result["count"] != n:
        raise RuntimeError(f"the {subject} listener received {result['count']} of {n}")
    return result


def run(dsn: str, smoke: bool) -> list[Row]:
    """RSS growth of each listener between warm-up and the end."""
    n = SMOKE_N if smoke else N
    rows = []
    for subject in SUBJECTS:
        r = measure(dsn, subject, n)
        mib = 1024 * 1024
        note = (
            f"{n:,} notifications; RSS {r['start'] / mib:.1f} MiB after LISTEN, "
            f"{r['warm'] / mib:.1f} MiB after {n // 10:,}, {r['end'] / mib:.1f} MiB at the end"
        )
        rows.append(row(BENCH, subject, "RSS growth", (r["end"] - r["warm"]) / mib, "MiB", note))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--listen":
        _, _, subject, dsn, channel, count = sys.argv
        print(json.dumps(SUBJECTS[subject](dsn, channel, int(count))), flush=True)
    else:
        from _common import main

        main(run)
