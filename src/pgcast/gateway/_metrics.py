"""The gateway's counters and their Prometheus text exposition (format 0.0.4).

Pure: :class:`Stats` is plain counters the driver bumps (and a
:class:`Histogram` of the delivery latency), :func:`families` turns a snapshot
into metric families, :func:`render` into the text ``/metrics`` serves.
:mod:`pgcast.gateway.metrics` hands the same families to prometheus_client.
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ._protocol import Frame

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Family", "Histogram", "Stats", "families",
           "render"]

#: The Content-Type of the Prometheus text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_PREFIX = "pgcast_gateway_"

#: The upper bounds (seconds) of the delivery latency histogram's buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class Histogram:
    """Observations counted in fixed buckets, as Prometheus histograms are."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        if not self.bounds:
            raise ValueError("a histogram needs at least one bucket")
        #: Observations per bucket, not cumulative; the last one is +Inf.
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Count *value* (*times* times)."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.count += times
        self.sum += value * times

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, observations <= le)`` for each bucket, ending with ``+Inf``."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((_value(float(bound)), total))
        return out


@dataclass
class Stats:
    """Counters since the gateway started (all monotonic)."""

    messages_in: int = 0
    """Notifications received from PostgreSQL."""
    messages_out: int = 0
    """Message frames sent to clients (one notification to N clients counts N)."""
    published: int = 0
    """NOTIFYs sent on behalf of clients."""
    dropped: int = 0
    """Frames dropped from full queues under the drop-oldest policy."""
    reconnects: int = 0
    """Times the LISTEN connection was lost and opened again."""
    errors: int = 0
    """Error frames sent to clients (refused or malformed requests)."""
    replays: int = 0
    """Durable channels a client resumed from a position (each replayed)."""
    replayed: int = 0
    """Messages read from the log and queued for resuming clients."""
    incomplete_resumes: int = 0
    """Resumes that could not be complete (pruned, or another epoch): each
    announced to its client (``recovered: false``, a gap notice)."""
    replay_queries: int = 0
    """Queries run on the replay connection (resume checks and replays)."""
    replay_busy: int = 0
    """Replay queries that got no turn on the replay connection within
    ``replay_wait`` (their resume failed with an error; nothing changed)."""
    connections: Counter[str] = field(default_factory=Counter)
    """Clients accepted, by transport."""
    disconnects: Counter[str] = field(default_factory=Counter)
    """Clients the gateway disconnected, by reason (slow_consumer, shutdown)."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Connections refused, by reason (origin, auth, capacity, per_address, bad_request)."""
    rate_limited: Counter[str] = field(default_factory=Counter)
    """Requests refused for the rate limits, by kind (publish, request,
    total_publish: the gateway's limit on all clients' publishes together)."""
    latency: Histogram = field(default_factory=Histogram)
    """Seconds from a notification's arrival from PostgreSQL to its frame
    handed to a client's transport, once per client it was sent to."""

    def written(self, frame: Frame, count: int = 1) -> None:
        """Count *frame*, just written to *count* clients' sockets (the
        direct path, see :mod:`._wsdirect`), and its latency (one clock
        reading for all of them, taken after the last)."""
        if frame.is_message:
            self.messages_out += count
            if frame.received is not None:
                self.latency.observe(max(0.0, time.monotonic() - frame.received), count)

    def delivered(self, frames: Iterable[Frame], now: float) -> None:
        """Count the message frames among *frames*, just handed to one
        client's transport at *now* (``time.monotonic()``), and their latency."""
        latency = self.latency
        sent = 0
        for frame in frames:
            if frame.is_message:
                sent += 1
                if frame.received is not None:
                    latency.observe(max(0.0, now - frame.received))
        self.messages_out += sent


def _value(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: its full name (counters end in ``_total``), type,
    help text, and samples ``(labels, value)``; a histogram has its
    :class:`Histogram` instead of samples."""

    name: str
    kind: str
    help: str
    samples: tuple[tuple[Mapping[str, str], float], ...] = ()
    histogram: Histogram | None = None

    def lines(self) -> list[str]:
        """The family in the text format."""
        name = self.name
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} {self.kind}"]
        if self.histogram is not None:
            for le, n in self.histogram.cumulative():
                lines.append(f'{name}_bucket{{le="{le}"}} {n}')
            lines.append(f"{name}_sum {_value(self.histogram.sum)}")
            lines.append(f"{name}_count {self.histogram.count}")
        for labels, value in self.samples:
            if labels:
                inner = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
                lines.append(f"{name}{{{inner}}} {_value(value)}")
            else:
                lines.append(f"{name} {_value(value)}")
        return lines


def _family(
    name: str, kind: str, text: str, samples: Iterable[tuple[Mapping[str, str], float]]
) -> list[Family]:
    return [Family(_PREFIX + name, kind, text, tuple(samples))]


def _by(
    label: str, counts: Mapping[str, int], keys: Iterable[str]
) -> list[tuple[dict[str, str], float]]:
    names = list(dict.fromkeys([*keys, *sorted(counts)]))
    return [({label: k}, counts.get(k, 0)) for k in names]


#: The counters of :class:`Stats` without labels: (metric, attribute, help).
_COUNTERS = (
    ("messages_in_total", "messages_in", "Notifications received from PostgreSQL."),
    ("messages_out_total", "messages_out", "Message frames sent to clients."),
    ("published_total", "published", "NOTIFYs sent on behalf of clients."),
    ("dropped_total", "dropped", "Frames dropped from full client queues (drop-oldest policy)."),
    ("errors_total", "errors", "Error frames sent to clients."),
    ("reconnects_total", "reconnects", "Times the LISTEN connection was lost and reopened."),
    ("replays_total", "replays", "Durable channels resumed by clients from a position (since)."),
    ("replayed_messages_total", "replayed", "Messages replayed from the log to resuming clients."),
    ("incomplete_resumes_total", "incomplete_resumes",
     "Resumes that could not be complete (messages pruned, or another epoch of the log), "
     "announced to the client."),
    ("replay_queries_total", "replay_queries",
     "Queries run on the replay connection for resuming clients."),
    ("replay_busy_total", "replay_busy",
     "Resume queries refused: no turn on the replay connection within replay_wait."),
)


def families(
    stats: Stats,
    *,
    clients: Mapping[str, int],
    subscriptions: int,
    channels: int,
    database_up: bool,
    backend_pid: int | None,
    queue_usage: float | None,
) -> list[Family]:
    """The metric families for *stats* and the current gauges.

    *queue_usage* is ``pg_notification_queue_usage()`` (0 to 1), or None when
    it could not be read (the sample is then omitted rather than made up).
    """
    lines: list[Family] = []
    lines += _family("clients", "gauge", "Connected clients, by transport.",
                     _by("transport", clients, ("websocket", "sse")))
    lines += _family("subscriptions", "gauge", "Client subscriptions (client, channel pairs).",
                     [({}, subscriptions)])
    lines += _family("channels", "gauge", "Channels LISTENed to on the database connection.",
                     [({}, channels)])
    lines += _family("connections_total", "counter", "Clients accepted, by transport.",
                     _by("transport", stats.connections, ("websocket", "sse")))
    lines += _family("rejected_total", "counter", "Connections refused, by reason.",
                     _by("reason", stats.rejected,
                         ("origin", "auth", "capacity", "per_address")))
    lines += _family("rate_limited_total", "counter",
                     "Requests refused for the rate limits, by kind (total_publish: "
                     "the gateway's limit on all clients' publishes together).",
                     _by("kind", stats.rate_limited, ("publish", "request", "total_publish")))
    lines += _family("disconnects_total", "counter",
                     "Clients disconnected by the gateway, by reason.",
                     _by("reason", stats.disconnects,
                         ("slow_consumer", "shutdown", "rate_limited", "expired")))
    for name, attr, text in _COUNTERS:
        lines += _family(name, "counter", text, [({}, getattr(stats, attr))])
    lines += _family("worker_pid", "gauge",
                     "The process id of the gateway process (worker) that answered.",
                     [({}, os.getpid())])
    lines += _family("database_up", "gauge", "1 when the LISTEN connection is open.",
                     [({}, 1 if database_up else 0)])
    if backend_pid is not None:
        lines += _family("backend_pid", "gauge", "Server process id of the LISTEN connection.",
                         [({}, backend_pid)])
    if queue_usage is not None:
        lines += _family("notify_queue_usage", "gauge",
                         "pg_notification_queue_usage(): fraction of the NOTIFY queue in use.",
                         [({}, queue_usage)])
    lines.append(Family(
        _PREFIX + "delivery_latency_seconds", "histogram",
        "Seconds from a notification's arrival from PostgreSQL to its frame handed to a "
        "client's transport (once per client).",
        histogram=stats.latency,
    ))
    return lines


def render(families: Iterable[Family]) -> str:
    """The ``/metrics`` body: *families* (see :func:`families`) in the text format."""
    lines: list[str] = []
    for family in families:
        lines += family.lines()
    return "\n".join(lines) + "\n"
