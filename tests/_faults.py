"""Helpers for the fault-injection tests of reconnect and health checks.

Every wait is bounded and fails the test loudly; every loop is bounded in
count and time.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest

import pgcast
from pgcast.embedded import EmbeddedServer

Item = pgcast.Event | pgcast.Reconnected

#: How long a test waits for a reconnect on loopback.
RECONNECT_TIMEOUT = 20.0

#: A backoff that retries fast, so outage tests stay short.
FAST = pgcast.Backoff(initial=0.05, maximum=0.5)


def terminate(conn: psycopg.Connection[tuple[object, ...]], pid: int) -> None:
    """pg_terminate_backend(pid), checked."""
    row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    assert row == (True,), f"backend {pid} was not terminated"


def until(
    ps: pgcast.PubSub, done: type | str, timeout: float = RECONNECT_TIMEOUT
) -> list[Item]:
    """Iterate *ps* until an item of type *done* (or an event with payload
    *done*) arrives; return every item up to and including it."""
    got: list[Item] = []
    deadline = time.monotonic() + timeout
    for item in ps.events(select_timeout=0.05, yield_timeouts=True):
        if item is not None:
            got.append(item)
            if _matches(item, done):
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"{done!r} did not arrive within {timeout} s; got {got[-5:]}")


async def auntil(
    aps: pgcast.AsyncPubSub, done: type | str, timeout: float = RECONNECT_TIMEOUT
) -> list[Item]:
    """The asyncio twin of :func:`until`."""
    got: list[Item] = []
    deadline = time.monotonic() + timeout
    async for item in aps.events(select_timeout=0.05, yield_timeouts=True):
        if item is not None:
            got.append(item)
            if _matches(item, done):
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"{done!r} did not arrive within {timeout} s; got {got[-5:]}")


def _matches(item: Item, done: type | str) -> bool:
    if isinstance(done, str):
        return isinstance(item, pgcast.Event) and item.payload == done
    return isinstance(item, done)


def markers(items: list[Item]) -> list[pgcast.Reconnected]:
    return [i for i in items if isinstance(i, pgcast.Reconnected)]


def payloads(items: list[Item]) -> list[str]:
    return [i.payload for i in items if isinstance(i, pgcast.Event)]


@contextmanager
def dedicated_server() -> Iterator[EmbeddedServer]:
    """A server of the test's own, to stop and restart without disturbing
    the session's."""
    with EmbeddedServer() as srv:
        yield srv


@contextmanager
def hot_standby() -> Iterator[EmbeddedServer]:
    """A real hot standby: a primary of its own, pg_basebackup -R, started.

    Run as root, the copied directory is handed to the account the server
    runs as (as EmbeddedServer does for the clusters it creates).
    """
    with EmbeddedServer(settings={"wal_level": "replica"}) as primary:
        top = tempfile.mkdtemp(prefix="pgcast-standby-")
        datadir = os.path.join(top, "data")
        try:
            done = subprocess.run(
                [str(primary.bin_dir / "pg_basebackup"), "-d", primary.dsn, "-D", datadir,
                 "-R", "-X", "stream", "--no-sync"],
                capture_output=True, text=True, timeout=60, check=False,
            )
            assert done.returncode == 0, f"pg_basebackup failed: {done.stderr}"
            os.chmod(datadir, 0o700)
            if os.geteuid() == 0:
                account = pwd.getpwnam("embedded_postgres")
                for root, _dirs, files in os.walk(top):
                    os.chown(root, account.pw_uid, account.pw_gid)
                    for name in files:
                        os.chown(os.path.join(root, name), account.pw_uid, account.pw_gid)
            standby = EmbeddedServer(datadir)
            standby.start()
            try:
                yield standby
            finally:
                standby.stop()
        finally:
            shutil.rmtree(top, ignore_errors=True)


def failing_coroutine_callback(seen: list[str]) -> Callable[[pgcast.Reconnected], Awaitable[None]]:
    """An ``on_reconnect`` that is a coroutine function and raises.

    Defined here, not in a test source that tools/async_to_sync.py turns into
    sync code, so that both flavours' tests get a coroutine function.
    """

    async def on_reconnect(marker: pgcast.Reconnected) -> None:
        seen.append("async")
        raise RuntimeError("callback bug")

    return on_reconnect


@pytest.fixture(scope="module")
def small_queue_server() -> Iterator[EmbeddedServer]:
    """A server whose notification queue holds 64 pages (512 KiB): PostgreSQL
    17's max_notify_queue_pages, at its minimum."""
    with EmbeddedServer(settings={"max_notify_queue_pages": 64}) as srv:
        yield srv


def fill_notify_queue(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    """Fill the notification queue of *dsn*'s server: a listener that stays
    in a transaction holds every notification; returned, to close."""
    holder = psycopg.connect(dsn)
    holder.execute("LISTEN pgcast_test_full")
    holder.commit()
    holder.execute("SELECT 1")  # a transaction left open: nothing is read
    with psycopg.connect(dsn, autocommit=True) as filler:
        for _ in range(200):  # bounded: 64 pages hold about 64 of these
            try:
                filler.execute("SELECT pg_notify('pgcast_test_full', repeat('x', 7000))")
            except psycopg.errors.ProgramLimitExceeded:
                return holder
    holder.close()
    pytest.fail("the notification queue did not fill up")
