"""The public surface: what ``import pgcast`` promises (httpx's test_exported_members)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pgcast
import pgcast._errors
import pgcast.aio


def test_every_exported_name_exists_and_is_documented() -> None:
    for name in pgcast.__all__:
        obj = getattr(pgcast, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"pgcast.{name} has no docstring"


def test_every_public_error_is_exported_and_in_the_tree() -> None:
    for name in pgcast._errors.__all__:
        error = getattr(pgcast._errors, name)
        assert getattr(pgcast, name) is error, f"pgcast.{name} is not exported"
        assert issubclass(error, pgcast.PgcastError)
        assert name in (pgcast._errors.__doc__ or ""), f"{name} is missing from the drawn tree"


def test_public_names_are_not_private_modules() -> None:
    assert all(not name.startswith("_") or name == "__version__" for name in pgcast.__all__)
    assert "connect" in pgcast.aio.__all__ and "NotificationManager" in pgcast.aio.__all__


def test_feeds_keep_their_short_import_paths() -> None:
    """``pgcast.triggers``, ``pgcast.queue`` and ``pgcast.worker`` (the README's
    paths) are the feeds/ modules themselves, imported first thing in a fresh
    interpreter, each way the README and the examples import them."""
    code = (
        "import pgcast.worker, pgcast.queue, pgcast.triggers\n"
        "from pgcast.triggers import Change, watch_table\n"
        "from pgcast.queue import Job, Queue\n"
        "from pgcast.worker import Coalescer, Retry, Worker, WorkerThread\n"
        "import pgcast.feeds.triggers, pgcast.feeds.queue, pgcast.feeds.worker\n"
        "assert pgcast.triggers is pgcast.feeds.triggers\n"
        "assert pgcast.queue is pgcast.feeds.queue\n"
        "assert pgcast.worker is pgcast.feeds.worker\n"
        "assert pgcast.Worker is Worker and pgcast.watch_table is watch_table\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_the_version_is_written_once() -> None:
    """pyproject.toml reads the version from pgcast.__version__ (hatch's
    dynamic version); the installed metadata agrees, and it is in the changelog
    or still unreleased."""
    import importlib.metadata
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["hatch"]["version"]["path"] == "src/pgcast/__init__.py"
    assert importlib.metadata.version("pgcast") == pgcast.__version__
    assert f"## {pgcast.__version__}" in (root / "CHANGELOG.md").read_text()
    assert "MIT License" in (root / "LICENSE").read_text()
