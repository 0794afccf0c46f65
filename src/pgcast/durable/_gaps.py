"""Where a durable resume starts, and whether it can be complete: pure SQL
and decisions, used by :class:`pgcast.durable._core.DurableState` (the
library's PubSub) and by the gateway's resumes (:mod:`pgcast.gateway._resume`).

**The gap test.** Log ids are global (one sequence for every channel), so
"the oldest id the log holds for the channel is above the position" is not a
gap: the channel may simply have had no message since. The test is exact
instead: *a resume of channel C from position P is incomplete when a message
of C with id > P was deleted.* Every deletion from ``pgcast.log`` (``pgcast
prune``, a hand-written ``DELETE``) is recorded by a statement trigger in
``pgcast.pruned(channel, upto)``: the highest id ever deleted on the channel.
A message of C above P was deleted exactly when ``upto > P``. The replay
query reads ``upto`` and the log rows in *one statement* (one snapshot), so
a prune committing between the check and the read cannot slip through: every
replay batch checks again, and a gap found in the middle of a replay (a
prune racing it) is announced as well. A batch that read no row reads
``upto`` in a second statement: nothing after P was handed out, so a
deletion above P seen then is a gap too (``upto`` only grows, but for a
``TRUNCATE``, which changes the epoch).

**The epoch test.** ``pgcast.meta`` holds the log's epoch, a random id made
when the schema is installed and made anew by a ``TRUNCATE`` of the log
(which also empties ``pgcast.pruned``: its ids belong to the old log). A
position carrying another epoch (``since=Position(id, epoch)``, a consumer
row recorded in another epoch) resumes from the start of the log as it is
now, announced as a gap with reason ``"epoch"``. A position without an epoch
(a bare ``since=ID``, a consumer row from schema version 1) is not checked
for its epoch; it takes the log's epoch at its first replay, so a reset
after that is caught across reconnects.

Schema version 1 has neither table: the version-1 statements below are used
and nothing is checked (a one-time warning names ``pgcast init``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._gap import Gap, GapReason
from ._schema import Query, Steps, check_steps

__all__ = [
    "HEADER_SQL",
    "REPLAY_SQL",
    "Check",
    "consumer_query",
    "decide",
    "replay_query",
    "resume_steps",
]

# A consumer's start: inserted at *since* (or the end of the channel) if new;
# moved to *since* if given (seek, rewind); else its stored position.
_CONSUMER_V1 = """
INSERT INTO pgcast.consumers AS c (name, channel, position)
VALUES (%(name)s, %(channel)s, coalesce(%(since)s::bigint,
    (SELECT max(id) FROM pgcast.log WHERE channel = %(channel)s), 0))
ON CONFLICT (name, channel) DO UPDATE
    SET position = coalesce(%(since)s::bigint, c.position),
        updated_at = CASE WHEN %(since)s::bigint IS NULL THEN c.updated_at ELSE now() END
RETURNING position, NULL::text
"""
_CONSUMER_V2 = """
INSERT INTO pgcast.consumers AS c (name, channel, position, epoch)
VALUES (%(name)s, %(channel)s, coalesce(%(since)s::bigint,
    (SELECT max(id) FROM pgcast.log WHERE channel = %(channel)s), 0),
    coalesce(%(epoch)s::text, (SELECT epoch FROM pgcast.meta)))
ON CONFLICT (name, channel) DO UPDATE
    SET position = coalesce(%(since)s::bigint, c.position),
        epoch = CASE WHEN %(since)s::bigint IS NULL THEN c.epoch
                ELSE coalesce(%(epoch)s::text, (SELECT epoch FROM pgcast.meta)) END,
        updated_at = CASE WHEN %(since)s::bigint IS NULL THEN c.updated_at ELSE now() END
RETURNING position, epoch
"""


def consumer_query(
    version: int, name: str, channel: str, since: int | None, epoch: str | None
) -> Query:
    """The statement returning ``(position, epoch)`` where consumer *name*
    starts on *channel*; *since* moves an existing consumer there."""
    sql = _CONSUMER_V2 if version >= 2 else _CONSUMER_V1
    return sql, {"name": name, "channel": channel, "since": since, "epoch": epoch}


#: The replay of schema version 1 (no header): ``(inline, channel, start, batch)``.
REPLAY_SQL = (
    "SELECT id, pid, CASE WHEN octet_length(payload) <= %s THEN payload END "
    "FROM pgcast.log WHERE channel = %s AND id > %s ORDER BY id LIMIT %s"
)
# The first row carries the header: the log's epoch, the highest id deleted
# on the channel, its oldest id (uncorrelated subqueries: computed once per
# statement, in the statement's snapshot; see the module docstring); the
# other rows carry NULLs, which cost the client nothing to decode. A position
# of another epoch reads from 0. The rows are the index scan of version 1.
_START = """CASE
    WHEN %(epoch)s::text IS NULL OR %(epoch)s::text = (SELECT epoch FROM pgcast.meta)
    THEN %(start)s::bigint ELSE 0 END"""
_FIRST = f"""id = (SELECT min(id) FROM pgcast.log
                   WHERE channel = %(channel)s AND id > {_START})"""
_REPLAY_V2 = f"""
SELECT id, pid, CASE WHEN octet_length(payload) <= %(inline)s THEN payload END,
       CASE WHEN {_FIRST} THEN (SELECT epoch FROM pgcast.meta) END,
       CASE WHEN {_FIRST} THEN (SELECT upto FROM pgcast.pruned WHERE channel = %(channel)s) END,
       CASE WHEN {_FIRST} THEN (SELECT min(id) FROM pgcast.log WHERE channel = %(channel)s) END
FROM pgcast.log
WHERE channel = %(channel)s AND id > {_START}
ORDER BY id LIMIT %(batch)s
"""
#: The header alone, for a replay that read no row (then no row was handed
#: out, so a deletion seen in a later snapshot is a gap all the same).
HEADER_SQL = """
SELECT NULL, NULL, (SELECT epoch FROM pgcast.meta),
       (SELECT upto FROM pgcast.pruned WHERE channel = %(channel)s),
       (SELECT min(id) FROM pgcast.log WHERE channel = %(channel)s)
"""


def replay_query(
    version: int, channel: str, start: int, epoch: str | None, *, batch: int, inline: int
) -> Query:
    """The statement reading at most *batch* rows ``(id, pid, payload or
    None)`` of *channel* after *start*; from version 2 the first row goes on
    with ``epoch, upto, oldest`` (see :func:`decide`; :data:`HEADER_SQL`
    when there is no row)."""
    if version < 2:
        return REPLAY_SQL, (inline, channel, start, batch)
    return _REPLAY_V2, {"channel": channel, "start": start, "epoch": epoch, "batch": batch,
                        "inline": inline}


@dataclass(frozen=True, slots=True)
class Check:
    """What a header row says about a resume of one channel."""

    gap: Gap | None
    """The gap to announce, if any."""
    start: int
    """Where the replay really starts (0 after an epoch change)."""
    epoch: str | None
    """The log's epoch now."""
    upto: int
    """The highest id ever deleted on the channel (0: none)."""


def decide(
    channel: str,
    start: int,
    epoch: str | None,
    header: Sequence[Any],
    announced: int = 0,
) -> Check:
    """Decide from a header row whether resuming *channel* from *start*
    (of *epoch*, ``None``: unknown) misses messages. *announced*: the
    highest deleted id already announced for this channel (no second gap for
    the same deletion)."""
    now, upto_, oldest_ = header[2], header[3], header[4]
    upto = int(upto_) if upto_ is not None else 0
    oldest = int(oldest_) if oldest_ is not None else None
    reason: GapReason | None = None
    if epoch is not None and now is not None and epoch != now:
        reason, real_start = "epoch", 0
    else:
        real_start = start
        if upto > start and upto > announced:
            reason = "pruned"
    gap = None if reason is None else Gap(channel, start, oldest, reason, now)
    return Check(gap, real_start, now, upto)


_HEADERS = """
SELECT NULL, NULL, (SELECT epoch FROM pgcast.meta),
       (SELECT p.upto FROM pgcast.pruned AS p WHERE p.channel = c.channel),
       (SELECT min(l.id) FROM pgcast.log AS l WHERE l.channel = c.channel),
       c.channel
FROM unnest(%s::text[]) AS c(channel)
"""


def resume_steps(
    positions: dict[str, int], epoch: str | None
) -> Steps[tuple[int, str | None, dict[str, Check]]]:
    """Check, without reading any message, resumes of *positions* (channel:
    id, of *epoch*): the gateway's answer to a subscribe, before its replay.
    Returns the schema version, the log's epoch (``None`` before version 2),
    and per channel its :class:`Check` (none before version 2: unknown).
    With no positions, only the epoch is read.

    :raises SchemaError: the schema is not installed.
    """
    version = yield from check_steps()
    if version < 2:
        return version, None, {}
    if not positions:
        rows = yield ("SELECT epoch FROM pgcast.meta", None)
        return version, (rows[0][0] if rows else None), {}
    rows = yield (_HEADERS, (list(positions),))
    checks = {row[5]: decide(row[5], positions[row[5]], epoch, row) for row in rows}
    now = rows[0][2] if rows else None
    return version, now, checks
