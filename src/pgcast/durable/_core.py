"""The I/O-free part of durable channels and large payloads.

Everything a durable PubSub decides without a socket lives here, once, for the
sync and the asyncio drivers (:mod:`pgcast.client`, :mod:`pgcast.aio`) and for
:mod:`pgcast.durable`:

* (the schema's SQL and retention are in :mod:`pgcast.durable._schema`);
* (re-exported from :mod:`pgcast.durable._publish`) the *reference payload*,
  what NOTIFY carries for a message kept in the log (:func:`ref_payload`,
  :func:`parse_ref`), and :func:`publish_query`: whether a message can go out
  as a plain NOTIFY or must go through the log, and the statement either way;
* :class:`DurableState`: per durable channel, the position reached, the
  switch-over from replay to live, and the duplicates it removes.

Work that needs the database is written as *steps*: a generator that yields
``(sql, params)`` and is sent back the rows, which a driver runs with its own
connection (as psycopg's ``generators.py`` is run by its sync and async
waiters). So the replay logic exists once.

**Commit order.** Ids come from a sequence, and a sequence hands out ids in
the order transactions *ask*, not the order they *commit*: the transaction
holding id 10 can commit after the one holding 11. A listener that replays
``id > 10`` after seeing 11 would then skip 10 for ever. pgcast closes that gap
at the source: every insert into the log first takes a transaction-level
advisory lock on its channel (``pgcast.notify`` in SQL), held until commit. On
one channel, a transaction can only draw an id after the previous one has
committed and become visible, so id order *is* commit order, and every
snapshot sees, per channel, a prefix of the log with no holes. Replay is then
just ``WHERE channel = $1 AND id > $2 ORDER BY id``, and the live stream,
which PostgreSQL delivers in commit order, has increasing ids: anything at or
below the position reached is a duplicate. The price is that durable
publishers of one channel commit one at a time (NOTIFY already serialises all
notifying commits on a global lock, so for short transactions this costs
little); a long transaction that publishes durably holds its channel's lock
until it ends. Ordering is guaranteed per channel, not across channels.

**Switching from replay to live.** A durable channel is LISTENed *first*, then
replayed: everything committed before a replay query is in its result,
everything committed after arrives as a notification. While a channel is
replaying, its live notifications are dropped, only their highest id kept
(``seen``); a replay batch shorter than the batch size means the log is read
up to that query, and the channel goes live once the position covers every id
seen. Then live notifications at or below the position are duplicates. The
log is read a batch at a time as the events are handed out, so however long
the replay, memory holds about one batch; only after a reconnect is up to
:data:`BATCHES_BEFORE_MARKER` batches read at once, so that what was missed
comes before the :class:`~pgcast.Reconnected` marker (a longer gap goes on
after it, in order all the same).

**Gaps.** Every replay batch (schema version 2) reads, in the same statement
as its rows, the log's epoch and the highest id ever deleted on the channel;
a resume that cannot be complete (messages of the channel after the
position were deleted, or the position belongs to another epoch) puts a
:class:`~pgcast.Gap` in the inbox before the replayed events, once per
deletion: whether the position came from ``since=``, a consumer's row, or
the position reached before a reconnect, it is the same replay, so the
same check. The exact test (ids are global across channels, so "the
channel's oldest id is above the position" would be a false alarm) and the
epochs are explained in :mod:`pgcast.durable._gaps`. A reset of the log
*while* a channel is live (``TRUNCATE ... RESTART IDENTITY``) is seen at
the next replay (a reconnect): until then its new, lower ids look like
duplicates.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .._event import DurableEvent, Event, Position
from .._gap import Gap, Marker
from ._gaps import HEADER_SQL, REPLAY_SQL, consumer_query, decide, replay_query
from ._publish import needs_log, parse_ref, publish_many_query, publish_query, ref_payload
from ._schema import (
    INLINE_LIMIT,
    LATEST_VERSION,
    REF_PREFIX,
    Query,
    Steps,
)

__all__ = [
    "BATCHES_BEFORE_MARKER",
    "INLINE_LIMIT",
    "REF_PREFIX",
    "REPLAY_SQL",
    "DurableState",
    "Unfetched",
    "check_consumer",
    "check_since",
    "needs_log",
    "parse_ref",
    "publish_many_query",
    "publish_query",
    "ref_payload",
]

logger = logging.getLogger("pgcast")

#: Replay reads the log this many rows at a time.
REPLAY_BATCH = 1000
#: After a reconnect, at most this many batches are replayed before the
#: marker is delivered (the rest follows it, a batch at a time).
BATCHES_BEFORE_MARKER = 100
#: Replayed payloads larger than this are fetched one at a time as they are
#: handed out, so a batch never holds more than about this much per row.
REPLAY_INLINE_BYTES = 64 * 1024

# -- consumers and retention ---------------------------------------------------


def check_consumer(name: object) -> str:
    """Validate a consumer name: a non-empty str without NUL, at most 200 chars."""
    if not isinstance(name, str):
        raise TypeError(f"consumer must be a str, not {type(name).__name__}")
    if not name or "\x00" in name or len(name) > 200:
        raise ValueError(
            f"consumer name must be 1 to 200 characters without NUL, got {name!r}"
        )
    return name


def check_since(since: object) -> Position | None:
    """Validate ``since=``: a log id (an int >= 0) or a :class:`~pgcast.Position`."""
    if since is None:
        return None
    if isinstance(since, Position):
        id, epoch = since
        if not (isinstance(id, int) and not isinstance(id, bool) and id >= 0) or not (
            epoch is None or (isinstance(epoch, str) and epoch)
        ):
            raise ValueError(
                "since must be a log id (an int >= 0) or a pgcast.Position(id, epoch) "
                f"with a non-empty str epoch, got {since!r}"
            )
        return since
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise ValueError(
            f"since must be a log id (an int >= 0) or a pgcast.Position, got {since!r}"
        )
    return Position(since)


# -- receiving -----------------------------------------------------------------


class Unfetched(DurableEvent):
    """A log message whose payload is still in the database: the driver
    fetches it (:meth:`DurableState.fetch_steps`) before handing it out."""


@dataclass(slots=True)
class _Stream:
    consumer: str | None
    # The highest id handed to the inbox or covered by a replay; None until
    # the start position is known.
    last: int | None = None
    replaying: bool = True
    seen: int = 0  # the highest live id dropped while replaying
    busy: bool = False  # a replay query for it is running
    # The log's epoch the position belongs to (None: not known yet).
    epoch: str | None = None
    # The highest deleted id already announced by a Gap (see _gaps).
    announced: int = 0


_END_SQL = "SELECT coalesce(max(id), 0) FROM pgcast.log WHERE channel = %s"


class DurableState:
    """The durable channels of one PubSub and what was received on them.

    Thread safe: the sync driver's reading thread admits notifications while
    another thread may apply a replay batch.

    A durable listen is three steps: :meth:`plan_subscribe` (before the
    LISTEN: from then on, live notifications of the channel are held back),
    the LISTEN itself, then :meth:`subscribe_steps` (the start position and a
    first replay batch). :meth:`replay_steps` reads the next batches.
    """

    __slots__ = ("_lock", "epoch", "gaps", "inbox", "schema_ready", "streams", "version")

    def __init__(self, inbox: deque[Event | Marker]) -> None:
        self.inbox = inbox
        self.streams: dict[str, _Stream] = {}
        #: Whether this connection's server was checked to have the schema.
        self.schema_ready = False
        #: The schema version found (gaps and epochs are checked from 2 on).
        self.version = LATEST_VERSION
        #: The log's epoch as last read (None: not read yet, or version 1).
        self.epoch: str | None = None
        #: Gaps put in the inbox and not yet passed to ``on_gap``.
        self.gaps: list[Gap] = []
        self._lock = threading.Lock()

    # -- live ------------------------------------------------------------

    def admit(self, channel: str, text: str, pid: int, trusted: bool = False) -> None:
        """Take one notification whose payload starts with the reference
        prefix into the inbox: decoded, and on durable channels deduplicated
        (or dropped while the channel replays: the replay brings it).

        On a durable channel a reference is only a hint that the log has
        more: the channel reads the log from the position it reached (one
        query for all that arrived meanwhile, run by the driver as a replay),
        and only rows read from the log move the position or are handed out.
        A reference forged by a plain NOTIFY (any payload starting
        ``"\x1epgcast:"``) can therefore neither skip real messages (a huge
        id), nor be stored by ``ack()``, nor pass its own text off as a
        durable message. *trusted*: *text* comes from a durable PubSub that
        already read it from the log (the gateway's fan-out): taken as it is.
        """
        ref = parse_ref(text)
        if ref is None:
            self.inbox.append(Event(channel, text, pid))
            return
        id, payload = ref
        stream = self.streams.get(channel)
        if stream is None:
            self.inbox.append(Unfetched(channel, "", pid, id, self.epoch) if payload is None
                              else DurableEvent(channel, payload, pid, id, self.epoch))
            return
        with self._lock:
            if stream.replaying:
                stream.seen = max(stream.seen, id)
                return
            assert stream.last is not None
            if id <= stream.last:
                return
            if not trusted or payload is None:
                stream.replaying = True  # read the log: see the docstring
                stream.seen = id
                return
            stream.last = id
            self.inbox.append(DurableEvent(channel, payload, pid, id, stream.epoch))

    # -- subscriptions ---------------------------------------------------

    def plan_subscribe(
        self,
        channels: Sequence[str],
        durable: bool,
        since: int | Position | None,
        consumer: str | None,
    ) -> list[str]:
        """Validate the durable part of a listen (*channels* are valid names)
        and hold back the live notifications of the channels to make durable,
        which it returns, in order, without repeats. Call before the LISTEN."""
        if not durable:
            if since is not None or consumer is not None:
                raise ValueError("since and consumer need durable=True")
            return []
        check_since(since)
        if consumer is not None:
            check_consumer(consumer)
        new = []
        for channel in dict.fromkeys(channels):
            stream = self.streams.get(channel)
            if stream is None or stream.last is None:  # new, or a failed listen
                new.append(channel)
            elif stream.consumer != consumer or since is not None:
                raise ValueError(
                    f"channel {channel!r} is already listened to durably"
                    + (f" as consumer {stream.consumer!r}" if stream.consumer else "")
                    + "; unlisten it first to change where it starts"
                )
        with self._lock:
            for channel in new:
                self.streams[channel] = _Stream(consumer)
        return new

    def subscribe_steps(
        self,
        channels: Sequence[str],
        since: int | Position | None,
        consumer: str | None,
        batch: int = REPLAY_BATCH,
        announced: dict[str, int] | None = None,
    ) -> Steps[int]:
        """Find where each of *channels* (from :meth:`plan_subscribe`) starts,
        then replay a first batch. Run after the channels were LISTENed:
        whatever commits after the start position is read is then either
        replayed or notified. *since* moves an existing *consumer* there.
        *announced*: per channel, the deleted id up to which a gap was
        already announced otherwise (the gateway's ``subscribed`` reply).
        Returns how many events the first batch added."""
        position = check_since(since)
        for channel in channels:
            epoch = None
            if consumer is not None:
                rows = yield consumer_query(
                    self.version, consumer, channel,
                    None if position is None else position.id,
                    None if position is None else position.epoch,
                )
                start, epoch = int(rows[0][0]), rows[0][1]
            elif position is not None:
                start, epoch = position
            else:
                rows = yield (_END_SQL, (channel,))
                start = int(rows[0][0])
            with self._lock:
                stream = self.streams.get(channel)
                if stream is not None and stream.last is None:
                    stream.last = start
                    stream.epoch = epoch
                    stream.announced = (announced or {}).get(channel, 0)
        return (yield from self.replay_steps(batch))

    def abandon(self, channels: Iterable[str]) -> None:
        """A durable listen failed: forget *channels*, the ones
        :meth:`plan_subscribe` returned, as if it had not been called."""
        self.forget(channels)

    def forget(self, channels: Iterable[str] | None) -> None:
        """The channels were unlistened (``None``: all of them)."""
        with self._lock:
            if channels is None:
                self.streams.clear()
            else:
                for channel in channels:
                    self.streams.pop(channel, None)

    def reconnected(self) -> None:
        """A new connection replaces a lost one; call it *before* its channels
        are LISTENed again. Each durable channel replays from the position it
        reached, and holds back live notifications until it caught up."""
        with self._lock:
            self.schema_ready = False
            for stream in self.streams.values():
                if stream.last is not None:
                    stream.replaying = True
                    stream.busy = False
                    stream.seen = stream.last

    # -- replay ----------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Whether a durable channel is replaying and no query for it runs."""
        return any(
            s.replaying and not s.busy and s.last is not None for s in self.streams.values()
        )

    def replay_steps(self, batch: int = REPLAY_BATCH) -> Steps[int]:
        """Read one batch (at most *batch* rows) of the log for one replaying
        channel into the inbox; return how many events it added."""
        with self._lock:
            picked = next(
                (
                    (c, s)
                    for c, s in self.streams.items()
                    if s.replaying and not s.busy and s.last is not None
                ),
                None,
            )
            if picked is None:
                return 0
            channel, stream = picked
            assert stream.last is not None
            stream.busy = True
            start, seen_before, epoch = stream.last, stream.seen, stream.epoch
        version = self.version
        header: Sequence[object] | None = None
        try:
            rows = yield replay_query(
                version, channel, start, epoch, batch=batch, inline=REPLAY_INLINE_BYTES
            )
            if version >= 2:
                # The first row carries the header; none read: its own statement.
                header = (None, None, *rows[0][3:6]) if rows else (
                    yield (HEADER_SQL, {"channel": channel}))[0]
        finally:
            stream.busy = False
        with self._lock:
            if self.streams.get(channel) is not stream or stream.last != start:
                return 0  # unlistened, or replayed by another thread, meanwhile
            append = self.inbox.append
            if header is not None:
                check = decide(channel, start, epoch, header, stream.announced)
                self.epoch = stream.epoch = check.epoch
                start = check.start
                if check.gap is not None:
                    # Announced before the replayed events: see pgcast._gap.
                    stream.announced = max(stream.announced, check.upto)
                    append(check.gap)
                    self.gaps.append(check.gap)
            epoch = stream.epoch
            # Fixed-arity unpacking, no list per row: the replay's hot loop.
            if header is None:  # schema version 1: three columns
                for id, pid, payload in rows:
                    append(DurableEvent(channel, payload, pid, id, epoch) if payload is not None
                           else Unfetched(channel, "", pid, id, epoch))
            else:
                for id, pid, payload, _, _, _ in rows:
                    append(DurableEvent(channel, payload, pid, id, epoch) if payload is not None
                           else Unfetched(channel, "", pid, id, epoch))
            last: int = rows[-1][0] if rows else start
            # Only rows read move the position, never an id a notification
            # named: a reference seen before this query was sent is in its
            # result, pruned, or not pgcast's (forged), so a short batch
            # catches the channel up, unless a reference beyond what it read
            # arrived while it ran (then one more query).
            if len(rows) < batch and (stream.seen == seen_before or stream.seen <= last):
                stream.replaying = False
            stream.last = last
            return len(rows)

    # -- large payloads and acknowledgements -----------------------------

    @staticmethod
    def fetch_steps(event: Unfetched) -> Steps[DurableEvent | None]:
        """Fetch the payload of *event*; ``None`` if it was pruned meanwhile."""
        # On the notification's own channel only: a reference payload forged
        # by a plain NOTIFY must not read another channel's messages.
        rows = yield (
            "SELECT payload FROM pgcast.log WHERE id = %s AND channel = %s",
            (event.id, event.channel),
        )
        if not rows:
            logger.warning(
                "pgcast: message %d on %r is not in the log (pruned before it could "
                "be read, or a reference payload not sent by pgcast); skipped",
                event.id, event.channel,
            )
            return None
        return DurableEvent(event.channel, rows[0][0], event.pid, event.id, event.epoch)

    def fetch_or_gap_steps(self, event: Unfetched) -> Steps[DurableEvent | Gap | None]:
        """:meth:`fetch_steps`; but a message of a durable channel that the
        replay read and that was deleted before its payload could be fetched
        is a :class:`~pgcast.Gap` (``since`` the id before it), not a silent
        skip (it is also queued for ``on_gap``)."""
        fetched = yield from self.fetch_steps(event)
        if fetched is not None or event.channel not in self.streams or self.version < 2:
            return fetched
        rows = yield ("SELECT min(id) FROM pgcast.log WHERE channel = %s", (event.channel,))
        oldest = rows[0][0] if rows and rows[0][0] is not None else None
        gap = Gap(event.channel, event.id - 1, oldest, "pruned", event.epoch)
        self.gaps.append(gap)
        return gap

    def ack_query(self, event: Event) -> Query:
        """The statement recording that *event* (and all before it on its
        channel) was processed by the channel's consumer."""
        id = getattr(event, "id", None)
        if not isinstance(event, Event) or id is None:
            raise TypeError(f"only events of durable channels can be acknowledged, not {event!r}")
        stream = self.streams.get(event.channel)
        if stream is None or stream.consumer is None:
            raise ValueError(
                f"channel {event.channel!r} is not listened to with a consumer: "
                "use listen(channel, durable=True, consumer=NAME)"
            )
        epoch = getattr(event, "epoch", None)
        if self.version < 2:
            return (
                "UPDATE pgcast.consumers SET position = greatest(position, %s), "
                "updated_at = now() WHERE name = %s AND channel = %s",
                (id, stream.consumer, event.channel),
            )
        # A position of another epoch is replaced, not compared (ids of a
        # reset log may be lower).
        return (
            "UPDATE pgcast.consumers SET position = CASE WHEN %(epoch)s::text IS NOT NULL "
            "AND epoch IS DISTINCT FROM %(epoch)s::text THEN %(id)s "
            "ELSE greatest(position, %(id)s) END, "
            "epoch = coalesce(%(epoch)s::text, epoch), updated_at = now() "
            "WHERE name = %(name)s AND channel = %(channel)s",
            {"id": id, "epoch": epoch, "name": stream.consumer, "channel": event.channel},
        )
