"""pgcast: real-time pub/sub on PostgreSQL LISTEN/NOTIFY.

::

    import pgcast

    with pgcast.connect("postgresql://localhost/app") as ps:
        ps.listen("orders")
        for event in ps.events():
            print(event.channel, event.payload, event.pid)

The asyncio twin is :mod:`pgcast.aio`; the embedded server is
:mod:`pgcast.embedded`.
"""

from __future__ import annotations

import sys

from . import aio
from ._backoff import Backoff
from ._channels import MAX_CHANNEL_BYTES
from ._errors import (
    AccessDenied,
    ClosedError,
    ConnectError,
    ConnectionLostError,
    DatabaseError,
    EmbeddedServerError,
    HotStandbyError,
    InvalidChannelError,
    ListenNotEffectiveError,
    NotSentError,
    PayloadError,
    PayloadTooLargeError,
    PgcastError,
    ProtocolError,
    PublisherFullError,
    PublishError,
    QueueError,
    SchemaError,
    WatchError,
)
from ._event import DurableEvent, Event, Position, UndecodableEvent
from ._gap import Gap
from ._payload import MAX_PAYLOAD_BYTES, Payload
from ._reconnect import Reconnected
from .aio import AsyncPubSub
from .client import PubSub, Runner, connect, notify
from .durable import DEFAULT_RETENTION, install_schema, prune
from .feeds import queue, triggers, worker
from .feeds.triggers import unwatch_table, watch_table
from .feeds.worker import Retry, Worker
from .manager._manager import NotificationManager
from .publisher import AsyncPublisher, Publisher

__version__ = "0.1.0"

# The feeds' public paths from before feeds/ existed: ``pgcast.triggers``,
# ``pgcast.queue`` and ``pgcast.worker`` are the feeds/ modules themselves
# (the same module objects: every name, isinstance check and monkeypatch
# agrees). No module file sits at those paths, so that git follows the move
# for branches that edit them; type checkers read the stubs beside this file.
for _short, _module in (("triggers", triggers), ("queue", queue), ("worker", worker)):
    sys.modules[f"{__name__}.{_short}"] = _module
del _short, _module

__all__ = [
    "DEFAULT_RETENTION",
    "MAX_CHANNEL_BYTES",
    "MAX_PAYLOAD_BYTES",
    "AccessDenied",
    "AsyncPubSub",
    "AsyncPublisher",
    "Backoff",
    "ClosedError",
    "ConnectError",
    "ConnectionLostError",
    "DatabaseError",
    "DurableEvent",
    "EmbeddedServerError",
    "Event",
    "Gap",
    "HotStandbyError",
    "InvalidChannelError",
    "ListenNotEffectiveError",
    "NotSentError",
    "NotificationManager",
    "Payload",
    "PayloadError",
    "PayloadTooLargeError",
    "PgcastError",
    "Position",
    "ProtocolError",
    "PubSub",
    "PublishError",
    "Publisher",
    "PublisherFullError",
    "QueueError",
    "Reconnected",
    "Retry",
    "Runner",
    "SchemaError",
    "UndecodableEvent",
    "WatchError",
    "Worker",
    "__version__",
    "aio",
    "connect",
    "install_schema",
    "notify",
    "prune",
    "unwatch_table",
    "watch_table",
]
