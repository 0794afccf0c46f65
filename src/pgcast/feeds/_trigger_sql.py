"""The SQL of table change feeds, as text: no connection, no I/O.

The two PL/pgSQL trigger functions (:data:`ROW_FUNCTION`,
:data:`STATEMENT_FUNCTION`) that turn a change into the JSON events described
in :mod:`pgcast.feeds.triggers`, the names a feed gives its channel and
triggers, and the ``CREATE TRIGGER`` statements of one feed
(:func:`create_triggers`). :mod:`pgcast.feeds.triggers` runs them against a
connection (``watch_table``) or prints them (``sql_text``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from psycopg import sql

from .._channels import MAX_CHANNEL_BYTES, check_channel
from .._errors import WatchError

#: What a feed can announce. TRUNCATE has no rows, so no keys.
OPERATIONS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
#: Bumped whenever the SQL of the trigger functions changes.
FUNCTIONS_VERSION = 1
#: The statement-level mode's default limit on notifications per statement.
DEFAULT_MAX_PARTS = 16

#: The trigger functions' comment: which version of them is installed.
COMMENT = f"pgcast table change feed, version {FUNCTIONS_VERSION}"
# Serialises concurrent installers (two app processes starting at once): a
# concurrent CREATE OR REPLACE FUNCTION fails with "tuple concurrently updated".
LOCK_KEY = "pgcast.triggers"

ROW_FUNCTION = r"""
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

STATEMENT_FUNCTION = r"""
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

#: Per mode, the trigger function a feed's triggers call.
FUNCTIONS = {"row": "table_change_row", "statement": "table_change_statement"}

def shorten(text: str, limit: int, unique_from: str) -> str:
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
    return shorten(base, MAX_CHANNEL_BYTES - len(suffix), f"{schema}.{table}") + suffix


def trigger_name(channel: str, op: str) -> str:
    # Unique per (channel, operation) on a table; the channel is hashed in
    # whole, so two long channels with a common prefix do not collide.
    suffix = "_" + op.lower()
    return shorten(f"pgcast_{channel}", MAX_CHANNEL_BYTES - len(suffix), channel) + suffix


def check_operations(operations: Iterable[str]) -> tuple[str, ...]:
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


def check_arguments(
    operations: Iterable[str], columns: object, channel: str | None, per: str, max_parts: object
) -> tuple[str, ...]:
    """Check a feed's arguments before anything is read: the operations,
    in :data:`OPERATIONS` order, or :class:`WatchError` naming the problem."""
    if per not in FUNCTIONS:
        raise WatchError(f"per must be 'row' or 'statement', not {per!r}")
    ops = check_operations(operations)
    if per == "statement" and columns is not None:
        raise WatchError("columns applies to per='row'; statement events carry keys only")
    if isinstance(max_parts, bool) or not isinstance(max_parts, int) or max_parts < 1:
        raise WatchError(f"max_parts must be an int >= 1, not {max_parts!r}")
    if channel is not None:
        check_channel(channel)
    return ops


def parse_tgargs(raw: bytes) -> list[str]:
    # pg_trigger.tgargs: each argument followed by a NUL byte.
    return [a.decode() for a in raw.split(b"\x00")[:-1]]



def create_triggers(
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
                name=sql.Identifier(trigger_name(channel, op)),
                op=sql.SQL(op),
                table=target,
                referencing=referencing,
                level=sql.SQL(level),
                function=sql.Identifier(function),
                args=sql.SQL(", ").join(sql.Literal(a) for a in args),
            )
        )
    return statements
