"""The asyncio flavour of pgcast: the same names as the sync one, awaitable.

``await pgcast.aio.connect(...)`` opens an :class:`AsyncPubSub` (written in
:mod:`pgcast.client._pubsub_async` and :mod:`pgcast.client._session_async`, the sources the
sync client is generated from); :func:`notify` sends through an application's
own ``psycopg.AsyncConnection``; :class:`NotificationManager` waits on many
AsyncPubSubs at once; :func:`install_schema`, :func:`prune`, :func:`consumers`
and :func:`drive` take an ``AsyncConnection`` (or an async fetch). The
asyncio names: classes ``AsyncX`` (also under the sync name where the sync
one is a class users make: ``NotificationManager``, ``Worker``), functions
the sync names under ``pgcast.aio``. (``adrive``, ``install_schema_async``
and ``prune_async`` in :mod:`pgcast.durable` are older names of the same
functions, kept.)

An AsyncPubSub belongs to the event loop it was created in and is not thread
safe, like every asyncio object; other tasks may notify, listen and unlisten
while one task iterates :meth:`AsyncPubSub.events`.
"""

from __future__ import annotations

from ._event import Position
from ._gap import Gap
from .client._open_async import connect, notify
from .client._pubsub_async import AsyncPubSub, AsyncReconnectHook
from .durable._run_async import consumers, drive, install_schema, prune
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
    "consumers",
    "drive",
    "install_schema",
    "notify",
    "prune",
]
