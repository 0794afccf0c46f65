"""The asyncio flavour of pgcast: the same names as the sync one, awaitable.

``await pgcast.aio.connect(...)`` opens an :class:`AsyncPubSub` (written in
:mod:`pgcast.client._pubsub_async` and :mod:`pgcast.client._session_async`, the sources the
sync client is generated from); :func:`notify` sends through an application's
own ``psycopg.AsyncConnection``; :class:`NotificationManager` waits on many
AsyncPubSubs at once; :func:`install_schema` and :func:`prune` take an
``AsyncConnection``. The asyncio names: classes ``AsyncX``, functions the
sync names under ``pgcast.aio`` (``install_schema_async`` and
``prune_async`` in :mod:`pgcast.durable` are the same functions).

An AsyncPubSub belongs to the event loop it was created in and is not thread
safe, like every asyncio object; other tasks may notify, listen and unlisten
while one task iterates :meth:`AsyncPubSub.events`.
"""

from __future__ import annotations

from ._event import Position
from ._gap import Gap
from .client._open_async import connect, notify
from .client._pubsub_async import AsyncPubSub, AsyncReconnectHook
from .durable import install_schema_async as install_schema
from .durable import prune_async as prune
from .feeds._worker_async import AsyncWorker
from .manager._manager_async import AsyncNotificationManager

#: The asyncio NotificationManager, under the name the sync one has.
NotificationManager = AsyncNotificationManager
#: The asyncio Worker (:mod:`pgcast.feeds.worker`), under the name the sync one has.
Worker = AsyncWorker

__all__ = [
    "AsyncNotificationManager",
    "AsyncPubSub",
    "AsyncReconnectHook",
    "AsyncWorker",
    "Gap",
    "NotificationManager",
    "Position",
    "Worker",
    "connect",
    "install_schema",
    "notify",
    "prune",
]
