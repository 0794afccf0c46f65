"""The :class:`Gap` marker: a durable resume that could not be complete.

A listener of a durable channel resumes from a position (``since=``, a named
consumer's position, or the position reached before a reconnect) by
replaying the log. When messages of that channel after the position were
deleted (pruned), or the position belongs to another epoch of the log (it
was reset since), the replay cannot bring everything that was missed: the
event stream then gets a :class:`Gap` *before* the replayed events, and
``on_gap`` (an argument of ``connect()``) is called with it, as
:class:`~pgcast.Reconnected` and ``on_reconnect`` work. A complete resume
gives no marker. How a gap is detected exactly is explained in
:mod:`pgcast.durable._core`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from ._reconnect import Reconnected

__all__ = ["Gap", "GapReason", "Marker", "OnGap"]

#: Why a resume was not complete.
GapReason: TypeAlias = Literal["pruned", "epoch"]


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages of a durable channel were lost to this listener: the log no
    longer holds some of what came after the position it resumed from.

    Delivered in the event stream (``events()``, ``wait()``,
    ``get_event()``) before the replayed events of :attr:`channel`, and to
    ``on_gap``. What follows it is everything the log still holds after the
    position, in order.
    """

    channel: str
    """The durable channel."""

    since: int
    """The position the resume started from (the last id received, acked
    or asked for with ``since=``)."""

    oldest: int | None
    """The id of the oldest message the log still holds for the channel
    (``None``: none)."""

    reason: GapReason
    """``"pruned"``: messages after :attr:`since` were deleted (retention,
    ``pgcast prune``); ``"epoch"``: :attr:`since` belongs to another epoch
    of the log (it was reset since), so the replay starts at the beginning
    of the log as it is now."""

    epoch: str | None = None
    """The log's epoch now (``None``: unknown)."""


#: What the event stream yields besides events: the markers.
Marker: TypeAlias = Reconnected | Gap

#: ``on_gap``: called with each :class:`Gap` (a coroutine function is awaited
#: by the asyncio PubSub, run to completion by the sync one).
OnGap = Callable[[Gap], object]

