"""The fan-out core: who listens to what, and a bounded queue per client.

Pure bookkeeping, no I/O: the gateway's driver (:mod:`pgcast.gateway._hub`)
runs the LISTEN/UNLISTEN statements this module asks for and the transports
drain the queues.

* :class:`Outbox` is one client's bounded queue of :class:`Frame` s with a named
  :class:`Overflow` policy: ``disconnect`` (the default: the client is marked
  :attr:`~Outbox.overflowed` and must be closed) or ``drop-oldest`` (the oldest
  frame goes, :attr:`~Outbox.dropped` counts it). Either way memory is bounded
  and a slow client never makes :meth:`Router.publish` wait.
  A client whose transport lets the gateway write to its socket (the
  WebSocket path of ``pgcast serve``, :mod:`._wsdirect`) has a :class:`Wire`:
  a frame then goes straight to the socket whenever nothing is queued before
  it and the socket takes more, with no task switch per client; only a
  client whose socket is full queues, and its queue is drained into the
  socket when the socket takes more again, so no frame overtakes another.
* :class:`Router` keeps each client's channels and, per channel, its
  subscribers. The database must LISTEN on exactly :meth:`Router.channels`:
  :meth:`Router.missing` and :meth:`Router.orphans` compare that with what the
  connection listens to, so LISTEN happens on a channel's first subscriber and
  UNLISTEN after its last, and a fresh connection is brought back in line the
  same way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable
from enum import StrEnum
from typing import Protocol

from .._errors import ProtocolError
from ._protocol import Frame

__all__ = ["CONTROL_SLACK", "Outbox", "Overflow", "Router", "Subscriber", "Wire"]

#: How many replies and notices may be queued beyond a client's queue size.
CONTROL_SLACK = 64


class Overflow(StrEnum):
    """What happens when a client's queue is full and another frame comes."""

    DISCONNECT = "disconnect"
    """The client is disconnected (WebSocket close code 4000, reason given)."""

    DROP_OLDEST = "drop-oldest"
    """The oldest queued frame is dropped and counted; the client stays."""


def _nothing() -> None:
    pass


class Wire(Protocol):
    """A client's socket, written to directly (see :mod:`._wsdirect`)."""

    #: Whether the socket takes more now: its buffer is under its high-water
    #: mark and no close was sent (an attribute: it is read once per client
    #: per message on the fan-out path).
    open: bool

    def write_bytes(self, data: bytes) -> None:
        """Write *data* (a whole frame) to the socket, nothing else."""

    def ready(self) -> bool:
        """Whether the socket takes more now (its buffer is under its limit)."""

    def write(self, frame: Frame) -> None:
        """Write *frame*'s bytes to the socket (nothing once it is closing)."""

    def dropped(self, count: int) -> None:
        """Tell the client that *count* frames were dropped (``drop-oldest``)."""


class Outbox:
    """A bounded FIFO of frames for one client.

    *wake* is called when the queue goes from empty to non-empty, and when
    the client overflows, so the driver's sender can wait without polling.
    """

    __slots__ = ("_items", "dropped", "maxsize", "overflowed", "policy", "unreported", "wake",
                 "wire")

    def __init__(
        self,
        maxsize: int,
        policy: Overflow = Overflow.DISCONNECT,
        wake: Callable[[], None] = _nothing,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"queue size must be at least 1, got {maxsize}")
        #: The queued frames; made when the first one must wait (a client
        #: whose socket keeps up never has one, see :class:`Wire`).
        self._items: deque[Frame] | None = None
        self.maxsize = maxsize
        self.policy = Overflow(policy)
        self.wake = wake
        #: Frames dropped under ``drop-oldest``, in total.
        self.dropped = 0
        #: Frames dropped since :meth:`take_unreported` was last called.
        self.unreported = 0
        #: Set under ``disconnect`` when a frame found the queue full.
        self.overflowed = False
        #: The client's socket, when frames may be written to it directly.
        self.wire: Wire | None = None

    def __len__(self) -> int:
        items = self._items
        return len(items) if items is not None else 0

    def _queue(self) -> deque[Frame]:
        items = self._items
        if items is None:
            items = self._items = deque()
        return items

    def _written(self, frame: Frame) -> bool:
        """Write *frame* to the wire now if nothing is queued before it and
        the socket takes it; True if it was."""
        wire = self.wire
        if wire is not None and not self._items and wire.ready():
            wire.write(frame)
            return True
        return False

    def put(self, frame: Frame) -> bool:
        """Queue *frame*; False when the queue was full and the policy is to
        disconnect (the frame is not queued and the client must go)."""
        if self.wire is not None and self._written(frame):
            return True
        items = self._queue()
        if len(items) >= self.maxsize:
            if self.policy is Overflow.DISCONNECT:
                if not self.overflowed:
                    self.overflowed = True
                    self.wake()
                return False
            items.popleft()
            self.dropped += 1
            self.unreported += 1
        items.append(frame)
        if len(items) == 1:
            self.wake()
        return True

    def put_control(self, frame: Frame) -> bool:
        """Queue a reply or notice, past :attr:`maxsize` if need be: a reply
        must not be dropped or lost behind messages. Up to
        :data:`CONTROL_SLACK` frames more are allowed; a client that sends
        requests without reading the replies then overflows whatever the
        policy, and False is returned."""
        if self.wire is not None and self._written(frame):
            return True
        items = self._queue()
        if len(items) >= self.maxsize + CONTROL_SLACK:
            if not self.overflowed:
                self.overflowed = True
                self.wake()
            return False
        items.append(frame)
        if len(items) == 1:
            self.wake()
        return True

    def take(self) -> list[Frame]:
        """Every queued frame, oldest first, leaving the queue empty."""
        items = self._items
        if not items:
            return []
        taken = list(items)
        items.clear()
        return taken

    def attach(self, wire: Wire) -> None:
        """Write to *wire* from now on, starting with what is queued."""
        self.wire = wire
        self.drain()

    def drain(self) -> None:
        """Move queued frames to the wire while it takes them (a ``dropped``
        notice first, if frames were dropped); called again by the wire when
        its socket takes more."""
        wire = self.wire
        if wire is None:
            return
        if self.unreported and wire.ready():
            wire.dropped(self.take_unreported())
        items = self._items
        while items and wire.ready():
            wire.write(items.popleft())
        if items is not None and not items:
            self._items = None  # drained: the memory goes back

    def take_unreported(self) -> int:
        """The number of frames dropped since the last call."""
        n, self.unreported = self.unreported, 0
        return n


class Subscriber:
    """One connected client as the router sees it: its queue and its channels."""

    __slots__ = ("channels", "diverted", "outbox", "transport")

    def __init__(self, outbox: Outbox, transport: str = "websocket") -> None:
        self.outbox = outbox
        #: ``"websocket"`` or ``"sse"``, for the metrics.
        self.transport = transport
        self.channels: set[str] = set()
        #: Channels whose events go to a callback instead of the queue (a
        #: durable channel resumed from a position: the driver merges the
        #: replay with the live events and deduplicates).
        self.diverted: dict[str, Callable[[object], None]] = {}

    def __repr__(self) -> str:
        return f"<Subscriber {self.transport} channels={sorted(self.channels)!r}>"


class Router:
    """The subscriptions of every client, and the fan-out of events to them."""

    def __init__(
        self,
        max_subscriptions: int = 100,
        on_written: Callable[[Frame, int], None] | None = None,
        max_channels: int | None = None,
    ) -> None:
        if max_subscriptions < 1:
            raise ValueError(f"max_subscriptions must be at least 1, got {max_subscriptions}")
        self.max_subscriptions = max_subscriptions
        #: Distinct channels at once, for every client together (None: no limit).
        self.max_channels = max_channels
        #: Told, after each :meth:`publish`, how many sockets the frame was
        #: written to directly (for the metrics: counted once, not per client).
        self.on_written = on_written
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._clients: set[Subscriber] = set()
        self._subscriptions = 0

    # -- state -------------------------------------------------------------

    @property
    def clients(self) -> Collection[Subscriber]:
        """Every attached client."""
        return self._clients

    @property
    def subscriptions(self) -> int:
        """The number of (client, channel) subscriptions."""
        return self._subscriptions

    def channels(self) -> set[str]:
        """The channels with at least one subscriber: what must be LISTENed."""
        return set(self._subscribers)

    def subscribers(self, channel: str) -> Collection[Subscriber]:
        """The clients subscribed to *channel*."""
        return self._subscribers.get(channel, ())

    def missing(self, listening: Collection[str], channels: Iterable[str]) -> list[str]:
        """Which of *channels* the connection must still LISTEN to.

        :raises ProtocolError: they would take the gateway over
            :attr:`max_channels` (checked here, where the LISTEN follows).
        """
        self.check_room(channels)
        return [c for c in channels if c not in listening]

    def check_room(self, channels: Iterable[str]) -> None:
        """:raises ProtocolError: subscribing to *channels* would make more
        than :attr:`max_channels` distinct channels."""
        limit = self.max_channels
        if limit is None:
            return
        new = sum(1 for c in dict.fromkeys(channels) if c not in self._subscribers)
        if new and len(self._subscribers) + new > limit:
            raise ProtocolError(
                f"{new} more channel(s) would take the gateway over its limit of {limit} "
                "distinct channels (max_channels); try again later"
            )

    def orphans(self, listening: Iterable[str]) -> list[str]:
        """Channels the connection listens to that no client wants any more."""
        return [c for c in listening if c not in self._subscribers]

    # -- clients -----------------------------------------------------------

    def attach(self, subscriber: Subscriber) -> None:
        """Add a client with no subscriptions yet."""
        self._clients.add(subscriber)

    def detach(self, subscriber: Subscriber) -> None:
        """Remove a client and all its subscriptions (idempotent)."""
        self._clients.discard(subscriber)
        self.unsubscribe(subscriber, list(subscriber.channels))

    def check_subscribe(self, subscriber: Subscriber, channels: Iterable[str]) -> list[str]:
        """The channels of *channels* that would be new for *subscriber*.

        :raises ProtocolError: they would take it over :attr:`max_subscriptions`,
            or the gateway over :attr:`max_channels`.
        """
        new = self._new_for(subscriber, channels)
        self.check_room(new)
        return new

    def _new_for(self, subscriber: Subscriber, channels: Iterable[str]) -> list[str]:
        new = [c for c in dict.fromkeys(channels) if c not in subscriber.channels]
        total = len(subscriber.channels) + len(new)
        if total > self.max_subscriptions:
            raise ProtocolError(
                f"subscribing to {len(new)} more channel(s) would make {total} "
                f"subscriptions; the limit per client is {self.max_subscriptions}"
            )
        return new

    def subscribe(self, subscriber: Subscriber, channels: Iterable[str]) -> list[str]:
        """Subscribe *subscriber* to *channels*; returns those that were new.

        Call it once the channels are LISTENed to, in the same step as the
        ``subscribed`` reply is queued, so no message precedes that reply.

        :raises ProtocolError: over the subscription limit; nothing changes.
        """
        new = self._new_for(subscriber, channels)
        for channel in new:
            subscriber.channels.add(channel)
            subs = self._subscribers.get(channel)
            if subs is None:
                subs = self._subscribers[channel] = set()
            subs.add(subscriber)
        self._subscriptions += len(new)
        return new

    def unsubscribe(self, subscriber: Subscriber, channels: Iterable[str]) -> list[str]:
        """Remove *channels* from *subscriber*; returns those it had."""
        gone = []
        for channel in dict.fromkeys(channels):
            if channel not in subscriber.channels:
                continue
            subscriber.channels.discard(channel)
            subs = self._subscribers[channel]
            subs.discard(subscriber)
            if not subs:
                del self._subscribers[channel]
            subscriber.diverted.pop(channel, None)
            gone.append(channel)
        self._subscriptions -= len(gone)
        return gone

    # -- fan-out -----------------------------------------------------------

    def publish(
        self, channel: str, frame: Frame, event: object = None
    ) -> tuple[int, list[Subscriber]]:
        """Queue *frame* for every subscriber of *channel* (or hand *event* to
        the subscriber's callback if it diverts the channel).

        Returns how many clients it was written or queued for and the clients
        that overflowed under the ``disconnect`` policy (the driver closes
        them). This loop runs once per client per message: a client with a
        :class:`Wire` that takes more and nothing queued gets the frame's
        bytes written at once, by the same rule as :meth:`Outbox.put`, with
        no call in between.
        """
        subs = self._subscribers.get(channel)
        if not subs:
            return 0, []
        overflowed: list[Subscriber] = []
        queued = written = 0
        data = b""
        for sub in subs:
            if sub.diverted:
                divert = sub.diverted.get(channel)
                if divert is not None:
                    divert(event)
                    continue
            outbox = sub.outbox
            wire = outbox.wire
            if wire is not None and wire.open and not outbox._items:
                if not written:
                    data = frame.ws
                wire.write_bytes(data)
                written += 1
            elif outbox.put(frame):
                queued += 1
            else:
                overflowed.append(sub)
        if written and self.on_written is not None:
            self.on_written(frame, written)
        return queued + written, overflowed

    def broadcast(self, frame: Frame) -> list[Subscriber]:
        """Queue a notice for every client, past a full queue (see
        :meth:`Outbox.put_control`); returns the clients that overflowed."""
        return [sub for sub in self._clients if not sub.outbox.put_control(frame)]
