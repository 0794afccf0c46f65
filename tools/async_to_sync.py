#!/usr/bin/env python3
"""Generate pgcast's sync modules from their asyncio sources.

The asyncio drivers are the only hand-written ones; each sync twin is made
from its source by an AST transform (psycopg 3's way, see its
``tools/async_to_sync.py``):

* ``async def`` / ``async for`` / ``async with`` (and ``async for`` in a
  comprehension) lose ``async``, ``await x``
  becomes ``x``; ``Awaitable[T]`` and ``Coroutine[..., T]`` become ``T``;
* names are renamed by :data:`NAMES` (``AsyncPubSub`` -> ``PubSub``,
  ``AsyncIterator`` -> ``Iterator``, the ``*_async`` modules -> their twins),
  in code, in strings that are exactly such a name, and as words in docstrings;
* ``if True:  # ASYNC`` blocks, where the flavours must differ, keep only
  their ``else:`` part;
* what differs at the bottom (waiting, locks, sleeping, threads or tasks)
  is imported from ``pgcast._flavour_async``, renamed to ``pgcast._flavour``:
  those two are hand-written, each with a docstring saying why.

The result is tidied by ruff (imports sorted, imports left unused removed,
formatted) and starts with a comment naming its source.

Usage::

    python tools/async_to_sync.py            # write the generated files
    python tools/async_to_sync.py --check    # fail if one differs (make test)
"""

from __future__ import annotations

import argparse
import ast
import itertools
import re
import subprocess
import sys
from pathlib import Path

import ast_comments

ROOT = Path(__file__).resolve().parent.parent

#: (hand-written asyncio source, generated sync twin), relative to ROOT.
FILES: list[tuple[str, str]] = [
    ("src/pgcast/client/_identify_async.py", "src/pgcast/client/_identify.py"),
    ("src/pgcast/client/_session_async.py", "src/pgcast/client/_session.py"),
    ("src/pgcast/client/_durable_session_async.py", "src/pgcast/client/_durable_session.py"),
    ("src/pgcast/client/_supervised_async.py", "src/pgcast/client/_supervised.py"),
    ("src/pgcast/client/_pubsub_async.py", "src/pgcast/client/_pubsub.py"),
    ("src/pgcast/client/_open_async.py", "src/pgcast/client/_open.py"),
    ("src/pgcast/manager/_manager_async.py", "src/pgcast/manager/_manager.py"),
    ("src/pgcast/publisher/_publisher_async.py", "src/pgcast/publisher/_publisher.py"),
    ("src/pgcast/feeds/_worker_async.py", "src/pgcast/feeds/_worker.py"),
    ("src/pgcast/durable/_run_async.py", "src/pgcast/durable/_run.py"),
    # tests written once
    ("tests/test_aio_supervisor.py", "tests/test_supervisor.py"),
    ("tests/test_aio_pubsub.py", "tests/test_pubsub.py"),
    ("tests/test_aio_worker_loop.py", "tests/test_worker_loop.py"),
    ("tests/test_aio_durable.py", "tests/test_durable.py"),
    ("tests/test_aio_reconnect.py", "tests/test_reconnect.py"),
    ("tests/test_aio_wire.py", "tests/test_wire.py"),
    ("tests/test_aio_receive.py", "tests/test_receive.py"),
    ("tests/test_aio.py", "tests/test_client.py"),
    ("tests/test_aio_gaps.py", "tests/test_gaps.py"),
    ("tests/test_aio_manager.py", "tests/test_manager.py"),
]

#: Names of the asyncio flavour and their sync namesakes.
NAMES: dict[str, str] = {
    "AsyncClosing": "Closing",
    "AsyncConnection": "Connection",
    "AsyncIterator": "Iterator",
    "AsyncIterable": "Iterable",
    "AsyncGenerator": "Generator",
    "AsyncPubSub": "PubSub",
    "AsyncReconnectHook": "ReconnectHook",
    "AsyncSession": "Session",
    "AsyncIdentified": "Identified",
    "AsyncDurableSession": "DurableSession",
    "AsyncSupervised": "Supervised",
    "AsyncNotificationManager": "NotificationManager",
    "AsyncPublisher": "Publisher",
    "AsyncWorker": "Worker",
    "AsyncExitStack": "ExitStack",
    "enter_async_context": "enter_context",
    "StopAsyncIteration": "StopIteration",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "__aiter__": "__iter__",
    "__anext__": "__next__",
    "aclose": "close",
    "aiter": "iter",
    "anext": "next",
    "asynccontextmanager": "contextmanager",
    # test helpers (tests/_eventwait.py)
    "acollect": "collect",
    "acollect_until": "collect_until",
    "arun": "run_sync",
    "astart": "start_thread",
    "ajoin": "join_thread",
    "apause": "pause",
    "auntil": "until",  # tests/_faults.py
    # modules
    "_flavour_async": "_flavour",
    "_pubsub_async": "_pubsub",
    "_session_async": "_session",
    "_identify_async": "_identify",
    "_durable_session_async": "_durable_session",
    "_supervised_async": "_supervised",
    "_open_async": "_open",
    "_manager_async": "_manager",
    "_publisher_async": "_publisher",
    "_worker_async": "_worker",
    "_run_async": "_run",
}

#: Generic types whose last parameter is what a sync call returns.
UNWRAP = {"Awaitable", "Coroutine"}

_WORD = re.compile(r"\b(" + "|".join(re.escape(n) for n in NAMES if n[0].isupper()) + r")\b")


def header(source: str) -> str:
    """The comment a generated file starts with."""
    return (
        f"# Generated from {source} by tools/async_to_sync.py: do not edit.\n"
        "# Edit the source, then run `python tools/async_to_sync.py`.\n"
    )


#: Strings the source splits over lines come out joined: a generated file
#: with lines longer than ruff's limit says so in its header.
LONG_LINES = "# ruff: noqa: E501\n"
LINE_LENGTH = 100


def _is_async_marker(node: ast.If) -> bool:
    """``if True:  # ASYNC`` (ast_comments puts the comment first in the body)."""
    test = node.test
    first = node.body[0] if node.body else None
    return (
        isinstance(test, ast.Constant)
        and test.value is True
        and isinstance(first, ast_comments.Comment)
        and first.value.strip() == "# ASYNC"
    )


class AsyncToSync(ast.NodeTransformer):
    """Drop ``async``/``await`` and the asyncio side of ``# ASYNC`` blocks."""

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        new = ast.FunctionDef(
            name=node.name,
            args=node.args,
            body=node.body,
            decorator_list=node.decorator_list,
            returns=node.returns,
            type_comment=node.type_comment,
            type_params=getattr(node, "type_params", []),
        )
        ast.copy_location(new, node)
        return self.generic_visit(new)

    def visit_AsyncFor(self, node: ast.AsyncFor) -> ast.AST:
        new = ast.For(target=node.target, iter=node.iter, body=node.body, orelse=node.orelse)
        ast.copy_location(new, node)
        return self.generic_visit(new)

    def visit_AsyncWith(self, node: ast.AsyncWith) -> ast.AST:
        new = ast.With(items=node.items, body=node.body)
        ast.copy_location(new, node)
        return self.generic_visit(new)

    def visit_comprehension(self, node: ast.comprehension) -> ast.AST:
        node.is_async = 0  # [x async for x in it] -> [x for x in it]
        return self.generic_visit(node)

    def visit_Await(self, node: ast.Await) -> ast.AST:
        return self.visit(node.value)

    def visit_If(self, node: ast.If) -> ast.AST | list[ast.stmt]:
        if _is_async_marker(node):
            if not node.orelse:
                return []
            return [self.visit(child) for child in node.orelse]
        return self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        value = node.value
        name = value.id if isinstance(value, ast.Name) else getattr(value, "attr", None)
        if name in UNWRAP:
            inner = node.slice
            if isinstance(inner, ast.Tuple):
                inner = inner.elts[-1]
            return self.visit(inner)
        return self.generic_visit(node)


class Blanks(ast.NodeTransformer):
    """Keep a blank line where the source has some between two statements
    (ruff's formatter adds those around definitions, not between others)."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                setattr(node, field, self._spaced(stmts))
        return super().generic_visit(node)

    @staticmethod
    def _spaced(stmts: list[ast.stmt]) -> list[ast.stmt]:
        out = [stmts[0]]
        for before, after in itertools.pairwise(stmts):
            end = getattr(before, "end_lineno", None)
            start = getattr(after, "lineno", None)
            if end is not None and start is not None and start - end > 1:
                out.append(ast_comments.Comment(value="", inline=False))
            out.append(after)
        return out


class Rename(ast.NodeTransformer):
    """Rename the asyncio names to their sync namesakes (see :data:`NAMES`)."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        node.id = NAMES.get(node.id, node.id)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        node.attr = NAMES.get(node.attr, node.attr)
        inner = node.value
        if (
            isinstance(inner, ast.Attribute)
            and inner.attr == "aio"
            and isinstance(inner.value, ast.Name)
            and inner.value.id == "pgcast"
        ):
            node.value = inner.value  # pgcast.aio.connect -> pgcast.connect
        return self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.name = NAMES.get(node.name, node.name)
        self._docstring(node)
        return self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        node.name = NAMES.get(node.name, node.name)
        self._docstring(node)
        return self.generic_visit(node)

    def visit_Module(self, node: ast.Module) -> ast.AST:
        self._docstring(node)
        return self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        if node.module is not None:
            node.module = ".".join(NAMES.get(part, part) for part in node.module.split("."))
        for alias in node.names:
            alias.name = NAMES.get(alias.name, alias.name)
        return node

    def visit_Comment(self, node: ast_comments.Comment) -> ast.AST:
        node.value = _WORD.sub(lambda m: NAMES[m.group(1)], node.value)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str) and node.value in NAMES:
            node.value = NAMES[node.value]
        return node

    @staticmethod
    def _docstring(node: ast.Module | ast.ClassDef | ast.FunctionDef) -> None:
        body = [n for n in node.body if not isinstance(n, ast_comments.Comment)]
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            doc = body[0].value.value
            if isinstance(doc, str):
                body[0].value.value = _WORD.sub(lambda m: NAMES[m.group(1)], doc)


def _ruff() -> str:
    local = Path(sys.executable).parent / "ruff"
    return str(local) if local.exists() else "ruff"


def convert(source: str, target: str) -> str:
    """The text of *target*, generated from *source* (paths relative to ROOT)."""
    tree = ast_comments.parse((ROOT / source).read_text(), filename=source)
    tree = Blanks().visit(tree)
    tree = AsyncToSync().visit(tree)
    tree = Rename().visit(tree)
    ast.fix_missing_locations(tree)
    text = header(source) + ast_comments.unparse(tree) + "\n"
    # Tidy: imports sorted and those left unused dropped, nested withs that
    # were an async with inside a sync one merged, then formatted.
    ruff = _ruff()
    fix = [ruff, "check", "--quiet", "--fix-only", "--select", "I001,F401,SIM117", "--exit-zero"]
    for command in (
        [*fix, "--stdin-filename", str(ROOT / target), "-"],
        [ruff, "format", "--quiet", "--stdin-filename", str(ROOT / target), "-"],
    ):
        text = subprocess.run(
            command, input=text, capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout
    if any(len(line) > LINE_LENGTH for line in text.splitlines()):
        head = header(source)
        text = head + LONG_LINES + text.removeprefix(head)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; fail if a generated file differs"
    )
    args = parser.parse_args(argv)
    stale = []
    for source, target in FILES:
        text = convert(source, target)
        path = ROOT / target
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(target)
        else:
            path.write_text(text)
            print(f"wrote {target} (from {source})")
    if stale:
        print(
            "generated files differ from their asyncio source: "
            + ", ".join(stale)
            + "\nrun `python tools/async_to_sync.py` and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
