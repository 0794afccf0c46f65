"""Coalescing publishers: many threads' (or tasks') notifications, few transactions.

Every notifying transaction takes PostgreSQL's global notify lock while it
commits, so many writers that each NOTIFY inside their own transaction commit
one at a time. A :class:`Publisher` (threads) or :class:`AsyncPublisher`
(asyncio tasks) takes that off the writers: they commit their data without
NOTIFY and hand the notification over; a background sender sends whatever has
gathered in one transaction (``notify_many``) every ``interval`` seconds.

The contract is in :mod:`pgcast.publisher._publisher_async`, the hand-written
asyncio source; the sync :class:`Publisher` (:mod:`pgcast.publisher._publisher`)
is generated from it by ``tools/async_to_sync.py``. The queue and its
deadlines live in :mod:`pgcast.publisher._batcher`, without I/O.
"""

from __future__ import annotations

from ._publisher import Publisher
from ._publisher_async import AsyncPublisher

__all__ = ["AsyncPublisher", "Publisher"]
