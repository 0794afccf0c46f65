"""Many PubSubs watched at once: :class:`NotificationManager` (sync) here,
the asyncio one as ``pgcast.aio.NotificationManager``.

The policy both drive (what to read, when to idle, health checks, lost
connections) is :mod:`pgcast.manager._policy`, without I/O; each driver only
waits: a selector (:mod:`pgcast.manager._manager`) or the event loop's readers
(:mod:`pgcast.manager._manager_async`).
"""

from __future__ import annotations

from ._manager import NotificationManager

__all__ = ["NotificationManager"]
