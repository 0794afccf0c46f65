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
import uuid
from pathlib import Path

from _common import Row, acount_events, count_events, prefill, row

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


class _Sizes(dict[str, int]):
    """The listener's RSS after LISTEN, after the warm-up, at the end; its count."""

    def __init__(self, n: int) -> None:
        super().__init__(start=0, warm=0, end=0, count=0)
        self.warm_at = n // 10

    def ready(self) -> None:
        """LISTENing: take the first size and tell the parent."""
        self["start"] = _rss()
        print("ready", flush=True)

    def counted(self, count: int) -> None:
        """*count* events so far: the warm-up's size when it ends."""
        if count == self.warm_at:
            self["warm"] = _rss()

    def done(self, count: int) -> dict[str, int]:
        """The drain is over: the last size."""
        self["end"] = _rss()
        self["count"] = count
        return dict(self)


def listen_sync(dsn: str, channel: str, n: int) -> dict[str, int]:
    sizes = _Sizes(n)
    with pgcast.connect(dsn) as ps:
        ps.listen(channel)
        sizes.ready()
        sys.stdin.readline()  # "go": everything has been sent
        events = ps.events(select_timeout=1.0, yield_timeouts=True)
        return sizes.done(count_events(events, n, TIMEOUT, sizes.counted))


def listen_async(dsn: str, channel: str, n: int) -> dict[str, int]:
    async def main() -> dict[str, int]:
        sizes = _Sizes(n)
        async with await pgcast.aio.connect(dsn) as ps:
            await ps.listen(channel)
            sizes.ready()
            await asyncio.to_thread(sys.stdin.readline)
            events = ps.events(select_timeout=1.0, yield_timeouts=True)
            return sizes.done(await acount_events(events, n, TIMEOUT, sizes.counted))

    return asyncio.run(main())


def listen_callbacks(dsn: str, channel: str, n: int) -> dict[str, int]:
    sizes = _Sizes(n)
    done = threading.Event()
    count = 0
    with pgcast.connect(dsn) as ps:

        def handler(event: pgcast.Event) -> None:
            nonlocal count
            count += 1
            sizes.counted(count)
            if count == n:
                done.set()

        ps.subscribe(channel, handler)
        sizes.ready()
        sys.stdin.readline()
        runner = ps.run_in_thread()
        done.wait(TIMEOUT)
        runner.stop()
        return sizes.done(count)


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
