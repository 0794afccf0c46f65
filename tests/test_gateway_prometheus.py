"""The gateway's metrics in a prometheus_client registry, after real traffic.

A gateway under uvicorn on loopback, a WebSocket client subscribed, NOTIFYs
from psql: a :class:`PrometheusCollector` registered in a fresh
``CollectorRegistry`` reports what happened (messages in and out, the
client, the delivery latency histogram, the NOTIFY queue usage read from the
database), and the same sample names as the gateway's own ``/metrics``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from _serving import serving
from pgcast.gateway import GatewayApp, create_app
from pgcast.gateway._metrics import Histogram
from pgcast.gateway._serve import GatewayServer, config
from test_gateway_server import TIMEOUT, apsql, recv, run, subscribe, ws_connect

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from pgcast.gateway.metrics import PrometheusCollector  # noqa: E402


@pytest.fixture
def served(dsn: str) -> Iterator[tuple[GatewayApp, int]]:
    app = create_app(dsn, allow=["*"])
    with serving(lambda port: GatewayServer(config(app, "127.0.0.1", port,
                                                   log_level="warning")), TIMEOUT) as port:
        yield app, port


def samples(text: str) -> dict[str, float]:
    return {
        s.name + repr(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_collector_reports_real_traffic_in_a_fresh_registry(
    served: tuple[GatewayApp, int], unique_channel: str, psql: Callable[..., str]
) -> None:
    app, port = served
    registry = prometheus_client.CollectorRegistry()
    registry.register(PrometheusCollector(app))
    value = registry.get_sample_value
    assert value("pgcast_gateway_messages_in_total") == 0
    assert value("pgcast_gateway_delivery_latency_seconds_count") == 0

    async def main() -> None:
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await subscribe(ws, unique_channel)
            for n in range(3):
                await apsql(psql, f"NOTIFY {unique_channel}, 'm{n}'")
                assert (await recv(ws))["payload"] == f"m{n}"
            # Read while the client is connected (from this thread, not the loop's).
            scrape = await asyncio.to_thread(prometheus_client.generate_latest, registry)
            got = samples(scrape.decode())
            assert got["pgcast_gateway_clients" + repr([("transport", "websocket")])] == 1
            assert got["pgcast_gateway_subscriptions[]"] == 1

    run(main())
    assert value("pgcast_gateway_messages_in_total") == 3
    assert value("pgcast_gateway_connections_total", {"transport": "websocket"}) == 1
    assert value("pgcast_gateway_database_up") == 1
    assert value("pgcast_gateway_backend_pid") == app.gateway.backend_pid
    # Counted just after the frame was handed to the transport, which the
    # client may see first: wait (bounded) for the count.
    deadline = time.monotonic() + TIMEOUT
    while value("pgcast_gateway_messages_out_total") != 3:
        assert time.monotonic() < deadline, value("pgcast_gateway_messages_out_total")
        time.sleep(0.02)
    assert value("pgcast_gateway_delivery_latency_seconds_count") == 3
    total = value("pgcast_gateway_delivery_latency_seconds_sum")
    assert total is not None and 0 < total < 30
    assert value("pgcast_gateway_delivery_latency_seconds_bucket", {"le": "+Inf"}) == 3
    # Read from the database through the gateway's loop.
    usage = value("pgcast_gateway_notify_queue_usage")
    assert usage is not None and 0 <= usage < 1

    # The same samples as the gateway's own /metrics (values may have moved).
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=TIMEOUT).text
    ours = set(samples(text))
    theirs = set(samples(prometheus_client.generate_latest(registry).decode()))
    assert ours == theirs


def test_the_collector_refuses_what_is_not_a_gateway() -> None:
    with pytest.raises(TypeError, match="create_app"):
        PrometheusCollector(object())  # type: ignore[arg-type]


def test_histogram_counts_in_cumulative_buckets() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1", 3), ("+Inf", 4)]
    assert h.count == 4 and h.sum == pytest.approx(3.65)
    with pytest.raises(ValueError, match="at least one bucket"):
        Histogram(())


def test_the_readme_and_the_docs_list_every_metric() -> None:
    """No metric goes undocumented: every family /metrics serves is named
    in the README (without its prefix) and in docs/operations.md."""
    from pathlib import Path

    from pgcast.gateway import _metrics

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    operations = (root / "docs" / "operations.md").read_text()
    names = [f.name for f in _metrics.families(
        _metrics.Stats(), clients={}, subscriptions=0, channels=0, database_up=True,
        backend_pid=1, queue_usage=0.5)]
    assert len(names) == 23  # 18, issue 13's replays, replayed messages, incomplete
    # resumes, and the replay connection's queries and refusals (replay_wait)
    for name in names:
        assert f"`{name.removeprefix('pgcast_gateway_')}" in readme, name
        assert f"`{name}`" in operations, name
