"""The gateway's counters and their Prometheus text exposition (format 0.0.4).

Pure: :class:`Stats` is plain counters the driver bumps, :func:`render` turns a
snapshot into the text ``/metrics`` serves.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["CONTENT_TYPE", "Stats", "render"]

#: The Content-Type of the Prometheus text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_PREFIX = "pgcast_gateway_"


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
    connections: Counter[str] = field(default_factory=Counter)
    """Clients accepted, by transport."""
    disconnects: Counter[str] = field(default_factory=Counter)
    """Clients the gateway disconnected, by reason (slow_consumer, shutdown)."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Connections refused, by reason (origin, auth, capacity, per_address, bad_request)."""
    rate_limited: Counter[str] = field(default_factory=Counter)
    """Requests refused for a client's rate limits, by kind (publish, request)."""


def _value(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(
    name: str, kind: str, text: str, samples: Iterable[tuple[Mapping[str, str], float]]
) -> list[str]:
    full = _PREFIX + name
    lines = [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
    for labels, value in samples:
        if labels:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{full}{{{inner}}} {_value(value)}")
        else:
            lines.append(f"{full} {_value(value)}")
    return lines


def _by(
    label: str, counts: Mapping[str, int], keys: Iterable[str]
) -> list[tuple[dict[str, str], float]]:
    names = list(dict.fromkeys([*keys, *sorted(counts)]))
    return [({label: k}, counts.get(k, 0)) for k in names]


def render(
    stats: Stats,
    *,
    clients: Mapping[str, int],
    subscriptions: int,
    channels: int,
    database_up: bool,
    backend_pid: int | None,
    queue_usage: float | None,
) -> str:
    """The ``/metrics`` body for *stats* and the current gauges.

    *queue_usage* is ``pg_notification_queue_usage()`` (0 to 1), or None when
    it could not be read (the sample is then omitted rather than made up).
    """
    lines: list[str] = []
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
                     "Requests refused for a client's rate limits, by kind.",
                     _by("kind", stats.rate_limited, ("publish", "request")))
    lines += _family("disconnects_total", "counter",
                     "Clients disconnected by the gateway, by reason.",
                     _by("reason", stats.disconnects,
                         ("slow_consumer", "shutdown", "rate_limited", "expired")))
    lines += _family("messages_in_total", "counter", "Notifications received from PostgreSQL.",
                     [({}, stats.messages_in)])
    lines += _family("messages_out_total", "counter", "Message frames sent to clients.",
                     [({}, stats.messages_out)])
    lines += _family("published_total", "counter", "NOTIFYs sent on behalf of clients.",
                     [({}, stats.published)])
    lines += _family("dropped_total", "counter",
                     "Frames dropped from full client queues (drop-oldest policy).",
                     [({}, stats.dropped)])
    lines += _family("errors_total", "counter", "Error frames sent to clients.",
                     [({}, stats.errors)])
    lines += _family("reconnects_total", "counter",
                     "Times the LISTEN connection was lost and reopened.",
                     [({}, stats.reconnects)])
    lines += _family("replays_total", "counter",
                     "Durable channels resumed by clients from a position (since).",
                     [({}, stats.replays)])
    lines += _family("replayed_messages_total", "counter",
                     "Messages replayed from the log to resuming clients.",
                     [({}, stats.replayed)])
    lines += _family("incomplete_resumes_total", "counter",
                     "Resumes that could not be complete (messages pruned, or another "
                     "epoch of the log), announced to the client.",
                     [({}, stats.incomplete_resumes)])
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
    return "\n".join(lines) + "\n"
