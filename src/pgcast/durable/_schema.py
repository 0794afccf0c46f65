"""The ``pgcast`` schema as data, and retention: pure, no I/O.

The SQL of every schema version (:data:`MIGRATIONS`, append-only), the steps
that apply them (:func:`install_steps`, run by a driver inside one
transaction), the statement that prunes the log (:func:`prune_query`), and the
constants the SQL and :mod:`pgcast.durable._core` share: the reference
payload prefix and the inline limit. Why the log is written under a
per-channel advisory lock is explained in :mod:`pgcast.durable._core`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeAlias, TypeVar

from .._channels import check_channel
from .._errors import SchemaError
from .._payload import MAX_PAYLOAD_BYTES

__all__ = [
    "DEFAULT_RETENTION",
    "INLINE_LIMIT",
    "LATEST_VERSION",
    "LOCK_NAMESPACE",
    "MIGRATIONS",
    "OLDEST_WORKING_VERSION",
    "REF_PREFIX",
    "LeftBehind",
    "Migration",
    "PruneResult",
    "Query",
    "Rows",
    "Steps",
    "check_steps",
    "install_steps",
    "parse_duration",
    "prune_query",
    "warn_old_schema",
]

T = TypeVar("T")

logger = logging.getLogger("pgcast")

#: A statement and its parameters (``None``: none, sent with the simple protocol).
Query: TypeAlias = tuple[str, Sequence[Any] | Mapping[str, Any] | None]
#: The rows a driver sends back into the steps (empty for a statement without).
Rows: TypeAlias = list[tuple[Any, ...]]
#: Database work as a generator: yields queries, is sent their rows, returns a T.
Steps: TypeAlias = Generator[Query, Rows, T]

#: How long ``pgcast prune`` keeps messages when not told otherwise.
DEFAULT_RETENTION = timedelta(days=7)

#: What NOTIFY carries for a message kept in the log: this prefix, the id, and
#: then either ``:`` and the payload itself (when it fits, so that receivers
#: need no query) or nothing (the receiver fetches the row). The first
#: character is ASCII "record separator", which no ordinary text starts with;
#: a plain payload that does is sent through the log, so that what a pgcast
#: receiver sees is never ambiguous.
REF_PREFIX = "\x1epgcast:"
# The longest prefix + id + ":" (a bigint has at most 19 digits).
_REF_OVERHEAD = len(REF_PREFIX) + 19 + 1
#: Payloads of fewer bytes than this ride inline in the reference notification.
INLINE_LIMIT = MAX_PAYLOAD_BYTES - _REF_OVERHEAD

# The first key of pgcast's two-key advisory locks ("pgca"), so they never
# collide with an application's own advisory locks.
LOCK_NAMESPACE = 0x70676361
# The second key of the lock serialising schema installs.
_INSTALL_LOCK = 0


# -- the schema ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema's history; never edited once released."""

    version: int
    description: str
    sql: str


_V1 = rf"""
CREATE TABLE pgcast.log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel    text NOT NULL,
    payload    text NOT NULL,
    pid        integer NOT NULL DEFAULT pg_backend_pid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX log_channel_id ON pgcast.log (channel, id);
CREATE INDEX log_created_at ON pgcast.log USING brin (created_at);
COMMENT ON TABLE pgcast.log IS
    'pgcast durable messages and payloads too large for NOTIFY; '
    'insert only through pgcast.notify(), pruned by pgcast prune';

CREATE TABLE pgcast.consumers (
    name       text NOT NULL,
    channel    text NOT NULL,
    position   bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, channel)
);
COMMENT ON TABLE pgcast.consumers IS
    'pgcast named consumers: the last log id each has acknowledged, per channel';

CREATE FUNCTION pgcast.notify(channel text, payload text, durable boolean DEFAULT true)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    new_id bigint;
BEGIN
    payload := coalesce(payload, '');
    IF NOT durable AND octet_length(payload) < {MAX_PAYLOAD_BYTES}
            AND left(payload, 1) <> E'\x1e' THEN
        PERFORM pg_notify(channel, payload);
        RETURN NULL;
    END IF;
    -- Held to commit: on one channel, id order is commit order (see pgcast docs).
    PERFORM pg_advisory_xact_lock({LOCK_NAMESPACE}, hashtext(channel));
    INSERT INTO pgcast.log (channel, payload) VALUES (channel, payload)
        RETURNING id INTO new_id;
    IF octet_length(payload) < {INLINE_LIMIT} THEN
        PERFORM pg_notify(channel, E'\x1epgcast:' || new_id || ':' || payload);
    ELSE
        PERFORM pg_notify(channel, E'\x1epgcast:' || new_id);
    END IF;
    RETURN new_id;
END
$fn$;
COMMENT ON FUNCTION pgcast.notify(text, text, boolean) IS
    'Send a message of any size on a channel; durable ones are kept in pgcast.log '
    'for replay. Returns the log id, or NULL for a plain NOTIFY.';

CREATE FUNCTION pgcast.notify_many(channels text[], payloads text[],
                                   durable boolean DEFAULT true)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    n integer := coalesce(cardinality(channels), 0);
    i integer;
    last_id bigint;
BEGIN
    IF n <> coalesce(cardinality(payloads), 0) THEN
        RAISE EXCEPTION 'pgcast.notify_many: % channels but % payloads',
            n, coalesce(cardinality(payloads), 0);
    END IF;
    -- Every lock up front and in one order, so two callers cannot deadlock.
    PERFORM pg_advisory_xact_lock({LOCK_NAMESPACE}, h)
    FROM (SELECT DISTINCT hashtext(c) AS h
          FROM unnest(channels, payloads) AS t(c, p)
          WHERE durable OR octet_length(p) >= {MAX_PAYLOAD_BYTES} OR left(p, 1) = E'\x1e'
          ORDER BY 1) AS locks;
    IF durable THEN
        WITH ins AS (
            INSERT INTO pgcast.log (channel, payload)
            SELECT c, coalesce(p, '')
            FROM unnest(channels, payloads) WITH ORDINALITY AS t(c, p, k)
            ORDER BY k
            RETURNING id, channel, payload
        )
        SELECT max(id) INTO last_id FROM (
            SELECT id, pg_notify(channel, CASE WHEN octet_length(payload) < {INLINE_LIMIT}
                THEN E'\x1epgcast:' || id || ':' || payload
                ELSE E'\x1epgcast:' || id END)
            FROM ins ORDER BY id) AS sent;
        RETURN last_id;
    END IF;
    FOR i IN 1 .. n LOOP
        last_id := coalesce(pgcast.notify(channels[i], payloads[i], false), last_id);
    END LOOP;
    RETURN last_id;
END
$fn$;
COMMENT ON FUNCTION pgcast.notify_many(text[], text[], boolean) IS
    'pgcast.notify() for many messages in array order; returns the last log id';
"""

# Version 2: the log's epoch and what was deleted from it. Both are written by
# triggers, so that nothing that removes rows (pgcast prune, a hand-written
# DELETE, a TRUNCATE) escapes them: see pgcast.durable._core's docstring.
_V2 = """
CREATE TABLE pgcast.meta (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    epoch      text NOT NULL,
    epoch_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgcast.meta IS
    'pgcast: the epoch of pgcast.log, made anew whenever the log is truncated';
INSERT INTO pgcast.meta (epoch) VALUES (left(md5(random()::text || clock_timestamp()::text), 16));

CREATE TABLE pgcast.pruned (
    channel    text PRIMARY KEY,
    upto       bigint NOT NULL,
    pruned_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgcast.pruned IS
    'pgcast: per channel, the highest log id ever deleted (a position below it lost messages)';

ALTER TABLE pgcast.consumers ADD COLUMN epoch text;
COMMENT ON COLUMN pgcast.consumers.epoch IS
    'the log epoch the position belongs to (NULL: recorded before schema version 2)';

CREATE FUNCTION pgcast.record_pruned() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO pgcast.pruned AS p (channel, upto)
        SELECT channel, max(id) FROM gone GROUP BY channel
    ON CONFLICT (channel) DO UPDATE
        SET upto = greatest(p.upto, excluded.upto), pruned_at = now();
    RETURN NULL;
END
$fn$;
CREATE TRIGGER log_deleted AFTER DELETE ON pgcast.log
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION pgcast.record_pruned();

CREATE FUNCTION pgcast.new_epoch() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE pgcast.meta
        SET epoch = left(md5(random()::text || clock_timestamp()::text), 16), epoch_at = now();
    DELETE FROM pgcast.pruned;
    RETURN NULL;
END
$fn$;
CREATE TRIGGER log_truncated AFTER TRUNCATE ON pgcast.log
    FOR EACH STATEMENT EXECUTE FUNCTION pgcast.new_epoch();
"""

#: The schema's history, oldest first. A release only ever appends.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "log, consumers, notify() and notify_many()", _V1),
    Migration(2, "log epoch (pgcast.meta), pruned positions, consumers' epoch", _V2),
)
#: The schema version this pgcast installs and expects.
LATEST_VERSION = MIGRATIONS[-1].version

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS pgcast;
CREATE TABLE IF NOT EXISTS pgcast.schema_version (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
"""
_VERSION_SQL = "SELECT coalesce(max(version), 0) FROM pgcast.schema_version"
_EXISTS_SQL = "SELECT to_regclass('pgcast.schema_version') IS NOT NULL"


def _check_not_newer(version: int) -> int:
    if version > LATEST_VERSION:
        raise SchemaError(
            f"the pgcast schema in this database is at version {version}, newer than "
            f"this pgcast knows (version {LATEST_VERSION}): upgrade pgcast"
        )
    return version


def install_steps() -> Steps[int]:
    """Bring the ``pgcast`` schema up to :data:`LATEST_VERSION`; return the
    version found before.

    The driver runs these steps inside one transaction, so a migration is
    applied whole or not at all. Up to date, nothing is locked or written;
    otherwise an advisory lock makes concurrent installers take turns, and
    the version is read again under it.
    """
    exists = yield (_EXISTS_SQL, None)
    if exists[0][0]:
        found = yield (_VERSION_SQL, None)
        if _check_not_newer(found[0][0]) == LATEST_VERSION:
            return LATEST_VERSION
    yield ("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, _INSTALL_LOCK))
    yield (_BOOTSTRAP, None)
    found = yield (_VERSION_SQL, None)
    before: int = _check_not_newer(found[0][0])
    for migration in MIGRATIONS:
        if migration.version > before:
            yield (migration.sql, None)
            yield (
                "INSERT INTO pgcast.schema_version (version, description) VALUES (%s, %s)",
                (migration.version, migration.description),
            )
    return before


#: The oldest schema version this pgcast still works with (without gap and
#: epoch checks, which need version 2: a one-time warning names ``pgcast init``).
OLDEST_WORKING_VERSION = 1

_warned_old = False


def warn_old_schema(version: int) -> None:
    """Log, once per process, that the schema at *version* lacks what gap
    and epoch checks need."""
    global _warned_old
    if version < LATEST_VERSION and not _warned_old:
        _warned_old = True
        logger.warning(
            "pgcast: the pgcast schema in this database is at version %d, older than "
            "this pgcast's %d: durable channels work, but a resume from a pruned "
            "position or from before a reset of the log is NOT detected (no "
            "pgcast.Gap) until the schema is upgraded: run `pgcast init`",
            version, LATEST_VERSION,
        )


def check_steps() -> Steps[int]:
    """Check, without writing anything, that the ``pgcast`` schema is
    installed, and return its version: what a PubSub does before it first
    uses the log, unless it was told it may install the schema itself.

    A schema older than :data:`LATEST_VERSION` but at least
    :data:`OLDEST_WORKING_VERSION` is used as it is (the caller runs the SQL
    of that version) and logged once (:func:`warn_old_schema`).

    :raises SchemaError: missing or too old (naming ``pgcast init``), or newer.
    """
    exists = yield (_EXISTS_SQL, None)
    version = 0
    if exists[0][0]:
        found = yield (_VERSION_SQL, None)
        version = _check_not_newer(found[0][0])
    if version < OLDEST_WORKING_VERSION:
        state = (
            "not installed in this database" if version == 0
            else f"at version {version}, older than this pgcast's {LATEST_VERSION}"
        )
        raise SchemaError(
            "the pgcast schema (needed for durable channels and payloads of 8000 bytes "
            f"or more) is {state}: run `pgcast init` (or pgcast.install_schema(conn)) "
            "once, or connect with install_schema=True to let pgcast install it"
        )
    warn_old_schema(version)
    return version


# -- retention --------------------------------------------------------------

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|w)?\s*", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` (a bare number is seconds).

    :raises ValueError: anything else, or a negative duration.
    """
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ValueError(
            f"invalid duration {text!r}: use a number with s, m, h, d or w, like 7d or 12h"
        )
    return timedelta(seconds=float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()])


def prune_query(
    older_than: timedelta | None = DEFAULT_RETENTION,
    keep_last: int | None = None,
    channel: str | None = None,
    *,
    force: bool = False,
    max_age: timedelta | None = None,
    version: int = LATEST_VERSION,
) -> Query:
    """The statement deleting from the log what retention no longer keeps.

    A message is a *candidate* when it is older than *older_than* (``None``:
    age protects everything) and, with *keep_last*, is not among the
    *keep_last* newest of its channel. A candidate is deleted unless a named
    consumer of its channel has not acknowledged it (its position is below
    the message's id); *force* deletes it all the same, and so does
    *max_age* for a candidate older than that. Consumers whose position
    belongs to another epoch of the log (schema version 2) protect nothing:
    their position is not in this log.

    The statement returns rows ``(kind, channel, consumer, number)``:
    ``("deleted", channel, None, count)``; ``("held", channel, None,
    count)``: candidates kept for consumers; ``("behind", channel, name,
    position)``: a consumer that lost messages it had not acknowledged.
    *version* is the installed schema's (1: no epochs).
    """
    if older_than is None and keep_last is None:
        raise ValueError("nothing to prune by: give older_than, keep_last or both")
    if older_than is not None and older_than < timedelta(0):
        raise ValueError(f"older_than must not be negative, got {older_than}")
    if max_age is not None and max_age < timedelta(0):
        raise ValueError(f"max_age must not be negative, got {max_age}")
    if not isinstance(force, bool):
        raise TypeError(f"force must be True or False, not {force!r}")
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0
    ):
        raise ValueError(f"keep_last must be an int >= 0, got {keep_last!r}")
    if channel is not None:
        check_channel(channel)
    age = older_than if older_than is not None else timedelta(0)
    keep = keep_last or 0
    same_epoch = (
        "WHERE c.epoch IS NULL OR c.epoch = (SELECT epoch FROM pgcast.meta)"
        if version >= 2 else ""
    )
    # Candidates by age first (the BRIN index), then, per channel among them,
    # the id below which a message is not among the newest `keep`; then the
    # lowest position of the channel's consumers, below which nothing is
    # unacknowledged.
    sql = f"""
WITH candidates AS (
    SELECT id, channel, created_at FROM pgcast.log
    WHERE created_at < now() - %(age)s::interval
      AND (%(channel)s::text IS NULL OR channel = %(channel)s::text)
), cutoffs AS (
    SELECT c.channel,
           CASE WHEN %(keep)s = 0 THEN NULL ELSE (
               SELECT k.id FROM pgcast.log AS k WHERE k.channel = c.channel
               ORDER BY k.id DESC OFFSET %(keep)s - 1 LIMIT 1) END AS below
    FROM (SELECT DISTINCT channel FROM candidates) AS c
), readers AS (
    SELECT c.name, c.channel, c.position FROM pgcast.consumers AS c {same_epoch}
), floors AS (
    SELECT channel, min(position) AS position FROM readers GROUP BY channel
), due AS (
    SELECT d.id, d.channel,
           (f.position IS NULL OR d.id <= f.position OR %(force)s
            OR (%(max_age)s::interval IS NOT NULL
                AND d.created_at < now() - %(max_age)s::interval)) AS free
    FROM candidates AS d JOIN cutoffs AS x ON x.channel = d.channel
    LEFT JOIN floors AS f ON f.channel = d.channel
    WHERE %(keep)s = 0 OR d.id < x.below
), gone AS (
    DELETE FROM pgcast.log AS l USING due AS d
    WHERE l.id = d.id AND d.free
    RETURNING l.id, l.channel
), last_gone AS (
    SELECT channel, count(*) AS n, max(id) AS upto FROM gone GROUP BY channel
)
SELECT 'deleted', channel, NULL, n FROM last_gone
UNION ALL
SELECT 'held', channel, NULL, count(*) FROM due WHERE NOT free GROUP BY channel
UNION ALL
SELECT 'behind', r.channel, r.name, r.position
FROM readers AS r JOIN last_gone AS g ON g.channel = r.channel AND r.position < g.upto
ORDER BY 1, 2, 3
"""
    return sql, {"age": age, "channel": channel, "keep": keep, "force": force,
                 "max_age": max_age}


@dataclass(frozen=True, slots=True)
class LeftBehind:
    """A named consumer that a prune left behind: messages of *channel* it
    had not acknowledged were deleted (``force``, or older than ``max_age``).
    It will get a :class:`~pgcast.Gap` when it resumes."""

    consumer: str
    """The consumer's name."""
    channel: str
    """The channel it lost messages on."""
    position: int
    """Its position (the last id it acknowledged)."""


class PruneResult(dict[str, int]):
    """What :func:`pgcast.prune` did: a dict of the messages deleted per
    channel (as before), with what retention did *not* do beside it."""

    held: dict[str, int]
    """Per channel, messages old enough to go that were kept because a named
    consumer has not acknowledged them."""
    left_behind: list[LeftBehind]
    """Consumers that lost unacknowledged messages in this prune."""

    def __init__(self, rows: Sequence[tuple[Any, ...]] = ()) -> None:
        super().__init__()
        self.held = {}
        self.left_behind = []
        for kind, channel, name, number in rows:
            if kind == "deleted":
                self[channel] = int(number)
            elif kind == "held":
                self.held[channel] = int(number)
            else:
                self.left_behind.append(LeftBehind(name, channel, int(number)))
