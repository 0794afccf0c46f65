"""The documentation site's own code: every ```python block of docs/ compiles
(blocks that include an example file with ``--8<--`` are the examples, run by
their own tests), and every file a snippet includes exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_every_docs_python_block_compiles() -> None:
    compiled = 0
    for page in sorted(DOCS.rglob("*.md")):
        for n, block in enumerate(re.findall(r"^```python\n(.*?)^```$", page.read_text(),
                                             re.S | re.M)):
            if block.startswith("--8<--"):
                continue
            compile(block, f"{page.name} block {n}", "exec",
                    flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            compiled += 1
    assert compiled >= 3


def test_every_included_file_exists() -> None:
    included = [m for page in DOCS.rglob("*.md")
                for m in re.findall(r'^--8<-- "([^"]+)"$', page.read_text(), re.M)]
    assert "CHANGELOG.md" in included and len(included) >= 4
    for path in included:
        assert (ROOT / path).is_file(), path


def test_the_docs_first_loop_prints_what_another_session_sends(dsn: str,
                                                              monkeypatch: Any) -> None:
    """docs/index.md's first block, as copied: it prints a notification sent
    the way its text says (a NOTIFY from another session) and stops after 5
    quiet seconds."""
    import threading
    import time

    import psycopg

    [block] = [b for b in re.findall(r"^```python\n(.*?)^```$", (DOCS / "index.md").read_text(),
                                     re.S | re.M) if 'ps.listen("orders")' in b]
    monkeypatch.setenv("PGCAST_DSN", dsn)
    lines: list[str] = []
    namespace: dict[str, Any] = {"__name__": "docs_index",
                                 "print": lambda *a: lines.append(" ".join(map(str, a)))}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            exec(compile(block, "docs/index.md", "exec"), namespace)
        except BaseException as exc:  # reported below
            failure.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while "ps" not in namespace or not namespace["ps"].listening_channels():
        assert time.monotonic() < deadline and worker.is_alive(), failure or "never listened"
        time.sleep(0.05)
    with psycopg.connect(dsn, autocommit=True) as other:
        for _ in range(10):  # again if it went out before the LISTEN took effect
            other.execute("NOTIFY orders, 'hello'")
            heard = time.monotonic() + 1
            while not lines and time.monotonic() < heard:
                time.sleep(0.05)
            if lines:
                break
    worker.join(timeout=60)
    assert not worker.is_alive(), "the docs loop did not stop after 5 quiet seconds"
    assert not failure, failure
    assert any(line.startswith("orders hello from pid ") for line in lines), lines
