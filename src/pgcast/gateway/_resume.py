"""Resuming a client's durable channels from a position: replay, then live.

A client that subscribes to a durable channel with ``since`` (a WebSocket
``subscribe`` frame, or an SSE ``Last-Event-ID``) must get every message after
that position once, in order, then the live ones. The merging is
:class:`pgcast.durable._core.DurableState`'s, the same a durable PubSub uses,
here one per client: the client's events on those channels are *diverted* to
it (see :attr:`Subscriber.diverted`) instead of going straight to its queue;
while a channel replays, live events are dropped and only their highest id
kept; once the replay caught up, live events at or below the position are
duplicates.

The replay reads the log on the hub's query connection in batches no larger
than half the client's queue, and waits for the queue to drain below half
before the next, so a long replay never overflows a client that keeps up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .._event import Event
from .._gap import Gap
from .._reconnect import Reconnected
from ..durable import adrive
from ..durable._core import DurableState, Unfetched, ref_payload
from . import _protocol
from ._router import Outbox

__all__ = ["Resume"]

#: ``fetch(sql, params) -> rows`` on a connection other than the LISTEN one.
Fetch = Callable[[str, Any], Awaitable[list[tuple[Any, ...]]]]


class Resume:
    """The durable channels one client resumed, and their replay."""

    __slots__ = ("_inbox", "_outbox", "_overflow", "_state")

    def __init__(self, outbox: Outbox, overflow: Callable[[], None]) -> None:
        self._inbox: deque[Event | Reconnected | Gap] = deque()
        self._state = DurableState(self._inbox)
        self._outbox = outbox
        #: Called when the client's queue overflows (the hub disconnects it).
        self._overflow = overflow

    def start(self, channel: str, since: int) -> None:
        """Hold back *channel*'s live events from now on: call it in the same
        step as the client is subscribed, before any event can reach it."""
        self._state.plan_subscribe([channel], True, since, None)

    def forget(self, channels: Sequence[str]) -> None:
        """The client unsubscribed from *channels*."""
        self._state.forget(channels)

    def divert(self, event: object) -> None:
        """A live event on a resumed channel: merge it, then queue what is due."""
        assert isinstance(event, Event)
        event_id = getattr(event, "id", None)
        if event_id is None:
            # A plain NOTIFY on a durable channel: not in the log, no position.
            if not self._outbox.put(_protocol.message(event.channel, event.payload, event.pid)):
                self._overflow()
            return
        # The gateway's own durable PubSub read it from the log: trusted.
        self._state.admit(event.channel, ref_payload(event_id, event.payload), event.pid,
                          trusted=True)
        self._flush_ready()

    def _flush_ready(self) -> None:
        # Stops at a replayed message whose payload is still to be fetched:
        # the replay task fetches it and queues everything behind it, in order.
        inbox = self._inbox
        while inbox and not isinstance(inbox[0], Unfetched):
            self._put(inbox.popleft())

    def _put(self, event: Event | Reconnected | Gap) -> None:
        if isinstance(event, Event) and not self._outbox.put(_protocol.message(
            event.channel, event.payload, event.pid, getattr(event, "id", None)
        )):
            self._overflow()

    async def replay(
        self, channels: dict[str, int], fetch: Fetch, is_gone: Callable[[], bool]
    ) -> None:
        """Find each channel's start, then replay until every one is live."""
        outbox = self._outbox
        batch = max(1, min(1000, outbox.maxsize // 2))
        for channel, since in channels.items():
            await adrive(self._state.subscribe_steps([channel], since, None, batch), fetch)
            await self._flush(fetch)
        while self._state.pending and not is_gone():
            # Let the client take what it has before reading more.
            while len(outbox) > batch and not is_gone():
                await asyncio.sleep(0.01)
            await adrive(self._state.replay_steps(batch), fetch)
            await self._flush(fetch)

    async def _flush(self, fetch: Fetch) -> None:
        inbox = self._inbox
        while inbox:
            event = inbox[0]
            if isinstance(event, Unfetched):
                fetched = await adrive(DurableState.fetch_steps(event), fetch)
                # The event may have been flushed meanwhile by nobody else:
                # only this task pops Unfetched entries.
                inbox.popleft()
                if fetched is not None:
                    self._put(fetched)
                continue
            self._put(inbox.popleft())
