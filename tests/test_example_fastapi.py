"""The FastAPI example (examples/fastapi_app) served by uvicorn on loopback.

The example mounts the gateway and publishes from a route through
``realtime.gateway.publish()``; a WebSocket client of the mounted gateway,
and a plain pgcast listener in another session, receive what the route
published, and a NOTIFY from psql reaches the WebSocket client too. The
gateway starts and stops with the FastAPI application's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

import _serving
import pgcast

pytest.importorskip("fastapi")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app" / "app.py"
TIMEOUT = 10.0


def load_example(dsn: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example module, imported as uvicorn would, with ``PGCAST_DSN`` set."""
    monkeypatch.setenv("PGCAST_DSN", dsn)
    spec = importlib.util.spec_from_file_location(f"fastapi_example_{uuid.uuid4().hex}", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """*app* under uvicorn on a free loopback port, lifespan on: its host:port."""
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    with _serving.serving(lambda port: uvicorn.Server(config), TIMEOUT) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture
def served(dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, str]]:
    """The example's app, served: (module, host:port)."""
    module = load_example(dsn, monkeypatch)
    with serving(module.app) as host:
        yield module, host


async def recv(ws: ClientConnection) -> dict[str, Any]:
    try:
        text = await asyncio.wait_for(ws.recv(), TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"no frame within {TIMEOUT} s") from None
    frame: dict[str, Any] = json.loads(text)
    return frame


async def next_message(ws: ClientConnection, marker: str) -> dict[str, Any]:
    """The next message frame whose payload contains *marker* (another run's
    ``orders`` traffic, if any, is skipped; at most 50 frames are read)."""
    for _ in range(50):
        frame = await recv(ws)
        if frame["type"] == "message" and marker in frame["payload"]:
            return frame
    raise AssertionError(f"no message containing {marker!r} in 50 frames")


def test_a_route_publishes_to_websocket_clients_and_other_listeners(
    served: tuple[ModuleType, str], dsn: str, psql: Callable[..., str]
) -> None:
    module, host = served
    item = f"tea-{uuid.uuid4().hex[:8]}"
    with pgcast.connect(dsn) as listener:
        listener.listen("orders")

        async def main() -> None:
            async with connect(f"ws://{host}/realtime/ws", proxy=None,
                               open_timeout=TIMEOUT) as ws, \
                    httpx.AsyncClient(base_url=f"http://{host}", trust_env=False,
                                      timeout=TIMEOUT) as http:
                await ws.send(json.dumps({"type": "subscribe", "channels": ["orders"]}))
                assert await recv(ws) == {"type": "subscribed", "channels": ["orders"]}

                status = (await http.get("/status")).json()
                assert status == {"database_up": True, "clients": 1, "listening": ["orders"]}

                r = await http.post("/orders", json={"item": item, "quantity": 2})
                assert r.status_code == 202, r.text
                frame = await next_message(ws, item)
                assert json.loads(frame["payload"]) == {"item": item, "quantity": 2}
                assert frame["pid"] == module.realtime.gateway.backend_pid

                # A bad order is refused by the route: nothing is published.
                r = await http.post("/orders", json={"item": item, "quantity": 0})
                assert r.status_code == 422
                # SQL reaches the browser too; it is the next message of this run.
                await asyncio.to_thread(psql, f"NOTIFY orders, 'from-sql {item}'")
                frame = await next_message(ws, item)
                assert frame["payload"] == f"from-sql {item}"

        asyncio.run(asyncio.wait_for(main(), 60))
        # The other session got the route's order, and no refused one.
        ours: list[str] = []
        for event in listener.wait(timeout=TIMEOUT):  # ends on the SQL one, or idle
            assert event is not None, f"nothing more after {ours!r}"
            if isinstance(event, pgcast.Event) and item in event.payload:
                ours.append(event.payload)
                if event.payload.startswith("from-sql"):
                    break
        assert [json.loads(p) for p in ours[:1]] == [{"item": item, "quantity": 2}]
        assert ours[1:] == [f"from-sql {item}"]


def backends(conn: Any, pid: int | None) -> int:
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s "
                       "AND datname = current_database()", (pid,)).fetchone()
    return int(row[0])


def test_the_gateway_starts_and_stops_with_the_host_lifespan(
    dsn: str, monkeypatch: pytest.MonkeyPatch, conn: Any
) -> None:
    module = load_example(dsn, monkeypatch)
    gateway = module.realtime.gateway
    assert not gateway.database_up
    with serving(module.app) as host:
        assert gateway.database_up  # started by the lifespan, before any request
        pid = gateway.backend_pid
        assert backends(conn, pid) == 1
        r = httpx.get(f"http://{host}/realtime/healthz", trust_env=False, timeout=TIMEOUT)
        assert r.json()["backend_pid"] == pid
    # The lifespan closed it: its connection is gone from the server.
    assert not gateway.database_up
    deadline = time.monotonic() + TIMEOUT
    while backends(conn, pid):
        assert time.monotonic() < deadline, "the gateway's connection outlived the app"
        time.sleep(0.05)
