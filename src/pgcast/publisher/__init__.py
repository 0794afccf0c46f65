"""Coalescing publishers: :class:`Publisher` for threads, :class:`AsyncPublisher`
for asyncio tasks, both sending many writers' notifications in few
transactions, off the writers' own.

The contract is in :mod:`pgcast.publisher._publisher_async`, the hand-written
asyncio source; the sync :class:`Publisher` (:mod:`pgcast.publisher._publisher`)
is generated from it by ``tools/async_to_sync.py``. The queue and its
deadlines live in :mod:`pgcast.publisher._batcher`, without I/O.
"""

from __future__ import annotations

from ._publisher import Publisher
from ._publisher_async import AsyncPublisher

__all__ = ["AsyncPublisher", "Publisher"]
