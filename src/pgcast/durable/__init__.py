"""Durable channels and payloads of any size: the schema, retention, drivers.

A *durable* message is stored in the table ``pgcast.log`` and announced by a
NOTIFY carrying its id, in the same transaction (one statement:
``SELECT pgcast.notify(channel, payload)``, also callable from SQL and
triggers). A listener of a durable channel
(``ps.listen(channel, durable=True, since=ID)``, or with
``consumer="name"``, whose position is kept in ``pgcast.consumers`` and
advanced by ``ps.ack(event)``) replays from the log what it missed, offline
or across reconnects, then continues live: per channel in commit order, with
no gap and no duplicate. How that is guaranteed is explained in
:mod:`pgcast.durable._core`, which holds all the logic; this module only
runs it against a connection.

What "exactly once" covers: within the life of a PubSub, every durable
message of a durable channel is handed out once, across any number of
reconnects (the replay starts after the last message received, and comes
before the :class:`~pgcast.Reconnected` marker). A named consumer that
stops and starts again resumes after its last :meth:`~pgcast.PubSub.ack`:
what it received but did not acknowledge comes again (at least once across
restarts, as with any consumer offset). Without *since* or a consumer, a
durable listen starts at the end of the log and replays only across
reconnects.

A payload too large for NOTIFY (8000 bytes of UTF-8 or more) is stored the
same way, and a receiving PubSub fetches it before handing the event out:
:meth:`pgcast.PubSub.notify` takes payloads of any size. Such a message is in
the log, so it is durable too. Events that went through the log are
:class:`pgcast.DurableEvent`: an :class:`~pgcast.Event` with an ``id``.

**The schema** lives in its own schema, ``pgcast``, versioned by
``pgcast.schema_version``: :func:`install_schema` (or ``pgcast init``)
applies the migrations this release knows, in one transaction, serialised by
an advisory lock, and does nothing when the schema is up to date. A PubSub
runs no DDL unless asked: one that needs the schema and finds it missing (or
older) raises a :class:`~pgcast.SchemaError` saying to run ``pgcast init``,
unless opened with ``connect(..., install_schema=True)``; then it installs it
itself, and a role that may not create it gets a :class:`~pgcast.SchemaError`
saying to run ``pgcast init`` as one that may.

**Retention**: nothing is deleted by itself. :func:`prune` (``pgcast prune``)
deletes messages older than :data:`DEFAULT_RETENTION` (7 days) unless told
otherwise, optionally keeping the newest *keep_last* of every channel
whatever their age. Run it from cron or a scheduler. Prune waits for named
consumers: what one has not acknowledged is kept, unless ``force=True`` or
it is older than ``max_age``; the consumers that lose messages that way are
reported (:class:`PruneResult`).

**Gaps and epochs** (schema version 2): every deletion from the log is
recorded per channel, and the log has an *epoch*, made anew when it is
truncated. A resume that cannot be complete (a position before deleted
messages, or from another epoch) is announced by a :class:`pgcast.Gap`
marker before the replay; see :mod:`pgcast.durable._core`.
"""

from __future__ import annotations

from ._lag import ConsumerLag
from ._maintenance import schema_error
from ._run import consumers, drive, install_schema, prune
from ._run_async import drive as adrive
from ._run_async import install_schema as install_schema_async
from ._run_async import prune as prune_async
from ._schema import (
    DEFAULT_RETENTION,
    LATEST_VERSION,
    LeftBehind,
    PruneResult,
    parse_duration,
)

# The asyncio functions are under pgcast.aio, by the sync names
# (pgcast.aio.install_schema, .prune, .consumers, .drive); adrive,
# install_schema_async and prune_async are the names they had here before,
# kept for code written then.
__all__ = [
    "DEFAULT_RETENTION",
    "LATEST_VERSION",
    "ConsumerLag",
    "LeftBehind",
    "PruneResult",
    "adrive",
    "consumers",
    "drive",
    "install_schema",
    "install_schema_async",
    "parse_duration",
    "prune",
    "prune_async",
    "schema_error",
]
