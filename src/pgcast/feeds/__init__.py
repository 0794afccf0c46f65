"""Table change feeds, workers and queue tables: what turns rows into messages
and messages into work.

- :mod:`pgcast.feeds.triggers`: triggers that publish a table's changes
  (``watch_table``), and :class:`~pgcast.feeds.triggers.Change`, one change
  read back from an event;
- :mod:`pgcast.feeds.queue`: queue tables whose jobs survive the listener
  being away, claimed with ``FOR UPDATE SKIP LOCKED``;
- :mod:`pgcast.feeds.worker`: :class:`~pgcast.feeds.worker.Worker`, which
  runs handlers for channels and queues (batching, retries, coalescing).

Each module is also importable by its older, shorter path (``pgcast.triggers``,
``pgcast.queue``, ``pgcast.worker``): the same module object, see
:mod:`pgcast`.
"""

from __future__ import annotations

__all__: list[str] = []
