"""``pgcast serve`` behind a load balancer: TLS, the access log on and off,
the log level, and its usage errors (issue 10's operations). Real server
processes on 127.0.0.1, stopped by pid; every wait bounded."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from test_gateway_server import free_port, run, subscribe, ws_connect

START_TIMEOUT = 30.0
#: The pid and, once it ended, the exit code of the ``pgcast serve`` on a port.
_PIDS: dict[int, int] = {}
_CODES: dict[int, int] = {}


def proc_pid(port: int) -> int:
    """The pid of the ``pgcast serve`` process serving *port*."""
    return _PIDS[port]


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


@contextmanager
def serve(dsn: str, *args: str, scheme: str = "http", allow: str | None = "ops_*",
          verify: ssl.SSLContext | bool = True,
          nofile: tuple[int, int] | None = None) -> Iterator[tuple[int, list[str]]]:
    """A ``pgcast serve`` process; yields its port and, once it stopped
    (SIGTERM, then SIGKILL after 30 s), its output (its exit code: ``_CODES``).
    *nofile*: the (soft, hard) open-file limit it starts with."""
    port = free_port()
    allowed = ["--allow", allow] if allow else []
    command = [sys.executable, "-m", "pgcast.cli", "serve", "--dsn", dsn, "--port", str(port),
               *allowed, *args]
    if nofile is not None:  # set in a first interpreter that then becomes pgcast serve
        command = [sys.executable, "-c",
                   "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
                   f"{nofile!r}); os.execv(sys.executable, sys.argv[1:])", *command]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    _PIDS[port] = proc.pid
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if httpx.get(f"{scheme}://127.0.0.1:{port}/healthz", trust_env=False,
                             timeout=1, verify=verify).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "pgcast serve did not start"
            time.sleep(0.1)
        yield port, output
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=10)
        output.append(out)
        _CODES[port] = proc.returncode


def test_tls_serves_https_and_wss(dsn: str, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    with serve(dsn, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
               scheme="https", verify=context) as (port, output):
        async def main() -> None:
            async with ws_connect(f"wss://127.0.0.1:{port}/ws", ssl=context) as ws:
                await subscribe(ws, "ops_tls")

        run(main())
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False, timeout=2)
    assert f"https://127.0.0.1:{port}/" in output[0]


def test_access_log_on_and_off(dsn: str) -> None:
    with serve(dsn) as (port, on):
        httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=5)
    with serve(dsn, "--no-access-log", "--log-level", "warning") as (port, off):
        httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=5)
    assert '"GET /metrics HTTP/1.1" 200' in on[0]
    assert "GET /metrics" not in off[0] and "Application startup" not in off[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ssl-certfile", "/nonexistent.pem"], "needs both"),
        (["--ssl-certfile", "/nonexistent.pem", "--ssl-keyfile", "/nonexistent.key"],
         "cannot read /nonexistent.pem"),
        (["--log-level", "loud"], "invalid choice"),
    ],
)
def test_operations_usage_errors(dsn: str, args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pgcast.cli", "serve", "--dsn", dsn, "--allow", "x", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_workers_share_the_port_and_each_listens(dsn: str) -> None:
    from pgcast.cli._workers import worker_argv

    assert worker_argv(["serve", "--workers", "3", "--port", "1"]) == [
        "serve", "--port", "1", "--reuse-port"]
    assert worker_argv(["serve", "--workers=3"]) == ["serve", "--reuse-port"]
    with serve(dsn, "--workers", "2") as (port, output):
        pids = set()
        for _ in range(60):  # a new connection each: the kernel spreads them
            r = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=5,
                          headers={"Connection": "close"})
            for line in r.text.splitlines():
                if line.startswith("pgcast_gateway_worker_pid "):
                    pids.add(int(float(line.split()[1])))
            if len(pids) == 2:
                break
        assert len(pids) == 2, pids

        async def main() -> None:
            import asyncio
            import json

            import psycopg
            from websockets.exceptions import ConnectionClosed

            clients = [await ws_connect(f"ws://127.0.0.1:{port}/ws").__aenter__()
                       for _ in range(12)]
            try:
                for ws in clients:
                    await subscribe(ws, "ops_workers")
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
                    await c.execute("NOTIFY ops_workers, 'to all'")
                for ws in clients:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert frame["payload"] == "to all"
                os.kill(proc_pid(port), signal.SIGTERM)
                for ws in clients:
                    with pytest.raises(ConnectionClosed) as closed:
                        await asyncio.wait_for(ws.recv(), 20)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            finally:
                for ws in clients:
                    await ws.close()

        run(main())
    assert "2 workers" in output[0]


def test_serve_raises_the_descriptor_limit_and_says_when_it_allows_fewer_clients(
    dsn: str,
) -> None:
    """Issue 10: each client is a socket. pgcast serve raises the soft
    open-file limit to the hard one, and names the limit when it allows fewer
    clients than --max-clients (default 50,000)."""
    low_soft, low_hard = (256, 4096), (256, 256)
    with serve(dsn, nofile=low_soft) as (_port, output):
        pass
    text = "".join(output)
    # Raised from 256 to 4096, which is still under 50,000: said, with the limit.
    assert "the open-file limit is 4096" in text and "--max-clients 50000" in text, text
    with serve(dsn, "--max-clients", "1000", nofile=low_hard) as (_port, output):
        pass
    text = "".join(output)
    assert "the open-file limit is 256" in text and "--max-clients 1000" in text, text
    with serve(dsn, "--max-clients", "100", nofile=low_soft) as (_port, output):
        pass
    assert "open-file limit" not in "".join(output)  # 4096 is enough for 100
