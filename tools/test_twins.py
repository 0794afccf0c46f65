#!/usr/bin/env python3
"""List the tests of one flavour without a twin in the other.

Every behaviour is tested in both flavours: a test ``test_NAME`` in a sync
file (``tests/test_client.py``) has a twin of the same name in the asyncio
file (``tests/test_aio.py``), and the reverse. Names are compared after
dropping the words that name a flavour (``async``, ``aio``, ``sync``).

Tests of a mechanism only one flavour has are listed, with the reason, in
:data:`ONE_FLAVOUR`. The gaps known when this check came in are listed in
``tests/twins_missing.txt`` (``file::test`` a line): they are the backlog.
The script fails when a gap appears that is not listed, and says which
listed gaps are closed (remove them from the list).

Usage::

    python tools/test_twins.py            # the check (make test)
    python tools/test_twins.py --list     # every gap, listed or not
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
KNOWN = TESTS / "twins_missing.txt"

#: (sync file, asyncio file)
PAIRS: list[tuple[str, str]] = [
    ("test_client.py", "test_aio.py"),
    ("test_reconnect.py", "test_aio_reconnect.py"),
    ("test_durable.py", "test_aio_durable.py"),
    ("test_manager.py", "test_aio_manager.py"),
    ("test_supervisor.py", "test_aio_supervisor.py"),
    ("test_pubsub.py", "test_aio_pubsub.py"),
    ("test_worker_loop.py", "test_aio_worker_loop.py"),
    ("test_wire.py", "test_aio_wire.py"),
    ("test_receive.py", "test_aio_receive.py"),
    ("test_gaps.py", "test_aio_gaps.py"),
]

#: Tests of a mechanism only one flavour has, so no twin can exist: each with
#: the reason. Not the backlog (tests/twins_missing.txt): a design decision,
#: to be kept short; a behaviour both flavours have never belongs here.
ONE_FLAVOUR: dict[str, str] = {
    "test_aio_worker_loop.py::test_worker_cancelled_hands_what_it_received_to_on_error": (
        "cancelling the task that runs the worker; a thread cannot be cancelled (the "
        "sync worker's KeyboardInterrupt takes the same path, but only the main thread "
        "gets one)"
    ),
    "test_aio_manager.py::test_a_reader_does_not_spin_while_the_loop_body_awaits": (
        "the event loop's reader callbacks (loop.add_reader) fire while the loop body "
        "awaits; the sync manager has no callbacks: nothing runs between two next() calls"
    ),
}

_FLAVOUR_WORDS = re.compile(r"(?:^|_)(?:async|aio|sync|asyncio)(?=_|$)")


def tests_of(path: Path) -> dict[str, str]:
    """The test functions of *path*, by their name without flavour words."""
    if not path.exists():
        return {}
    tree = ast.parse(path.read_text(), filename=str(path))
    out = {}
    for node in _statements(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "test_"
        ):
            out[_FLAVOUR_WORDS.sub("", node.name[5:]).strip("_")] = node.name
    return out


def _statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements of a module, those of its ``if`` blocks included (a
    test of one flavour sits in an ``if True:  # ASYNC`` block, which the
    generated file leaves out)."""
    out = []
    for node in body:
        if isinstance(node, ast.If):
            out += _statements(node.body + node.orelse)
        else:
            out.append(node)
    return out


def gaps() -> list[str]:
    """``file::test`` for every test whose twin is missing."""
    found = []
    for sync_name, async_name in PAIRS:
        sync, asyncio_ = tests_of(TESTS / sync_name), tests_of(TESTS / async_name)
        found += [f"{sync_name}::{sync[k]}" for k in sorted(sync.keys() - asyncio_.keys())]
        found += [f"{async_name}::{asyncio_[k]}" for k in sorted(asyncio_.keys() - sync.keys())]
    return [g for g in found if g not in ONE_FLAVOUR]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every gap")
    args = parser.parse_args(argv)
    now = gaps()
    if args.list:
        print("\n".join(now))
        return 0
    known = {
        line.strip() for line in KNOWN.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    new = [g for g in now if g not in known]
    closed = sorted(known - set(now))
    if closed:
        print("twins now written (remove from tests/twins_missing.txt):", *closed, sep="\n  ")
    if new:
        print(
            "tests without a twin in the other flavour (write the twin):", *new, sep="\n  ",
            file=sys.stderr,
        )
        return 1
    print(f"test twins: {len(now)} known gaps left (tests/twins_missing.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
