"""``pgcast demo`` (what `make demo` runs) stops cleanly on Ctrl-C, and ``pgcast
demo --terminal`` cleans up on SIGTERM: the temporary embedded
server (found by the postmaster's pid) is stopped and its directory deleted."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

PG_VARIABLES = (
    "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE", "DATABASE_URL",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PG_VARIABLES}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_demo_terminal_cleans_up_on_sigterm(tmp_path: Path) -> None:
    env = clean_env(TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgcast", "demo", "--terminal"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: [lines.put(x) for x in out], daemon=True).start()
    try:
        while True:
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                pytest.fail("the demo did not start listening within 60 s")
            if line.startswith("listening:"):
                break
        datadirs = [p for p in tmp_path.glob("pgcast-*") if (p / "postmaster.pid").exists()]
        assert len(datadirs) == 1, list(tmp_path.iterdir())
        postmaster = int((datadirs[0] / "postmaster.pid").read_text().split()[0])
        assert _alive(postmaster)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert not datadirs[0].exists(), "the temporary data directory was left behind"
    assert not _alive(postmaster), f"the demo's server (pid {postmaster}) is still running"
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err, err
    proc.stderr.close()
    out.close()


def test_the_demo_suggests_a_pgcast_command_that_runs_from_a_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: make demo's pgcast lives in .venv-demo/bin, not on PATH: the
    printed command names it by its path; on PATH it is plain pgcast."""
    from pgcast.cli.gateway import pgcast_command

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "pgcast"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "demo"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert pgcast_command() == str(script.resolve())
    monkeypatch.setenv("PATH", str(bin_dir))
    assert pgcast_command() == "pgcast"
    monkeypatch.setattr(sys, "argv", ["-m"])  # python -m pgcast, nothing on PATH
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert pgcast_command().endswith(" -m pgcast")


def test_make_demo_serves_the_page_and_ctrl_c_leaves_nothing_behind(tmp_path: Path) -> None:
    """What `make demo` runs (`pgcast demo`, no DSN: a temporary embedded
    server): it says where to go, serves the page there, and Ctrl-C (SIGINT to
    the terminal's whole process group, the server's processes included)
    stops it with exit 0, no traceback, no server and no data directory left."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_env(TMPDIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgcast", "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # its own process group, as a terminal's job is
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 90
        while True:
            try:
                page = httpx.get(url, trust_env=False, timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "pgcast demo exited before serving"
                assert time.monotonic() < deadline, "pgcast demo did not serve within 90 s"
                time.sleep(0.2)
        assert page.status_code == 200 and "NOTIFY data" in page.text
        datadirs = [p for p in tmp_path.glob("pgcast-*") if (p / "postmaster.pid").exists()]
        assert len(datadirs) == 1, list(tmp_path.iterdir())
        postmaster = int((datadirs[0] / "postmaster.pid").read_text().split()[0])
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, (out, err)
    assert f"pgcast demo: open {url}" in out and "Ctrl-C to stop." in out, out
    assert "Traceback" not in err, err
    assert not datadirs[0].exists(), "the temporary data directory was left behind"
    deadline = time.monotonic() + 10
    while _alive(postmaster):
        assert time.monotonic() < deadline, f"the demo's server (pid {postmaster}) still runs"
        time.sleep(0.1)
