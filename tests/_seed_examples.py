"""The code examples of the seed documents, extracted as they are written.

``tests/data/seeds/`` holds the documents verbatim (py-postgresql's
notification chapter and its earlier revision as a diff, pgpubsub's README).
:func:`doctest_blocks` cuts the ``>>>`` examples of a document into blocks,
one per code example (examples are separated by prose), each a list of
statements with the output the document shows after each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SEEDS = Path(__file__).parent / "data" / "seeds"

#: A line of the diff seed: "<old><new>+ text" or "<old><new> text".
_DIFF_LINE = re.compile(r"^\d+[+-]? ?")


@dataclass
class Statement:
    """One ``>>>`` statement (with its ``...`` lines) and the output shown."""

    source: str
    want: list[str] = field(default_factory=list)


def read_seed(name: str, *, diff: bool = False, start: str = "") -> str:
    """A seed document, from the first line *start* on; a diff's line
    numbers and markers removed."""
    text = (SEEDS / name).read_text(encoding="utf-8")
    if diff:
        text = "\n".join(_DIFF_LINE.sub("", line) for line in text.splitlines())
    return text[text.index(start):] if start else text


def shape(source: str) -> list[str]:
    """*source* without indentation or blank lines: what survives a rendering
    that lost the indentation (the diff seed's)."""
    return [line.strip() for line in source.splitlines() if line.strip()]


def doctest_blocks(text: str) -> list[list[Statement]]:
    """The document's examples: consecutive ``>>>`` statements form a block
    until prose (a line that is neither a prompt nor output) ends it."""
    blocks: list[list[Statement]] = []
    block: list[Statement] = []
    current: Statement | None = None
    after_blank = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            current = Statement(stripped[4:])
            block.append(current)
            after_blank = False
        elif stripped.startswith("...") and current is not None and not current.want \
                and not after_blank:
            current.source += "\n" + stripped[4:]
        elif not stripped:
            after_blank = True
        elif current is not None and not after_blank:
            current.want.append(stripped)  # output shown after the statement
        else:  # prose: the example is over
            if block:
                blocks.append(block)
            block, current = [], None
    if block:
        blocks.append(block)
    return blocks
