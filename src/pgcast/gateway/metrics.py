"""The gateway's metrics in an application's prometheus_client registry.

``/metrics`` serves the gateway's own text; an application that already
exposes a ``prometheus_client`` registry adds the gateway's metrics to it
instead::

    from prometheus_client import REGISTRY
    from pgcast.gateway import create_app
    from pgcast.gateway.metrics import PrometheusCollector

    realtime = create_app(dsn, allow=["orders.*"])
    REGISTRY.register(PrometheusCollector(realtime))

Each scrape reads the gateway's counters as they are then: the same names,
types, labels and values as ``/metrics`` (``pgcast_gateway_*``, including the
``pgcast_gateway_delivery_latency_seconds`` histogram: from a notification's
arrival from PostgreSQL to its frame handed to a client's transport).

Needs ``prometheus_client`` (``pip install 'pgcast[prometheus]'``).
"""

from __future__ import annotations

from collections.abc import Iterator

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "pgcast.gateway.metrics needs prometheus_client: pip install 'pgcast[prometheus]'"
    ) from exc

from ._gateway import Gateway, GatewayApp
from ._metrics import Family

__all__ = ["PrometheusCollector"]


class PrometheusCollector:
    """A prometheus_client collector of one gateway's metrics.

    :param gateway: the app :func:`~pgcast.gateway.create_app` returned, or
        its :attr:`~pgcast.gateway.GatewayApp.gateway`.
    """

    def __init__(self, gateway: Gateway | GatewayApp) -> None:
        if isinstance(gateway, GatewayApp):
            gateway = gateway.gateway
        if not isinstance(gateway, Gateway):
            raise TypeError(
                "PrometheusCollector needs the app create_app() returned or its .gateway, "
                f"not {type(gateway).__name__}"
            )
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        """The gateway's metric families, read now (prometheus_client calls it
        on each scrape)."""
        for family in self._gateway.metric_families():
            yield _convert(family)


def _convert(family: Family) -> Metric:
    if family.histogram is not None:
        return HistogramMetricFamily(
            family.name, family.help,
            buckets=[(le, float(n)) for le, n in family.histogram.cumulative()],
            sum_value=family.histogram.sum,
        )
    labels = sorted({k for sample_labels, _ in family.samples for k in sample_labels})
    metric: CounterMetricFamily | GaugeMetricFamily
    if family.kind == "counter":
        # prometheus_client adds the _total suffix itself.
        metric = CounterMetricFamily(family.name.removesuffix("_total"), family.help,
                                     labels=labels)
    else:
        metric = GaugeMetricFamily(family.name, family.help, labels=labels)
    for sample_labels, value in family.samples:
        metric.add_metric([sample_labels[k] for k in labels], value)
    return metric
