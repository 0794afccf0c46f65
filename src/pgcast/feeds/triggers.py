"""Table change feeds: a trigger that announces every committed change as JSON.

``watch_table(conn, "public.ports")`` installs, idempotently, two trigger
functions in pgcast's own schema ``pgcast`` (``pgcast.table_change_row()`` and
``pgcast.table_change_statement()``) and puts triggers on the table that call
them. Because NOTIFY is transactional, the events arrive when the changing
transaction commits, never when it rolls back, and a listener (``pgcast listen
ports_changed``, :class:`pgcast.Worker`) sees them in commit order.

The contract of an event, sent as a JSON object on the feed's channel:

``per="row"`` (the default), one notification per changed row::

    {"op": "UPDATE", "schema": "public", "table": "ports",
     "key": {"id": 42},                 # the primary key (composite keys: all columns)
     "row": {...},                      # the row (only the chosen columns, if any)
     "old": {"price": 10},              # UPDATE only: old values of the changed columns
     "txid": 123456}                    # pg_current_xact_id() of the changing transaction

``row`` is the new row for INSERT and UPDATE and the deleted row for DELETE.
The key is the primary key, else the columns of the table's replica identity
index; a table with neither has ``"key": null``, and then the row is the only
identification of what changed.

A change whose event would not fit NOTIFY's 8000 bytes never fails the user's
transaction: the trigger measures it (``octet_length``) and sends the event
without ``row`` and ``old``, with ``"truncated": true``; should even the key be
too big, ``"key"`` is null as well. The consumer re-reads the row by its key.

``per="statement"``: one trigger per operation with transition tables, and one
notification per statement carrying the set of keys (sorted as text, without
duplicates; an UPDATE that changes keys lists both the old and the new ones)::

    {"op": "UPDATE", "schema": "public", "table": "ports", "txid": 123456,
     "count": 2, "keys": [{"id": 1}, {"id": 2}], "part": 1, "parts": 1}

``count`` is the number of rows the statement changed. When the keys do not fit
one notification they are split over ``parts`` notifications of about 6 kB
each; if that would take more than ``max_parts`` notifications (or a single key
is too big), one notification is sent instead, with ``"keys": null,
"truncated": true`` and the count, and the consumer refreshes the whole table.
A statement that changed no row sends nothing. ``TRUNCATE`` (in either mode)
sends ``{"op": "TRUNCATE", ..., "keys": null}``.

The default channel is ``<table>_changed`` for a table in ``public`` and
``<schema>.<table>_changed`` otherwise; a name longer than PostgreSQL's 63
bytes is shortened and made unique with a hash of the full name (see
:func:`default_channel`).

Table names given as text are parsed by PostgreSQL itself (``to_regclass``,
so ``ports``, ``public.ports`` and ``"My Schema"."My Table"`` all work and the
search path applies); a ``(schema, table)`` tuple names a table exactly. Every
name that reaches SQL afterwards is quoted with :class:`psycopg.sql.Identifier`.

Re-running :func:`watch_table` with the same channel replaces that feed's
triggers (so a changed primary key or column list is picked up); feeds on
different channels are independent. The functions carry their version in
their comment and are replaced only when it differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import psycopg
from psycopg import sql

from .._channels import MAX_CHANNEL_BYTES, check_channel
from .._errors import WatchError
from .._event import Event

__all__ = [
    "FUNCTIONS_VERSION",
    "OPERATIONS",
    "Change",
    "Feed",
    "default_channel",
    "install",
    "sql_text",
    "unwatch_table",
    "watch_table",
    "watched_tables",
]

#: What a feed can announce. TRUNCATE has no rows, so no keys.
OPERATIONS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
#: Bumped whenever the SQL of the trigger functions changes.
FUNCTIONS_VERSION = 1
#: The statement-level mode's default limit on notifications per statement.
DEFAULT_MAX_PARTS = 16

_COMMENT = f"pgcast table change feed, version {FUNCTIONS_VERSION}"
# Serialises concurrent installers (two app processes starting at once): a
# concurrent CREATE OR REPLACE FUNCTION fails with "tuple concurrently updated".
_LOCK_KEY = "pgcast.triggers"

_ROW_FUNCTION = r"""
CREATE OR REPLACE FUNCTION pgcast.table_change_row() RETURNS trigger
LANGUAGE plpgsql AS $fn$
-- TG_ARGV: channel, key columns (JSON array or 'null'), columns (JSON array or 'null')
DECLARE
    key_cols text[];
    cols text[];
    new_row jsonb;
    old_row jsonb;
    r jsonb;
    k jsonb;
    changed jsonb;
    head jsonb;
    payload text;
BEGIN
    IF TG_ARGV[1] <> 'null' THEN
        key_cols := ARRAY(SELECT jsonb_array_elements_text(TG_ARGV[1]::jsonb));
    END IF;
    IF TG_ARGV[2] <> 'null' THEN
        cols := ARRAY(SELECT jsonb_array_elements_text(TG_ARGV[2]::jsonb));
    END IF;
    IF TG_OP <> 'DELETE' THEN new_row := to_jsonb(NEW); END IF;
    IF TG_OP <> 'INSERT' THEN old_row := to_jsonb(OLD); END IF;
    r := coalesce(new_row, old_row);
    IF key_cols IS NOT NULL THEN
        SELECT jsonb_object_agg(c, r -> c) INTO k FROM unnest(key_cols) AS c;
    END IF;
    head := jsonb_build_object(
        'op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
        'key', k, 'txid', pg_current_xact_id()::text::bigint);
    IF cols IS NOT NULL THEN
        SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}') INTO r
        FROM jsonb_each(r) AS e WHERE e.key = ANY (cols);
    END IF;
    IF TG_OP = 'UPDATE' THEN
        SELECT coalesce(jsonb_object_agg(o.key, o.value), '{}') INTO changed
        FROM jsonb_each(old_row) AS o
        WHERE (new_row -> o.key) IS DISTINCT FROM o.value
          AND (cols IS NULL OR o.key = ANY (cols));
        payload := (head || jsonb_build_object('row', r, 'old', changed))::text;
    ELSE
        payload := (head || jsonb_build_object('row', r))::text;
    END IF;
    -- NOTIFY refuses 8000 bytes or more, which would fail the user's
    -- transaction: fall back to the key, then to nothing but the table.
    IF octet_length(payload) >= 8000 THEN
        payload := (head || '{"truncated": true}')::text;
        IF octet_length(payload) >= 8000 THEN
            payload := (head || '{"key": null, "truncated": true}')::text;
        END IF;
    END IF;
    PERFORM pg_notify(TG_ARGV[0], payload);
    RETURN NULL;
END
$fn$
"""

_STATEMENT_FUNCTION = r"""
CREATE OR REPLACE FUNCTION pgcast.table_change_statement() RETURNS trigger
LANGUAGE plpgsql AS $fn$
-- TG_ARGV: channel, key columns (JSON array or 'null'), max parts.
-- The transition tables are pgcast_new (INSERT, UPDATE) and pgcast_old
-- (UPDATE, DELETE); statements naming them run only on the matching TG_OP.
DECLARE
    max_parts int := TG_ARGV[2]::int;
    key_cols text[];
    key_expr text;
    source text;
    head text;
    n bigint;
    parts text[];
    too_big boolean;
    i int;
BEGIN
    head := left(jsonb_build_object(
        'op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
        'txid', pg_current_xact_id()::text::bigint)::text, -1);
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify(TG_ARGV[0], head || ', "keys": null, "count": null}');
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        SELECT count(*) INTO n FROM pgcast_old;
    ELSE
        SELECT count(*) INTO n FROM pgcast_new;
    END IF;
    IF n = 0 THEN
        RETURN NULL;
    END IF;
    IF TG_ARGV[1] = 'null' THEN
        PERFORM pg_notify(TG_ARGV[0], head || ', "keys": null, "count": ' || n || '}');
        RETURN NULL;
    END IF;
    key_cols := ARRAY(SELECT jsonb_array_elements_text(TG_ARGV[1]::jsonb));
    SELECT 'jsonb_build_object(' || string_agg(format('%L, t.%I', c, c), ', ') || ')::text'
        INTO key_expr FROM unnest(key_cols) AS c;
    source := CASE TG_OP
        WHEN 'INSERT' THEN format('SELECT %s AS k FROM pgcast_new t', key_expr)
        WHEN 'DELETE' THEN format('SELECT %s AS k FROM pgcast_old t', key_expr)
        ELSE format('SELECT %s AS k FROM pgcast_new t UNION SELECT %s FROM pgcast_old t',
                    key_expr, key_expr)
    END;
    -- Keys are cut into parts of about 6000 bytes by their running length; a
    -- part can overrun by one key, which the final check catches.
    EXECUTE format($q$
        WITH keys AS (SELECT DISTINCT k FROM (%s) AS s),
        pos AS (SELECT k, sum(octet_length(k) + 1) OVER (ORDER BY k) AS p FROM keys)
        SELECT array_agg(part ORDER BY g)
        FROM (SELECT (p - 1) / 6000 AS g, string_agg(k, ', ' ORDER BY k) AS part
              FROM pos GROUP BY 1) AS chunks
    $q$, source) INTO parts;
    SELECT bool_or(octet_length(part) > 7000) INTO too_big FROM unnest(parts) AS part;
    IF too_big OR cardinality(parts) > max_parts THEN
        PERFORM pg_notify(TG_ARGV[0],
            head || ', "keys": null, "count": ' || n || ', "truncated": true}');
        RETURN NULL;
    END IF;
    FOR i IN 1 .. cardinality(parts) LOOP
        PERFORM pg_notify(TG_ARGV[0],
            head || ', "count": ' || n || ', "keys": [' || parts[i] || '], "part": ' || i
            || ', "parts": ' || cardinality(parts) || '}');
    END LOOP;
    RETURN NULL;
END
$fn$
"""

_FUNCTIONS = {"row": "table_change_row", "statement": "table_change_statement"}


class Feed(NamedTuple):
    """One change feed: a table, the channel its changes go to, and how."""

    schema: str
    """The table's schema, as stored (not quoted)."""
    table: str
    """The table's name, as stored (not quoted)."""
    channel: str
    """The channel the events are sent on."""
    per: Literal["row", "statement"]
    """One event per changed row, or one (or a few) per statement."""
    operations: tuple[str, ...]
    """The operations announced, among :data:`OPERATIONS`."""
    key: tuple[str, ...] | None
    """The key columns, or None for a table with no usable key."""
    columns: tuple[str, ...] | None
    """The columns sent in ``row`` and ``old``; None for all."""


@dataclass(frozen=True, slots=True)
class Change:
    """A change event decoded: what :func:`watch_table`'s triggers send.

    :meth:`keys` gives the changed keys in both modes, so a handler needs not
    care which mode the feed uses.
    """

    op: str
    """``INSERT``, ``UPDATE``, ``DELETE`` or ``TRUNCATE``."""
    schema: str
    """The table's schema."""
    table: str
    """The table's name."""
    txid: int
    """The id of the transaction that made the change."""
    key: dict[str, Any] | None = None
    """Row mode: the changed row's key (None: the table has no key, or too big)."""
    row: dict[str, Any] | None = None
    """Row mode: the new row (the deleted one for DELETE); None when truncated."""
    old: dict[str, Any] | None = None
    """Row mode, UPDATE: the old values of the changed columns."""
    statement_keys: list[dict[str, Any]] | None = None
    """Statement mode: this part's keys (None: no key, too many, or TRUNCATE)."""
    count: int | None = None
    """Statement mode: the number of rows the statement changed."""
    part: int = 1
    """Statement mode: which of the statement's notifications this is, from 1."""
    parts: int = 1
    """Statement mode: how many notifications the statement sent."""
    truncated: bool = False
    """Too big for NOTIFY: ``row``/``old`` (or the keys) were left out."""

    @classmethod
    def from_event(cls, event: Event) -> Change:
        """Decode *event*'s payload.

        :raises ValueError: the payload is not a change event.
        """
        try:
            data = event.json()
            return cls(
                op=data["op"],
                schema=data["schema"],
                table=data["table"],
                txid=int(data["txid"]),
                key=data.get("key"),
                row=data.get("row"),
                old=data.get("old"),
                statement_keys=data.get("keys"),
                count=data.get("count"),
                part=data.get("part", 1),
                parts=data.get("parts", 1),
                truncated=bool(data.get("truncated", False)),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(
                f"not a pgcast change event on {event.channel!r}: {event.payload[:80]!r}"
            ) from exc

    def keys(self) -> list[dict[str, Any]] | None:
        """The keys this event names; None when it names none (no key,
        truncated statement, TRUNCATE), meaning "assume anything changed"."""
        if self.statement_keys is not None:
            return self.statement_keys
        if self.key is not None:
            return [self.key]
        return None


# -- pure helpers ------------------------------------------------------------


def _shorten(text: str, limit: int, unique_from: str) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    digest = hashlib.md5(unique_from.encode(), usedforsecurity=False).hexdigest()[:8]
    head = raw[: limit - len(digest) - 1].decode(errors="ignore")
    return f"{head}_{digest}"


def default_channel(schema: str, table: str) -> str:
    """The channel a feed uses when none is given.

    ``ports_changed`` for ``public.ports``, ``shop.ports_changed`` for
    ``shop.ports``. Longer than 63 bytes, the name part is cut (on a character
    boundary) and an 8-hex-digit hash of ``schema.table`` keeps it unique.
    """
    base = table if schema == "public" else f"{schema}.{table}"
    suffix = "_changed"
    return _shorten(base, MAX_CHANNEL_BYTES - len(suffix), f"{schema}.{table}") + suffix


def _trigger_name(channel: str, op: str) -> str:
    # Unique per (channel, operation) on a table; the channel is hashed in
    # whole, so two long channels with a common prefix do not collide.
    suffix = "_" + op.lower()
    return _shorten(f"pgcast_{channel}", MAX_CHANNEL_BYTES - len(suffix), channel) + suffix


def _check_operations(operations: Iterable[str]) -> tuple[str, ...]:
    if isinstance(operations, str):
        operations = (operations,)
    ops: list[str] = []
    for op in operations:
        name = str(op).upper()
        if name not in OPERATIONS:
            raise WatchError(f"unknown operation {op!r}; use some of {', '.join(OPERATIONS)}")
        if name not in ops:
            ops.append(name)
    if not ops:
        raise WatchError("no operation to watch; use some of " + ", ".join(OPERATIONS))
    return tuple(o for o in OPERATIONS if o in ops)


def _parse_tgargs(raw: bytes) -> list[str]:
    # pg_trigger.tgargs: each argument followed by a NUL byte.
    return [a.decode() for a in raw.split(b"\x00")[:-1]]


# -- driving the server ------------------------------------------------------


def install(conn: psycopg.Connection[Any]) -> None:
    """Create schema ``pgcast`` and the trigger functions if missing or older.

    :func:`watch_table` calls this; call it yourself to install as an
    administrator before handing out ``watch_table`` to a less privileged role.
    """
    with conn.transaction():
        _install(conn)


def _install(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_LOCK_KEY,))
    rows = conn.execute(
        "SELECT p.proname, obj_description(p.oid, 'pg_proc') FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'pgcast' AND p.proname = ANY(%s)",
        (list(_FUNCTIONS.values()),),
    ).fetchall()
    current = {name for name, comment in rows if comment == _COMMENT}
    if current == set(_FUNCTIONS.values()):
        return
    conn.execute("CREATE SCHEMA IF NOT EXISTS pgcast")
    for source in (_ROW_FUNCTION, _STATEMENT_FUNCTION):
        conn.execute(source.encode(), prepare=False)
    for name in _FUNCTIONS.values():
        conn.execute(
            sql.SQL("COMMENT ON FUNCTION pgcast.{}() IS {}").format(
                sql.Identifier(name), sql.Literal(_COMMENT)
            )
        )


def _resolve(conn: psycopg.Connection[Any], table: str | tuple[str, str]) -> tuple[int, str, str]:
    """The oid, schema and name of *table*, which must be a table."""
    if isinstance(table, tuple):
        schema, name = table
        text = sql.Identifier(schema, name).as_string(conn)
    elif isinstance(table, str) and table:
        text = table
    else:
        raise WatchError(f"table must be a name or a (schema, table) tuple, not {table!r}")
    try:
        row = conn.execute(
            "SELECT c.oid::int8, n.nspname, c.relname, c.relkind FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
            (text,),
        ).fetchone()
    except psycopg.Error as exc:
        raise WatchError(f"bad table name {text!r}: {exc}") from exc
    if row is None:
        raise WatchError(f"no table {text!r} (looked up on the search path)")
    oid, schema, name, kind = row
    if kind not in ("r", "p"):
        raise WatchError(f"{schema}.{name} is not a table (relkind {kind!r}); only tables "
                         "and partitioned tables can be watched")
    return oid, schema, name


def _key_columns(conn: psycopg.Connection[Any], oid: int) -> tuple[str, ...] | None:
    rows = conn.execute(
        "SELECT i.indisprimary, a.attname FROM pg_index i"
        " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE i.indrelid = %s AND (i.indisprimary OR i.indisreplident)"
        " ORDER BY i.indisprimary DESC, i.indexrelid, k.ord",
        (oid,),
    ).fetchall()
    if not rows:
        return None
    primary = rows[0][0]
    return tuple(name for is_primary, name in rows if is_primary == primary)


def _check_columns(
    conn: psycopg.Connection[Any], oid: int, qualified: str, columns: Sequence[str]
) -> tuple[str, ...]:
    if isinstance(columns, str):
        raise WatchError("columns must be a list of column names, not one string")
    wanted = list(dict.fromkeys(columns))
    if not wanted:
        raise WatchError("columns is empty; pass None to send every column")
    existing = {
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0"
            " AND NOT attisdropped",
            (oid,),
        )
    }
    unknown = [c for c in wanted if c not in existing]
    if unknown:
        raise WatchError(f"{qualified} has no column {', '.join(map(repr, unknown))}")
    return tuple(wanted)


def watch_table(
    conn: psycopg.Connection[Any],
    table: str | tuple[str, str],
    channel: str | None = None,
    operations: Iterable[str] = ("INSERT", "UPDATE", "DELETE"),
    columns: Sequence[str] | None = None,
    *,
    per: Literal["row", "statement"] = "row",
    max_parts: int = DEFAULT_MAX_PARTS,
) -> Feed:
    """Send a JSON change event on *channel* for every change to *table*.

    Idempotent: the functions are installed if needed, and this channel's
    triggers on the table are replaced, in one transaction (a savepoint if
    *conn* is already in one). See the module docstring for the events.

    :param table: ``"ports"``, ``"public.ports"``, ``'"My Schema"."T"'``, or an
        exact ``(schema, table)`` tuple.
    :param channel: default :func:`default_channel`.
    :param operations: some of INSERT, UPDATE, DELETE, TRUNCATE.
    :param columns: send only these columns in ``row`` and ``old`` (row mode).
    :param per: ``"row"``: an event per row; ``"statement"``: the set of keys
        per statement, at most *max_parts* notifications, else truncated.
    :returns: the :class:`Feed` installed, whose ``channel`` to listen to.
    :raises WatchError: no such table, unknown columns or operations.
    :raises InvalidChannelError: *channel* is not a usable channel name.
    """
    if per not in _FUNCTIONS:
        raise WatchError(f"per must be 'row' or 'statement', not {per!r}")
    ops = _check_operations(operations)
    if per == "statement" and columns is not None:
        raise WatchError("columns applies to per='row'; statement events carry keys only")
    if isinstance(max_parts, bool) or not isinstance(max_parts, int) or max_parts < 1:
        raise WatchError(f"max_parts must be an int >= 1, not {max_parts!r}")
    if channel is not None:
        check_channel(channel)
    with conn.transaction():
        oid, schema, name = _resolve(conn, table)
        qualified = f"{schema}.{name}"
        cols = None if columns is None else _check_columns(conn, oid, qualified, columns)
        if channel is None:
            channel = default_channel(schema, name)
        key = _key_columns(conn, oid)
        _install(conn)
        _drop_triggers(conn, oid, schema, name, channel)
        for statement in _create_triggers(schema, name, channel, ops, per=per, key=key, cols=cols,
                                      max_parts=max_parts):
            conn.execute(statement)
    return Feed(schema, name, channel, per, ops, key, cols)



def _create_triggers(
    schema: str, name: str, channel: str, ops: tuple[str, ...], *, per: str,
    key: tuple[str, ...] | None, cols: tuple[str, ...] | None, max_parts: int,
) -> list[sql.Composed]:
    """The CREATE TRIGGER statements of one feed."""
    statements: list[sql.Composed] = []
    target = sql.Identifier(schema, name)
    key_arg = "null" if key is None else json.dumps(list(key))
    for op in ops:
        if per == "row" and op != "TRUNCATE":
            level, referencing = "ROW", sql.SQL("")
            args = [channel, key_arg, "null" if cols is None else json.dumps(list(cols))]
            function = "table_change_row"
        else:
            level = "STATEMENT"
            referencing = sql.SQL({
                "INSERT": "REFERENCING NEW TABLE AS pgcast_new",
                "UPDATE": "REFERENCING NEW TABLE AS pgcast_new OLD TABLE AS pgcast_old",
                "DELETE": "REFERENCING OLD TABLE AS pgcast_old",
                "TRUNCATE": "",
            }[op])
            args = [channel, key_arg, str(max_parts)]
            function = "table_change_statement"
        statements.append(
            sql.SQL(
                "CREATE TRIGGER {name} AFTER {op} ON {table} {referencing}"
                " FOR EACH {level} EXECUTE FUNCTION pgcast.{function}({args})"
            ).format(
                name=sql.Identifier(_trigger_name(channel, op)),
                op=sql.SQL(op),
                table=target,
                referencing=referencing,
                level=sql.SQL(level),
                function=sql.Identifier(function),
                args=sql.SQL(", ").join(sql.Literal(a) for a in args),
            )
        )
    return statements


def sql_text(
    conn: psycopg.Connection[Any],
    table: str | tuple[str, str],
    channel: str | None = None,
    operations: Iterable[str] = ("INSERT", "UPDATE", "DELETE"),
    columns: Sequence[str] | None = None,
    *,
    per: Literal["row", "statement"] = "row",
    max_parts: int = DEFAULT_MAX_PARTS,
) -> str:
    """The SQL :func:`watch_table` would run, as text for a migration (Django's
    ``RunSQL``, Alembic's ``op.execute``): the pgcast schema and trigger
    functions (idempotent), then this channel's triggers (dropped first if
    present). Reads *conn* (the table, its key and columns) and changes nothing.
    Also ``pgcast watch TABLE --sql``.
    """
    if per not in _FUNCTIONS:
        raise WatchError(f"per must be 'row' or 'statement', not {per!r}")
    ops = _check_operations(operations)
    if channel is not None:
        check_channel(channel)
    oid, schema, name = _resolve(conn, table)
    cols = None if columns is None else _check_columns(conn, oid, f"{schema}.{name}", columns)
    if channel is None:
        channel = default_channel(schema, name)
    key = _key_columns(conn, oid)
    parts = ["CREATE SCHEMA IF NOT EXISTS pgcast;"]
    parts += [source.strip().rstrip(";") + ";" for source in (_ROW_FUNCTION, _STATEMENT_FUNCTION)]
    parts += [
        sql.SQL("COMMENT ON FUNCTION pgcast.{}() IS {};").format(
            sql.Identifier(f), sql.Literal(_COMMENT)).as_string(conn)
        for f in _FUNCTIONS.values()
    ]
    target = sql.Identifier(schema, name)
    parts += [
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {};").format(
            sql.Identifier(_trigger_name(channel, op)), target).as_string(conn)
        for op in OPERATIONS
    ]
    parts += [
        statement.as_string(conn) + ";"
        for statement in _create_triggers(schema, name, channel, ops, per=per, key=key, cols=cols,
                                      max_parts=max_parts)
    ]
    return "\n".join(parts) + "\n"


def _feed_triggers(
    conn: psycopg.Connection[Any], oid: int | None
) -> list[tuple[str, str, str, str, str, list[str], int]]:
    """(schema, table, trigger, function, op, args, tgtype) of pgcast's feed triggers."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname, t.tgname, p.proname, t.tgargs, t.tgtype::int"
        " FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
        " JOIN pg_namespace pn ON pn.oid = p.pronamespace"
        " JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE pn.nspname = 'pgcast' AND p.proname = ANY(%s)"
        " AND (%s::oid IS NULL OR t.tgrelid = %s::oid)"
        " ORDER BY n.nspname, c.relname, t.tgname",
        (list(_FUNCTIONS.values()), oid, oid),
    ).fetchall()
    out = []
    for schema, table, tgname, proname, tgargs, tgtype in rows:
        # pg_trigger.tgtype bits: 4 INSERT, 8 DELETE, 16 UPDATE, 32 TRUNCATE.
        op = next(o for bit, o in ((4, "INSERT"), (8, "DELETE"), (16, "UPDATE"),
                                   (32, "TRUNCATE")) if tgtype & bit)
        out.append((schema, table, tgname, proname, op, _parse_tgargs(bytes(tgargs)), tgtype))
    return out


def _drop_triggers(
    conn: psycopg.Connection[Any], oid: int, schema: str, table: str, channel: str | None
) -> int:
    dropped = 0
    for _, _, tgname, _, _, args, _ in _feed_triggers(conn, oid):
        if channel is None or args[0] == channel:
            conn.execute(
                sql.SQL("DROP TRIGGER {} ON {}").format(
                    sql.Identifier(tgname), sql.Identifier(schema, table)
                )
            )
            dropped += 1
    return dropped


def unwatch_table(
    conn: psycopg.Connection[Any], table: str | tuple[str, str], channel: str | None = None
) -> int:
    """Remove the feed of *table* on *channel*, or every pgcast feed of it.

    Returns the number of triggers dropped (0: there was no such feed). The
    functions in schema ``pgcast`` stay; other tables may use them.

    :raises WatchError: there is no such table.
    """
    with conn.transaction():
        oid, schema, name = _resolve(conn, table)
        if _installed(conn):
            return _drop_triggers(conn, oid, schema, name, channel)
        return 0


def _installed(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regprocedure('pgcast.table_change_row()') IS NOT NULL"
                       ).fetchone()
    return bool(row and row[0])


def watched_tables(
    conn: psycopg.Connection[Any], table: str | tuple[str, str] | None = None
) -> list[Feed]:
    """The feeds installed, on every table or on *table*, sorted by table and channel."""
    with conn.transaction():
        oid = None if table is None else _resolve(conn, table)[0]
        if not _installed(conn):
            return []
        triggers = _feed_triggers(conn, oid)
    feeds: dict[tuple[str, str, str], list[Any]] = {}
    for schema, name, _, proname, op, args, _ in triggers:
        channel, key_arg, extra = args
        entry = feeds.setdefault((schema, name, channel), [proname, [], key_arg, extra])
        entry[1].append(op)
        if proname == "table_change_row":
            entry[0], entry[3] = proname, extra
    result = []
    for (schema, name, channel), (proname, ops, key_arg, extra) in sorted(feeds.items()):
        key = json.loads(key_arg)
        cols = json.loads(extra) if proname == "table_change_row" else None
        result.append(
            Feed(
                schema,
                name,
                channel,
                "row" if proname == "table_change_row" else "statement",
                tuple(o for o in OPERATIONS if o in ops),
                None if key is None else tuple(key),
                None if cols is None else tuple(cols),
            )
        )
    return result
