"""The documentation site's own code: every ```python block of docs/ compiles
(blocks that include an example file with ``--8<--`` are the examples, run by
their own tests), and every file a snippet includes exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

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
