"""Every argument in seconds refuses NaN, with an error naming it.

Every comparison with NaN is false, so a check written ``value < 0`` let it
through: ``events(select_timeout=nan)`` and ``wait(timeout=nan)`` then spun
(``None`` yielded at once, forever, a CPU at 100%), a Worker's ``debounce``
window never closed (its batches never reached the handler), and ``pgcast
listen --timeout nan`` never timed out. Checked on the pure parts and on the
public entry points of each flavour.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import pytest

import pgcast
import pgcast.aio
from pgcast._checks import check_timeout
from pgcast.gateway._client import Settings
from pgcast.publisher._batcher import Batcher

NAN = math.nan


def test_check_timeout_refuses_nan() -> None:
    with pytest.raises(ValueError, match=r"select_timeout must be >= 0 seconds, got nan"):
        check_timeout("select_timeout", NAN)
    assert check_timeout("t", math.inf) == math.inf  # no limit, as None: allowed


def test_pubsub_iteration_refuses_nan(dsn: str) -> None:
    with pgcast.connect(dsn) as ps:
        with pytest.raises(ValueError, match="select_timeout must be >= 0 seconds, got nan"):
            ps.events(select_timeout=NAN)
        with pytest.raises(ValueError, match="timeout must be >= 0 seconds, got nan"):
            ps.wait(NAN)
        ps.notify("still", "usable")  # the connection is untouched


def test_asyncio_pubsub_iteration_refuses_nan(dsn: str) -> None:
    async def main() -> None:
        async with await pgcast.aio.connect(dsn) as ps:
            with pytest.raises(ValueError, match="select_timeout must be >= 0 seconds, got nan"):
                ps.events(select_timeout=NAN)
            with pytest.raises(ValueError, match="timeout must be >= 0 seconds, got nan"):
                ps.wait(NAN)
            await ps.notify("still", "usable")

    asyncio.run(main())


@pytest.mark.parametrize("worker", [pgcast.Worker, pgcast.aio.Worker])
def test_worker_refuses_nan_windows(dsn: str, worker: type) -> None:
    with pytest.raises(ValueError, match="debounce must be >= 0 seconds, got nan"):
        worker(dsn, debounce=NAN)
    with pytest.raises(ValueError, match="poll_interval must be >= 0 seconds, got nan"):
        worker(dsn, poll_interval=NAN)
    with pytest.raises(ValueError, match="debounce must be >= 0 seconds, got nan"):
        worker(dsn).on("c", debounce=NAN)


def test_publisher_batches_refuse_nan() -> None:
    with pytest.raises(ValueError, match="interval must be a number of seconds >= 0, got nan"):
        Batcher(object, interval=NAN, max_batch=10, max_pending=10)


@pytest.mark.parametrize(
    "name", ["heartbeat", "database_timeout", "close_timeout", "metrics_cache", "auth_timeout",
             "replay_wait"],
)
def test_gateway_seconds_refuse_nan(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a number of seconds > 0, got nan"):
        Settings(**{name: NAN})  # type: ignore[arg-type]


def test_cli_listen_timeout_refuses_nan(dsn: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pgcast", "listen", "c", "--timeout", "nan", "--dsn", dsn],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--timeout must be > 0 seconds" in done.stderr
