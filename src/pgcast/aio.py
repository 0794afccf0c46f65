"""The asyncio flavour of pgcast: the same names as the sync one, awaitable.

``await pgcast.aio.connect(...)`` opens an :class:`AsyncPubSub` (written in
:mod:`pgcast.client._pubsub_async` and :mod:`pgcast.client._session_async`, the sources the
sync client is generated from); :func:`notify` sends through an application's
own ``psycopg.AsyncConnection``; :class:`NotificationManager` waits on many
AsyncPubSubs at once.

An AsyncPubSub belongs to the event loop it was created in and is not thread
safe, like every asyncio object; other tasks may notify, listen and unlisten
while one task iterates :meth:`AsyncPubSub.events`.
"""

from __future__ import annotations

from .client._open_async import connect, notify
from .client._pubsub_async import AsyncPubSub, AsyncReconnectHook
from .manager._manager_async import AsyncNotificationManager

#: The asyncio NotificationManager, under the name the sync one has.
NotificationManager = AsyncNotificationManager

__all__ = [
    "AsyncNotificationManager",
    "AsyncPubSub",
    "AsyncReconnectHook",
    "NotificationManager",
    "connect",
    "notify",
]
