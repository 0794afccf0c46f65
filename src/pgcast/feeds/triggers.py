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

import json
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import psycopg
from psycopg import sql

from .._errors import WatchError
from ._change import Change, Feed
from ._trigger_sql import (
    COMMENT,
    DEFAULT_MAX_PARTS,
    FUNCTIONS,
    FUNCTIONS_VERSION,
    LOCK_KEY,
    OPERATIONS,
    ROW_FUNCTION,
    STATEMENT_FUNCTION,
    check_arguments,
    create_triggers,
    default_channel,
    parse_tgargs,
    trigger_name,
)

__all__ = [
    "DEFAULT_MAX_PARTS",
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

# -- driving the server ------------------------------------------------------


def install(conn: psycopg.Connection[Any]) -> None:
    """Create schema ``pgcast`` and the trigger functions if missing or older.

    :func:`watch_table` calls this; call it yourself to install as an
    administrator before handing out ``watch_table`` to a less privileged role.
    """
    with conn.transaction():
        _install(conn)


def _install(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (LOCK_KEY,))
    rows = conn.execute(
        "SELECT p.proname, obj_description(p.oid, 'pg_proc') FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'pgcast' AND p.proname = ANY(%s)",
        (list(FUNCTIONS.values()),),
    ).fetchall()
    current = {name for name, comment in rows if comment == COMMENT}
    if current == set(FUNCTIONS.values()):
        return
    conn.execute("CREATE SCHEMA IF NOT EXISTS pgcast")
    for source in (ROW_FUNCTION, STATEMENT_FUNCTION):
        conn.execute(source.encode(), prepare=False)
    for name in FUNCTIONS.values():
        conn.execute(
            sql.SQL("COMMENT ON FUNCTION pgcast.{}() IS {}").format(
                sql.Identifier(name), sql.Literal(COMMENT)
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
    ops = check_arguments(operations, columns, channel, per, max_parts)
    with conn.transaction():
        oid, feed = _read_feed(conn, table, channel, ops, columns=columns, per=per)
        _install(conn)
        _drop_triggers(conn, oid, feed.schema, feed.table, feed.channel)
        for statement in _statements(feed, max_parts):
            conn.execute(statement)
    return feed


def _read_feed(
    conn: psycopg.Connection[Any], table: str | tuple[str, str], channel: str | None,
    ops: tuple[str, ...], *, columns: Sequence[str] | None, per: Literal["row", "statement"],
) -> tuple[int, Feed]:
    """The table's oid and the feed the arguments describe, read from *conn*."""
    oid, schema, name = _resolve(conn, table)
    cols = None if columns is None else _check_columns(conn, oid, f"{schema}.{name}", columns)
    channel = default_channel(schema, name) if channel is None else channel
    return oid, Feed(schema, name, channel, per, ops, _key_columns(conn, oid), cols)


def _statements(feed: Feed, max_parts: int) -> list[sql.Composed]:
    """The CREATE TRIGGER statements of *feed*."""
    return create_triggers(feed.schema, feed.table, feed.channel, feed.operations,
                           per=feed.per, key=feed.key, cols=feed.columns, max_parts=max_parts)



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
    ops = check_arguments(operations, columns, channel, per, max_parts)
    _, feed = _read_feed(conn, table, channel, ops, columns=columns, per=per)
    parts = ["CREATE SCHEMA IF NOT EXISTS pgcast;"]
    parts += [source.strip().rstrip(";") + ";" for source in (ROW_FUNCTION, STATEMENT_FUNCTION)]
    parts += [
        sql.SQL("COMMENT ON FUNCTION pgcast.{}() IS {};").format(
            sql.Identifier(f), sql.Literal(COMMENT)).as_string(conn)
        for f in FUNCTIONS.values()
    ]
    target = sql.Identifier(feed.schema, feed.table)
    parts += [
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {};").format(
            sql.Identifier(trigger_name(feed.channel, op)), target).as_string(conn)
        for op in OPERATIONS
    ]
    parts += [statement.as_string(conn) + ";" for statement in _statements(feed, max_parts)]
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
        (list(FUNCTIONS.values()), oid, oid),
    ).fetchall()
    out = []
    for schema, table, tgname, proname, tgargs, tgtype in rows:
        # pg_trigger.tgtype bits: 4 INSERT, 8 DELETE, 16 UPDATE, 32 TRUNCATE.
        op = next(o for bit, o in ((4, "INSERT"), (8, "DELETE"), (16, "UPDATE"),
                                   (32, "TRUNCATE")) if tgtype & bit)
        out.append((schema, table, tgname, proname, op, parse_tgargs(bytes(tgargs)), tgtype))
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
