"""The two flavours kept apart: an API of one flavour handed the other
flavour's connection refuses it at once, naming the function to use (before,
``pgcast.notify(async_conn, ...)`` lost the notification with only a
"coroutine never awaited" warning); and the generated sync modules are what
``tools/async_to_sync.py`` makes from their asyncio sources."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgcast
import pgcast.aio

ROOT = Path(__file__).resolve().parent.parent


def test_sync_apis_refuse_an_async_connection(dsn: str, unique_channel: str) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            with pytest.raises(TypeError, match=r"pgcast\.aio\.notify\(\)"):
                pgcast.notify(aconn, unique_channel, "lost?")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=r"pgcast\.aio\.AsyncPubSub"):
                pgcast.PubSub(aconn)  # type: ignore[arg-type]

    asyncio.run(main())


def test_async_apis_refuse_a_sync_connection(conn: psycopg.Connection[tuple[object, ...]],
                                             unique_channel: str) -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match=r"pgcast\.notify\(\)"):
            await pgcast.aio.notify(conn, unique_channel, "x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"use pgcast\.PubSub"):
            pgcast.aio.AsyncPubSub(conn)  # type: ignore[arg-type]

    asyncio.run(main())


def test_anything_else_is_refused_by_its_type(unique_channel: str) -> None:
    with pytest.raises(TypeError, match="not str"):
        pgcast.notify("postgresql://", unique_channel)  # type: ignore[arg-type]


def test_generated_modules_are_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "async_to_sync.py"), "--check"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr


def test_generated_modules_say_so_and_name_their_source() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import async_to_sync
    finally:
        sys.path.pop(0)
    assert async_to_sync.FILES
    for source, target in async_to_sync.FILES:
        head = (ROOT / target).read_text().splitlines()[0]
        assert head.startswith(f"# Generated from {source} by tools/async_to_sync.py")
        assert (ROOT / source).exists()


#: Issue 11: no module of the package over this many lines (a layer that
#: grows past it is split, as client/, durable/ and feeds/ were).
MAX_MODULE_LINES = 500


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in sorted((ROOT / "src" / "pgcast").rglob("*.py"))
    }
    assert len(sizes) > 50, sizes  # the package was found
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


def _private_names_of_the_pubsub() -> set[str]:
    """The private methods and attributes the PubSub's classes define."""
    import ast

    names: set[str] = set()
    for path in (ROOT / "src" / "pgcast" / "client").glob("*_async.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_nothing_outside_the_client_reaches_into_a_pubsub() -> None:
    """Issue 11: the managers, the Worker, the Publisher, the gateway and the
    compat layers drive a PubSub through its public (supervisor) interface:
    no ``other._private`` of a PubSub's private name outside client/."""
    import ast

    private = _private_names_of_the_pubsub()
    assert {"_wake", "_read", "_core", "_conn", "_fill"} <= private  # the scan works
    found = []
    for path in sorted((ROOT / "src" / "pgcast").rglob("*.py")):
        if path.parent.name == "client":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in private
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not found, found


def test_both_flavour_modules_offer_the_same_names() -> None:
    from pgcast import _flavour, _flavour_async

    for name in _flavour_async.__all__:
        assert hasattr(_flavour, name), f"pgcast._flavour lacks {name}"
    public = {n for n in vars(_flavour) if not n.startswith("_") and n.isidentifier()}
    imported = {
        "Any", "Awaitable", "Callable", "ConnectionLostError", "Generic", "Iterable", "K",
        "TypeVar", "annotations", "check_flavour", "asyncio", "concurrent", "contextlib",
        "inspect", "logging", "os", "pq", "psycopg", "select", "selectors", "socket",
        "threading", "time", "weakref",
    }
    assert public - imported <= set(_flavour_async.__all__)


def test_sync_gather_cancelled_stops_sleeping_threads_and_bounds_its_wait(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The sync twin of cancelling tasks: a start_task() thread ends at its
    # next sleep_unless(); one busy elsewhere (a connection attempt) is waited
    # for within the timeout, then left, named in a warning, to end at its sleep.
    from pgcast import _flavour

    monkeypatch.setattr(_flavour, "_CANCEL_TIMEOUT", 0.5)
    tracked: set[Any] = set()
    never = threading.Event()  # the PubSub's closing: not set here
    busy = threading.Event()
    slept: list[str] = []

    def sleeper() -> None:
        _flavour.sleep_unless(never, 60)
        slept.append("sleeper")  # not reached: stopped

    def attempting() -> None:
        assert busy.wait(10), "not released"
        _flavour.sleep_unless(never, 60)
        slept.append("attempting")

    _flavour.start_task(sleeper, "t-sleeper", tracked)
    _flavour.start_task(attempting, "t-attempting", tracked)
    assert len(tracked) == 2
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="pgcast"):
        _flavour.gather_cancelled(tracked)
    took = time.monotonic() - started
    assert 0.4 < took < 2.0, took
    assert [t.name for t in tracked] == ["t-attempting"]
    assert "t-attempting" in caplog.text and "t-sleeper" not in caplog.text
    busy.set()
    deadline = time.monotonic() + 5
    while tracked:
        assert time.monotonic() < deadline, "the busy thread did not end at its sleep"
        time.sleep(0.01)
    assert slept == []
    assert _flavour.sleep_unless(never, 0.01) is False  # other threads sleep as before


def test_every_new_test_has_its_twin_in_the_other_flavour() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "test_twins.py")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr


def test_install_schema_refuses_the_other_flavour(dsn: str) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            with pytest.raises(TypeError, match=r"pgcast\.aio\.install_schema\(\)"):
                pgcast.install_schema(aconn)  # type: ignore[arg-type]
        with (
            psycopg.connect(dsn, autocommit=True) as conn,
            pytest.raises(TypeError, match=r"use pgcast\.install_schema\(\)"),
        ):
            await pgcast.aio.install_schema(conn)  # type: ignore[arg-type]

    asyncio.run(main())


def test_the_asyncio_names_are_under_pgcast_aio() -> None:
    import pgcast.durable

    # The functions under their sync names; the older names in pgcast.durable
    # are the same functions.
    assert pgcast.aio.install_schema is pgcast.durable.install_schema_async
    assert pgcast.aio.prune is pgcast.durable.prune_async
    assert pgcast.aio.drive is pgcast.durable.adrive
    for name in ("install_schema", "prune", "consumers", "drive"):
        sync, asyncio_ = getattr(pgcast.durable, name), getattr(pgcast.aio, name)
        assert not inspect.iscoroutinefunction(sync), name
        assert inspect.iscoroutinefunction(asyncio_), name
        assert sync.__doc__ == asyncio_.__doc__, name  # one source
    assert pgcast.aio.NotificationManager is pgcast.aio.AsyncNotificationManager
    assert pgcast.aio.AsyncPubSub is pgcast.AsyncPubSub


#: The methods a PubSub receives through, in both flavours.
RECEIVING_PATH = ("get_event", "events", "wait", "_drive", "_fill", "_read")


@pytest.mark.parametrize("cls", [pgcast.PubSub, pgcast.AsyncPubSub])
def test_no_sleep_in_the_receiving_code(cls: type) -> None:
    """Waiting is on the socket, never a sleep-and-poll loop, in either flavour."""
    import pgcast._core

    functions: list[Any] = [getattr(cls, name) for name in RECEIVING_PATH]
    functions += [pgcast._core.plan, pgcast._core.Core.read, pgcast._core.Core.take]
    for function in functions:
        assert "sleep(" not in inspect.getsource(function), function.__qualname__
