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
