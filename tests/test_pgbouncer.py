"""LISTEN through a real PgBouncer: what issue 4's self-diagnosis catches.

A PgBouncer (Debian's, ``make pgbouncer``; skipped when absent) is started
per test in front of the test server, with ``pool_mode = transaction`` or
``session``. What these tests establish:

* transaction pooling where the LISTEN and the check after it land on
  different server sessions (``server_round_robin = 1`` and two idle server
  sessions: what a busy pool does): the sync and asyncio ``listen`` raise
  :class:`pgcast.ListenNotEffectiveError` naming the pooler, and
  ``pgcast doctor`` fails its listen check;
* transaction pooling in PgBouncer's default order (it hands back the server
  session released last, so one client on an idle pool always gets the same
  one): ``pg_listening_channels()`` in a later statement *does* list the
  channel, yet a NOTIFY from another session is dropped by PgBouncer
  (``got packet 'A' from server when not linked``). ``pgcast doctor`` and
  the sync and asyncio ``listen`` (also when LISTENing again after a
  reconnect) catch it by asking a second connection, once they saw the pid
  given at login is not ``pg_backend_pid()`` (a pooler answered the login);
  the failed LISTEN is undone on the server session the pool hands back;
* psycopg's prepared statements (after 5 runs of a query) fail on another
  server session: a PubSub that finds a pooler stops preparing, so
  publishing through transaction pooling works with the defaults;
* session pooling, the control: listen works, a notification arrives,
  ``ignore_own`` recognises the PubSub's own notifications (its
  ``backend_pid`` is PostgreSQL's, not the made-up one), and ``pgcast
  doctor`` passes (and says a pooler is in between).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgcast
import pgcast.aio
from _eventwait import arun, collect
from pgcast import diagnostics
from pgcast.cli import main

#: Bounds every wait on PgBouncer: starting, stopping, a line in its log.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
LOG_TIMEOUT = 10.0
#: PgBouncer logs this when a server session that no client holds sends a
#: notification: the notification is dropped.
DROPPED = "got packet 'A' from server when not linked"


def _binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _quote(value: str) -> str:
    """A value of a PgBouncer connection string (libpq's quoting)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Bouncer:
    """A running PgBouncer in front of the test server."""

    dsn: str
    """Where clients connect: database ``pgcast`` on PgBouncer."""
    admin_dsn: str
    """PgBouncer's admin console (``SHOW POOLS``)."""
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Everything PgBouncer logged so far."""
        return self.log_path.read_text(errors="replace")

    def pool(self) -> dict[str, Any]:
        """``SHOW POOLS``' row for the test database."""
        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10) as admin:
            cur = admin.execute("SHOW POOLS")
            names = [d.name for d in cur.description or ()]
            for row in cur.fetchall():
                pool = dict(zip(names, row, strict=True))
                if pool["database"] == "pgcast":
                    return pool
        raise AssertionError(f"PgBouncer has no pool for database 'pgcast':\n{self.log()}")

    def warm(self, sessions: int) -> None:
        """Leave *sessions* idle server sessions in the pool, by holding as
        many transactions open at once and committing them."""
        holders = [psycopg.connect(self.dsn, connect_timeout=10) for _ in range(sessions)]
        try:
            pids = set()
            for holder in holders:
                row = holder.execute("SELECT pg_backend_pid()").fetchone()
                assert row is not None
                pids.add(row[0])
            for holder in holders:
                holder.commit()
        finally:
            for holder in holders:
                holder.close()
        assert len(pids) == sessions, f"{sessions} transactions at once shared a session"
        idle = self.pool()["sv_idle"]
        assert idle >= sessions, f"{idle} idle server sessions, not {sessions}:\n{self.log()}"

    def wait_for_log(self, text: str) -> None:
        """Wait until PgBouncer logs *text*; fail after :data:`LOG_TIMEOUT` s."""
        deadline = time.monotonic() + LOG_TIMEOUT
        while text not in self.log():
            if time.monotonic() > deadline:
                pytest.fail(f"PgBouncer did not log {text!r} in {LOG_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.02)


StartBouncer = Callable[..., Bouncer]


@pytest.fixture
def start_bouncer(dsn: str) -> Iterator[StartBouncer]:
    """``start_bouncer(pool_mode, **settings)``: a PgBouncer in front of the
    test server (the embedded one, or PGCAST_TEST_DSN's host and port), with
    trust authentication, on a free loopback port; stopped after the test."""
    binary = _binary()
    if binary is None:
        pytest.skip("pgbouncer is not installed (`make pgbouncer` installs Debian's)")
    with psycopg.connect(dsn, connect_timeout=10) as probe:
        target = probe.info
        upstream = {
            "host": target.host,
            "port": str(target.port),
            "dbname": target.dbname,
            "user": target.user,
        }
        if target.password:
            upstream["password"] = target.password
    user = upstream["user"]
    # PgBouncer refuses to run as root: then it runs as the account the
    # embedded server runs as (created if need be).
    account = None
    if os.geteuid() == 0:
        from pgcast.embedded._process import system_account

        account = system_account()
    started: list[Bouncer] = []
    workdir = Path(tempfile.mkdtemp(prefix="pgcast-pgbouncer-"))

    def start(pool_mode: str, **settings: object) -> Bouncer:
        here = workdir / str(len(started))
        here.mkdir()
        (here / "users.txt").write_text(f'"{user}" ""\n')
        connstr = " ".join(f"{key}={_quote(value)}" for key, value in upstream.items())
        lines = [
            "[databases]",
            f"pgcast = {connstr}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            "listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {here / 'users.txt'}",
            f"admin_users = {user}",
            f"pool_mode = {pool_mode}",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        log_path = here / "pgbouncer.log"
        # A port taken between choosing and binding it: try another.
        for _attempt in range(3):
            port = _free_port()
            ini = here / "pgbouncer.ini"
            ini.write_text("\n".join(lines).replace("{port}", str(port)) + "\n")
            if account is not None:
                for path in (workdir, here, here / "users.txt", ini):
                    os.chown(path, account.pw_uid, account.pw_gid)
            kwargs: dict[str, Any] = {}
            if account is not None:
                kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
            with log_path.open("ab") as log:
                process = subprocess.Popen(
                    [binary, str(ini)], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, cwd=here, **kwargs,
                )
            bouncer = Bouncer(
                dsn=f"postgresql://{user}@127.0.0.1:{port}/pgcast",
                admin_dsn=f"postgresql://{user}@127.0.0.1:{port}/pgbouncer",
                process=process,
                log_path=log_path,
            )
            started.append(bouncer)
            if _wait_accepting(process, port):
                return bouncer
            if "Address already in use" not in bouncer.log():
                break
        pytest.fail(f"PgBouncer did not start accepting connections in {START_TIMEOUT} s "
                    f"(exit status {process.poll()}):\n{log_path.read_text(errors='replace')}")

    try:
        yield start
    finally:
        for bouncer in started:
            _stop(bouncer.process)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_accepting(process: subprocess.Popen[bytes], port: int) -> bool:
    """Wait until PgBouncer accepts TCP connections; False if it exited or
    did not within :data:`START_TIMEOUT` s. (A TCP connection, not a login: a
    login would open a server session and change the pool under test.)"""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            time.sleep(0.02)
        else:
            return True
    _stop(process)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # PgBouncer's fast shutdown
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


def _round_robin(start_bouncer: StartBouncer) -> Bouncer:
    """Transaction pooling where consecutive statements of one client run on
    different server sessions, as in a busy pool: PgBouncer takes the idle
    session released longest ago, and there are two."""
    bouncer = start_bouncer("transaction", server_round_robin=1)
    bouncer.warm(2)
    return bouncer


def _first_event_ignoring_own(ps: pgcast.PubSub) -> pgcast.Event:
    """The first event of ``events(ignore_own=True)``, or fail after 10 s."""
    deadline = time.monotonic() + 10.0
    for event in ps.events(select_timeout=0.05, yield_timeouts=True, ignore_own=True):
        if isinstance(event, pgcast.Event):
            return event
        if time.monotonic() > deadline:
            break
    pytest.fail("no event within 10 s")


# -- pure ---------------------------------------------------------------------------


def test_check_not_shared() -> None:
    diagnostics.check_not_shared({"a"}, ["b"])
    diagnostics.check_not_shared({"a"}, [])
    with pytest.raises(pgcast.ListenNotEffectiveError) as info:
        diagnostics.check_not_shared({"a", "c"}, ["a", "b"])
    assert info.value.missing == {"a"}
    assert "another connection's server session lists 'a'" in str(info.value)
    assert "pool_mode=transaction" in str(info.value)


def test_check_listening_leaves_the_probe_channel_out() -> None:
    probe = "pgcast.probe.4242"
    with pytest.raises(pgcast.ListenNotEffectiveError) as info:
        diagnostics.check_listening({"a", probe}, [])
    assert info.value.missing == {"a"}
    assert "pgcast.probe" not in str(info.value)
    with pytest.raises(pgcast.ListenNotEffectiveError) as info:
        diagnostics.check_listening({"a", probe}, ["a"])  # the probe alone: still caught
    assert info.value.missing == frozenset()
    assert "does not list the health check's channel" in str(info.value)


def test_check_pinned() -> None:
    probe = "pgcast.probe.4242"
    diagnostics.check_pinned({"a", probe}, ["b"])
    diagnostics.check_pinned({"a"}, [])
    with pytest.raises(pgcast.ListenNotEffectiveError) as info:
        diagnostics.check_pinned({"a", "c", probe}, ["a", probe, "b"])
    assert info.value.missing == {"a"}
    message = str(info.value)
    assert message.startswith(
        "LISTEN through a connection pooler does not hold unless it pins one server "
        "session: use a session-mode pool or connect directly. "
    )
    assert "lists 'a', which this one listened to" in message
    assert "pgcast.probe" not in message
    error = diagnostics.unverified_pool({"a", probe}, pgcast.ConnectError("refused"))
    assert error.missing == {"a"}
    assert str(error).endswith("could not be checked: a second connection failed: refused")


# -- transaction pooling: the check after LISTEN runs on another session -----------


def test_listen_through_transaction_pooling_raises(
    start_bouncer: StartBouncer, unique_channel: str
) -> None:
    bouncer = _round_robin(start_bouncer)
    with pgcast.connect(bouncer.dsn) as ps:
        with pytest.raises(pgcast.ListenNotEffectiveError) as info:
            ps.listen(unique_channel)
        message = str(info.value)
        assert message.startswith("LISTEN did not take effect: pg_listening_channels()")
        assert repr(unique_channel) in message
        assert "connection pooler in transaction or statement mode" in message
        assert "PgBouncer pool_mode=transaction" in message
        assert "session-mode pool" in message
        # The health check's private channel, LISTENed alongside, is not
        # shown: the user did not name it.
        assert info.value.missing == {unique_channel}
        assert "pgcast.probe." not in message
        assert ps.listening_channels() == frozenset()


def test_asyncio_listen_through_transaction_pooling_raises(
    start_bouncer: StartBouncer, unique_channel: str
) -> None:
    bouncer = _round_robin(start_bouncer)

    async def body() -> None:
        async with await pgcast.aio.connect(bouncer.dsn) as aps:
            with pytest.raises(pgcast.ListenNotEffectiveError, match="pool_mode=transaction"):
                await aps.listen(unique_channel)
            assert aps.listening_channels() == frozenset()

    arun(body(), timeout=30)


def test_doctor_fails_through_transaction_pooling(
    start_bouncer: StartBouncer, capsys: pytest.CaptureFixture[str]
) -> None:
    bouncer = _round_robin(start_bouncer)
    assert main(["doctor", "--dsn", bouncer.dsn, "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert "  FAIL  listen" in out
    assert "LISTEN did not take effect" in out
    assert "PgBouncer pool_mode=transaction" in out
    assert "round trip" not in out  # not attempted once LISTEN failed
    assert "through a connection pooler or proxy" in out
    assert out.rstrip().endswith("result: problems found")


# -- transaction pooling in PgBouncer's default order: the same session comes back ---


def test_doctor_catches_a_pool_that_hands_the_same_session_back(
    start_bouncer: StartBouncer, dsn: str, unique_channel: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bouncer = start_bouncer("transaction")
    bouncer.warm(2)  # even with another idle session, the last one comes back
    with psycopg.connect(bouncer.dsn, autocommit=True, connect_timeout=10) as via:
        via.execute(f'LISTEN "{unique_channel}"')
        row = via.execute(diagnostics.VERIFY_SQL).fetchone()
        diagnostics.check_session([unique_channel], row)  # blind: it passes
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as direct:
            direct.execute("SELECT pg_notify(%s, 'lost')", (unique_channel,))
        bouncer.wait_for_log(DROPPED)
        assert list(via.notifies(timeout=0.2)) == []
        via.execute(f'UNLISTEN "{unique_channel}"')

    assert main(["doctor", "--dsn", bouncer.dsn, "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert "  FAIL  listen" in out
    assert "another connection's server session lists 'pgcast.doctor." in out
    assert "PgBouncer pool_mode=transaction" in out
    assert out.rstrip().endswith("result: problems found")


NOT_PINNED = (
    "LISTEN through a connection pooler does not hold unless it pins one server "
    "session: use a session-mode pool or connect directly"
)


def test_listen_through_a_pool_that_hands_the_same_session_back_raises(
    start_bouncer: StartBouncer, unique_channel: str
) -> None:
    bouncer = start_bouncer("transaction")
    with pgcast.connect(bouncer.dsn) as ps:
        with pytest.raises(pgcast.ListenNotEffectiveError) as info:
            ps.listen(unique_channel)
        message = str(info.value)
        assert message.startswith(NOT_PINNED), message
        assert f"second connection's server session lists {unique_channel!r}" in message
        assert "PgBouncer pool_mode=transaction" in message
        assert "pgcast.probe." not in message
        assert info.value.missing == {unique_channel}
        assert ps.listening_channels() == frozenset()
        # The LISTEN was undone where it landed: the session the pool hands
        # back (the only one) no longer listens to it, nor to the probe.
        with psycopg.connect(bouncer.dsn, autocommit=True, connect_timeout=10) as other:
            row = other.execute(diagnostics.SHARED_SQL).fetchone()
            assert row is not None
            assert not [c for c in row[0] if c == unique_channel or c.startswith("pgcast.")]


def test_asyncio_listen_through_a_pool_that_hands_the_same_session_back_raises(
    start_bouncer: StartBouncer, unique_channel: str
) -> None:
    bouncer = start_bouncer("transaction")

    async def body() -> None:
        async with await pgcast.aio.connect(bouncer.dsn) as aps:
            with pytest.raises(pgcast.ListenNotEffectiveError) as info:
                await aps.listen(unique_channel)
            assert str(info.value).startswith(NOT_PINNED)
            assert info.value.missing == {unique_channel}
            assert aps.listening_channels() == frozenset()

    arun(body(), timeout=30)


def test_relisten_after_reconnect_through_such_a_pool_raises(
    start_bouncer: StartBouncer, unique_channel: str
) -> None:
    """The check is made again on every new connection: a reconnect that
    lands on a transaction pool fails instead of listening deaf."""
    session = start_bouncer("session")
    transaction = start_bouncer("transaction")

    def connector() -> psycopg.Connection[Any]:
        return psycopg.connect(transaction.dsn, autocommit=True, connect_timeout=10)

    ps = pgcast.PubSub(psycopg.connect(session.dsn, autocommit=True, connect_timeout=10),
                       connector=connector)
    with ps:
        ps.listen(unique_channel)
        assert ps._core.pooled and ps._core.pinned
        with pytest.raises(pgcast.ListenNotEffectiveError, match="does not hold unless"):
            ps.reconnect()


def test_a_pooler_is_detected_and_direct_connections_are_not(
    start_bouncer: StartBouncer, dsn: str
) -> None:
    bouncer = start_bouncer("session")
    with pgcast.connect(bouncer.dsn) as ps:
        assert ps.connection.info.backend_pid != ps.backend_pid  # the login's is made up
        assert ps.backend_pid > 0
        assert ps.connection.prepare_threshold is None
        assert ps._core.probe == f"pgcast.probe.{ps.backend_pid}"
    with pgcast.connect(dsn) as ps:
        assert ps.connection.info.backend_pid == ps.backend_pid
        assert ps.connection.prepare_threshold == 5  # psycopg's default, kept

    async def body() -> None:
        async with await pgcast.aio.connect(bouncer.dsn) as aps:
            assert aps.connection.info.backend_pid != aps.backend_pid
            assert aps.connection.prepare_threshold is None
        # Built on a connection directly: identified at its first command.
        conn = await psycopg.AsyncConnection.connect(bouncer.dsn, autocommit=True,
                                                     connect_timeout=10)
        async with pgcast.aio.AsyncPubSub(conn) as aps:
            await aps.notify("pgcast_test_pgbouncer_publish", "x")
            assert conn.info.backend_pid != aps.backend_pid
            assert conn.prepare_threshold is None

    arun(body(), timeout=30)


# -- prepared statements under transaction pooling -----------------------------------


def test_publishing_through_transaction_pooling_with_prepare_threshold_none(
    start_bouncer: StartBouncer,
) -> None:
    bouncer = _round_robin(start_bouncer)
    with pgcast.connect(bouncer.dsn, prepare_threshold=None) as ps:
        for i in range(20):
            ps.notify("pgcast_test_pgbouncer_publish", str(i))


def test_publishing_through_transaction_pooling_with_the_defaults(
    start_bouncer: StartBouncer,
) -> None:
    # psycopg prepares a query on its sixth run; the next server session
    # would not know it ('prepared statement "_pg3_0" does not exist').
    bouncer = _round_robin(start_bouncer)
    with pgcast.connect(bouncer.dsn) as ps:
        for i in range(20):
            ps.notify("pgcast_test_pgbouncer_publish", str(i))
        ps.notify_many([("pgcast_test_pgbouncer_publish", str(i)) for i in range(3)])

    async def body() -> None:
        async with await pgcast.aio.connect(bouncer.dsn) as aps:
            for i in range(20):
                await aps.notify("pgcast_test_pgbouncer_publish", str(i))

    arun(body(), timeout=30)


# -- session pooling: the control ------------------------------------------------------


def test_listen_through_session_pooling_works(
    start_bouncer: StartBouncer, conn: psycopg.Connection[Any], unique_channel: str
) -> None:
    bouncer = start_bouncer("session", server_round_robin=1)
    with pgcast.connect(bouncer.dsn) as ps:
        ps.listen(unique_channel)
        assert ps.listening_channels() == {unique_channel}
        conn.execute("SELECT pg_notify(%s, 'through the pool')", (unique_channel,))
        [event] = collect(ps, 1)
        assert (event.channel, event.payload) == (unique_channel, "through the pool")
    assert DROPPED not in bouncer.log()


def test_doctor_passes_through_session_pooling(
    start_bouncer: StartBouncer, capsys: pytest.CaptureFixture[str]
) -> None:
    bouncer = start_bouncer("session")
    assert main(["doctor", "--dsn", bouncer.dsn, "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("  ok    listen ") for line in lines), out
    assert any(line.startswith("  ok    round trip ")
               and "a NOTIFY from another connection came back" in line for line in lines), out
    assert "through a connection pooler or proxy" in out
    assert out.rstrip().endswith("result: ok")


def test_ignore_own_through_session_pooling(
    start_bouncer: StartBouncer, conn: psycopg.Connection[Any], unique_channel: str
) -> None:
    bouncer = start_bouncer("session")
    with pgcast.connect(bouncer.dsn) as ps:
        ps.listen(unique_channel)
        ps.notify(unique_channel, "own")
        conn.execute("SELECT pg_notify(%s, 'other')", (unique_channel,))
        event = _first_event_ignoring_own(ps)
        assert event.payload == "other", f"own notification delivered: {event}"

