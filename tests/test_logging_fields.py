"""Log records carry structured fields (``extra=``): a log pipeline that
keeps record attributes (JSON formatters, OpenTelemetry) can filter on them
without parsing the message.

* ``pid`` (a backend's process id) and ``channels`` on the client's
  connection-lost and reconnected records; ``attempt`` on failed attempts;
* ``channel`` and ``pid`` (the sender's) on a failing handler's record;
* ``client`` (``host:port``), ``close_code``, ``transport`` and ``channels``
  when the gateway closes a client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pgcast
import test_gateway_server
from pgcast.gateway import Access
from test_gateway_server import Gateway, recv, run, subscribe, ws_connect

#: The fixture that starts a gateway.
gateway = test_gateway_server.gateway

TIMEOUT = 10.0


def records(caplog: pytest.LogCaptureFixture, start: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(start)]


def wait_for_record(caplog: pytest.LogCaptureFixture, start: str) -> logging.LogRecord:
    deadline = time.monotonic() + TIMEOUT
    while not records(caplog, start):
        assert time.monotonic() < deadline, f"no log record starting {start!r}"
        time.sleep(0.02)
    return records(caplog, start)[0]


def test_reconnect_records_carry_the_pid_and_channels(
    dsn: str, unique_channel: str, conn: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pgcast")
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        old = ps.backend_pid
        conn.execute("SELECT pg_terminate_backend(%s)", (old,))
        for item in ps.wait(timeout=TIMEOUT):
            assert item is not None, "no Reconnected marker"
            if isinstance(item, pgcast.Reconnected):
                break
        new = ps.backend_pid
    lost = records(caplog, "pgcast: connection lost")
    back = records(caplog, "pgcast: reconnected")
    assert len(lost) == 1 and len(back) == 1
    assert lost[0].pid == old and lost[0].channels == [unique_channel]  # type: ignore[attr-defined]
    assert back[0].pid == new != old  # type: ignore[attr-defined]
    assert back[0].channels == [unique_channel]  # type: ignore[attr-defined]
    assert back[0].downtime >= 0  # type: ignore[attr-defined]


def test_a_failing_handler_record_names_the_channel_and_sender(
    dsn: str, unique_channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pgcast")

    def handler(event: pgcast.Event) -> None:
        raise RuntimeError("boom")

    with pgcast.connect(dsn) as ps, pgcast.connect(dsn) as sender:
        ps.subscribe(unique_channel, handler)
        runner = ps.run_in_thread()
        try:
            sender.notify(unique_channel, "x")
            record = wait_for_record(caplog, "pgcast handler failed")
        finally:
            runner.stop()
        pid = sender.backend_pid
    assert record.channel == unique_channel  # type: ignore[attr-defined]
    assert record.pid == pid  # type: ignore[attr-defined]
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])


def test_the_gateway_names_the_client_it_closes(
    gateway: Callable[..., Gateway], unique_channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgcast.gateway")

    def authorizer(connection: Any, token: str | None) -> Access:
        # Expires at once after the handshake: the gateway closes it (4001).
        return Access.globs(read=[unique_channel], expires=time.time() + 1.0)

    gw = gateway(authorizer=authorizer, allow=())

    async def main() -> tuple[str, int]:
        async with ws_connect(f"{gw.ws}?token=t") as ws:
            await subscribe(ws, unique_channel)
            host, port = ws.local_address[:2]
            for _ in range(5):  # the close comes within a second or so
                try:
                    await recv(ws)
                except Exception:
                    break
            assert ws.close_code == 4001, ws.close_code
            return host, port

    host, port = run(main())
    record = wait_for_record(caplog, "pgcast gateway: closing client")
    assert record.client == f"{host}:{port}"  # type: ignore[attr-defined]
    assert record.close_code == 4001  # type: ignore[attr-defined]
    assert record.transport == "websocket"  # type: ignore[attr-defined]
    assert record.channels == [unique_channel]  # type: ignore[attr-defined]
