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
A client that takes nothing from its queue for :data:`STALL_TIMEOUT` seconds
meanwhile is dropped as a slow consumer: as the queue never overflows, an SSE
stream (no pings) that resumed and never read stayed for good, its replay
polling the queue; 1,000 of them kept the gateway at 77 % of a core.

**Saying whether a resume is complete.** Before the subscription takes
effect, :func:`check` reads, for every channel to resume, the log's epoch
and the highest id ever deleted on it (:func:`pgcast.durable._gaps.resume_steps`;
the exact test is explained there): the ``subscribed`` reply says
``recovered`` true or false from that. The replay then checks again in every
batch, in the same statement as its rows: a gap it finds that the reply did
not announce (a prune that ran between the check and the replay, or during
a long replay) becomes a ``gap`` notice before the messages after it. So
``recovered: true`` is never left standing over a gap. SSE clients get every
gap as a notice (:func:`replies`), whatever the door.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg

from .._errors import PgcastError, ProtocolError
from .._event import Event, Position
from .._gap import Gap
from .._reconnect import Reconnected
from ..durable._core import DurableState, Unfetched, ref_payload
from ..durable._gaps import Check, resume_steps
from ..durable._run_async import drive
from . import _protocol
from ._metrics import Stats
from ._protocol import Frame, Ref, Since
from ._router import Outbox

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["STALL_TIMEOUT", "Checked", "Resume", "check", "gap_frame", "positions", "replies"]

#: Seconds a replay waits for a client that takes nothing from its queue
#: before it is dropped as a slow consumer.
STALL_TIMEOUT = 30.0

#: ``fetch(sql, params) -> rows`` on a connection other than the LISTEN one.
Fetch = Callable[[str, Any], Awaitable[list[tuple[Any, ...]]]]


def positions(
    client: Client,
    channels: tuple[str, ...],
    since: Since,
    strict: bool,
    is_durable: Callable[[str], bool],
) -> dict[str, int]:
    """Where each channel of a subscribe resumes: the durable ones among
    *channels* that *since* names.

    :raises ProtocolError: with *strict*, *since* names a channel not being
        subscribed to or not durable; or a channel is subscribed to already.
    """
    if since is None:
        return {}
    wanted = since if isinstance(since, dict) else dict.fromkeys(channels, since)
    out = {}
    for channel, position in wanted.items():
        # A position only ever resumes a channel being subscribed to now,
        # which the hub's access check covered: an SSE Last-Event-ID (or
        # ?since=) naming other channels must not replay them (issue 12
        # item 2). Checked again here so no other caller can skip it.
        if channel not in channels or not client.access.can_read(channel):
            if strict:
                raise ProtocolError(
                    f"since names {channel!r}, which is not being subscribed to"
                )
            continue
        if not is_durable(channel):
            if strict:
                raise ProtocolError(
                    f"channel {channel!r} is not durable on this gateway, so it cannot "
                    "resume from a position (since)"
                )
            continue
        if channel in client.sub.channels:
            raise ProtocolError(
                f"already subscribed to {channel!r}; unsubscribe first to resume it "
                "from a position"
            )
        out[channel] = position
    return out


class Checked(NamedTuple):
    """What :func:`check` found before a subscription took effect."""

    version: int
    """The schema version (gaps are known from 2 on)."""
    epoch: str | None
    """The log's epoch (``None`` before version 2)."""
    checks: dict[str, Check]
    """Per channel resumed, what its replay will miss (empty before version 2)."""

    def gaps(self) -> dict[str, tuple[int | None, str] | None] | None:
        """The ``subscribed`` reply's part: per channel, ``None`` (complete) or
        ``(oldest, reason)``; ``None`` when it cannot be known (version 1)."""
        if self.version < 2:
            return None
        return {c: None if k.gap is None else (k.gap.oldest, k.gap.reason)
                for c, k in self.checks.items()}


async def check(
    fetch: Fetch, positions: dict[str, int], epoch: str | None, durable: bool
) -> Checked | None:
    """Check the resumes of *positions* (of *epoch*), or, with none, only
    read the epoch when *durable* channels are subscribed to; ``None`` when
    there is nothing to say.

    :raises ProtocolError: the log could not be read; nothing changed.
    """
    if not positions and not durable:
        return None
    try:
        return Checked(*await drive(resume_steps(positions, epoch), fetch))
    except (PgcastError, psycopg.Error) as exc:
        raise ProtocolError(
            f"reading the log failed: {exc}; nothing changed: subscribe again"
        ) from None


def replies(
    channels: Sequence[str], ref: Ref, checked: Checked | None, resumed: bool, *, sse: bool
) -> list[Frame]:
    """The ``subscribed`` reply (with the epoch, and *resumed*: whether each
    resume is complete), and for an *sse* client a ``gap`` notice per
    incomplete resume, to queue before the replay."""
    reply = _protocol.subscribed(
        channels, ref, epoch=None if checked is None else checked.epoch,
        gaps=checked.gaps() if checked is not None and resumed else None)
    if not sse or checked is None:
        return [reply]
    return [reply] + [gap_frame(k.gap) for k in checked.checks.values() if k.gap is not None]


def gap_frame(gap: Gap) -> Frame:
    """The ``gap`` notice for *gap*."""
    return _protocol.gap_notice(gap.channel, gap.since, gap.oldest, gap.reason, gap.epoch)


class Resume:
    """The durable channels one client resumed, and their replay."""

    __slots__ = ("_inbox", "_outbox", "_overflow", "_starts", "_state", "_stats")

    def __init__(
        self, outbox: Outbox, overflow: Callable[[], None], stats: Stats | None = None
    ) -> None:
        self._inbox: deque[Event | Reconnected | Gap] = deque()
        self._state = DurableState(self._inbox)
        self._outbox = outbox
        #: Called when the client's queue overflows (the hub disconnects it).
        self._overflow = overflow
        self._stats = stats or Stats()
        #: Per channel started and not replayed yet: where, and the deleted
        #: id up to which a gap was already announced.
        self._starts: dict[str, tuple[Position, int]] = {}

    def start(
        self, channel: str, since: int, checked: Checked | None = None,
        epoch: str | None = None,
    ) -> None:
        """Hold back *channel*'s live events from now on: call it in the same
        step as the client is subscribed, before any event can reach it.
        *checked*: what :func:`check` found (the replay then does not
        announce again what the reply said); *epoch*: the client's."""
        position, announced = Position(since, epoch), 0
        if checked is not None:
            self._state.version = checked.version
            found = checked.checks.get(channel)
            if found is not None:
                # From the log's start after an epoch change; announced up to
                # what the reply covered.
                position = Position(found.start, found.epoch)
                announced = found.upto if found.gap is not None else 0
        self._state.plan_subscribe([channel], True, position, None)
        self._starts[channel] = (position, announced)
        self._stats.replays += 1
        if checked is not None and channel in checked.checks \
                and checked.checks[channel].gap is not None:
            self._stats.incomplete_resumes += 1

    def forget(self, channels: Sequence[str]) -> None:
        """The client unsubscribed from *channels*."""
        self._state.forget(channels)
        for channel in channels:
            self._starts.pop(channel, None)

    def divert(self, event: object) -> None:
        """A live event on a resumed channel: merge it, then queue what is due.
        A :class:`~pgcast.Gap` of the gateway's own listen is queued as is."""
        if isinstance(event, Gap):
            self._put(event)
            return
        assert isinstance(event, Event)
        event_id = getattr(event, "id", None)
        if event_id is None:
            # A plain NOTIFY on a durable channel: not in the log, no position.
            if not self._outbox.put(_protocol.event_message(event)):
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
        if isinstance(event, Gap):
            # Found by the replay, not announced by the reply: say it now,
            # before the messages after it.
            self._stats.incomplete_resumes += 1
            if not self._outbox.put_control(gap_frame(event)):
                self._overflow()
            return
        if isinstance(event, Event) and not self._outbox.put(_protocol.event_message(event)):
            self._overflow()

    async def replay(
        self, channels: dict[str, int], fetch: Fetch, is_gone: Callable[[], bool]
    ) -> None:
        """Find each channel's start, then replay until every one is live."""
        outbox = self._outbox
        batch = max(1, min(1000, outbox.maxsize // 2))
        for channel, since in channels.items():
            if is_gone():  # overflowed by the channels before: read no more for it
                return
            position, announced = self._starts.pop(channel, (Position(since), 0))
            self._stats.replayed += await drive(self._state.subscribe_steps(
                [channel], position, None, batch, {channel: announced}), fetch)
            await self._flush(fetch)
        while self._state.pending and not is_gone():
            # Let the client take what it has before reading more.
            if not await self._drained(batch, is_gone):
                return
            self._stats.replayed += await drive(self._state.replay_steps(batch), fetch)
            await self._flush(fetch)

    async def _drained(self, size: int, is_gone: Callable[[], bool]) -> bool:
        """Wait until the client's queue holds *size* frames or fewer; False
        if it took none for :data:`STALL_TIMEOUT` seconds (it is dropped)."""
        outbox = self._outbox
        loop = asyncio.get_running_loop()
        delay, least, since = 0.01, len(outbox), loop.time()
        while len(outbox) > size and not is_gone():
            await asyncio.sleep(delay)
            if len(outbox) < least:  # it takes: look again soon
                delay, least, since = 0.01, len(outbox), loop.time()
            elif loop.time() - since >= STALL_TIMEOUT:
                self._overflow()
                return False
            else:
                delay = min(delay * 2, 0.5)
        return True

    async def _flush(self, fetch: Fetch) -> None:
        self._state.gaps.clear()  # each goes to the client as a notice (_put)
        inbox = self._inbox
        while inbox:
            event = inbox[0]
            if isinstance(event, Unfetched):
                fetched = await drive(self._state.fetch_or_gap_steps(event), fetch)
                # The event may have been flushed meanwhile by nobody else:
                # only this task pops Unfetched entries.
                inbox.popleft()
                if fetched is not None:
                    self._put(fetched)
                continue
            self._put(inbox.popleft())
