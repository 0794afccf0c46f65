"""How far each named consumer is behind: pure SQL and values, run by
:func:`pgcast.durable.consumers` (``pgcast consumers``, ``pgcast doctor``).

A consumer's *position* is the last id it acknowledged on its channel. It is
*behind* by the messages of the channel the log holds after it (all of them
when the position belongs to another epoch of the log), and by the age of
the oldest of those. Its *status*:

- ``"ok"``: nothing it has not acknowledged is older than the retention;
- ``"holding"``: its oldest unacknowledged message is older than the
  retention: ``pgcast prune`` keeps it (and everything after) for the
  consumer, so the log grows until it catches up or is forced;
- ``"lost"``: messages it had not acknowledged were deleted (a forced prune,
  ``max_age``, a hand-written ``DELETE``) or its position is of another
  epoch: it gets a :class:`~pgcast.Gap` when it resumes.

On schema version 1 nothing was recorded, so ``"lost"`` cannot be told.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypeAlias

from ._schema import Query

__all__ = ["ConsumerLag", "LagStatus", "consumers_query", "lag_of"]

LagStatus: TypeAlias = Literal["ok", "holding", "lost"]

_V2 = """
SELECT c.name, c.channel, c.position, c.updated_at, now(),
       (SELECT count(*) FROM pgcast.log AS l
        WHERE l.channel = c.channel AND l.id > s.start) AS behind,
       (SELECT l.created_at FROM pgcast.log AS l
        WHERE l.channel = c.channel AND l.id > s.start ORDER BY l.id LIMIT 1) AS oldest_at,
       e.other_epoch
       OR coalesce((SELECT p.upto FROM pgcast.pruned AS p WHERE p.channel = c.channel), 0)
          > c.position AS lost
FROM pgcast.consumers AS c
CROSS JOIN LATERAL (SELECT c.epoch IS NOT NULL
                           AND c.epoch <> (SELECT epoch FROM pgcast.meta) AS other_epoch) AS e
CROSS JOIN LATERAL (SELECT CASE WHEN e.other_epoch THEN 0 ELSE c.position END AS start) AS s
ORDER BY c.name, c.channel
"""
_V1 = """
SELECT c.name, c.channel, c.position, c.updated_at, now(),
       (SELECT count(*) FROM pgcast.log AS l
        WHERE l.channel = c.channel AND l.id > c.position) AS behind,
       (SELECT l.created_at FROM pgcast.log AS l
        WHERE l.channel = c.channel AND l.id > c.position ORDER BY l.id LIMIT 1) AS oldest_at,
       NULL::boolean AS lost
FROM pgcast.consumers AS c
ORDER BY c.name, c.channel
"""


def consumers_query(version: int) -> Query:
    """The statement listing every consumer's lag (rows for :func:`lag_of`)."""
    return (_V2 if version >= 2 else _V1), None


@dataclass(frozen=True, slots=True)
class ConsumerLag:
    """One named consumer of one channel, and how far behind it is."""

    name: str
    """The consumer's name."""
    channel: str
    """The channel."""
    position: int
    """The last id it acknowledged."""
    behind: int
    """How many messages the log holds for it after its position."""
    time_behind: timedelta | None
    """How old the oldest of those is (``None``: none)."""
    updated_at: datetime
    """When it last acknowledged (or was created or moved)."""
    status: LagStatus
    """``"ok"``, ``"holding"`` or ``"lost"``: see :mod:`pgcast.durable._lag`."""
    lost: bool | None
    """Whether messages it had not acknowledged are gone (``None``: unknown,
    schema version 1)."""


def lag_of(row: tuple[Any, ...], retention: timedelta) -> ConsumerLag:
    """A row of :func:`consumers_query` as a :class:`ConsumerLag`."""
    name, channel, position, updated_at, now, behind, oldest_at, lost = row
    time_behind = None if oldest_at is None else max(timedelta(0), now - oldest_at)
    status: LagStatus = "ok"
    if lost:
        status = "lost"
    elif time_behind is not None and time_behind > retention:
        status = "holding"
    return ConsumerLag(name, channel, int(position), int(behind), time_behind, updated_at,
                       status, None if lost is None else bool(lost))
