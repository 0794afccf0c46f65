"""pgcast's durable log seen from a test: its rows, and rows made older."""

from __future__ import annotations

from typing import Any

import psycopg

Conn = psycopg.Connection[tuple[Any, ...]]


def log_rows(conn: Conn, channel: str) -> list[tuple[int, str]]:
    """(id, payload) of *channel*'s messages in the log, by id."""
    return [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT id, payload FROM pgcast.log WHERE channel = %s ORDER BY id", (channel,)
        )
    ]


def age(conn: Conn, channel: str, ids_: list[int], days: int) -> None:
    """Make the messages *ids_* of *channel* *days* days old."""
    conn.execute(
        "UPDATE pgcast.log SET created_at = now() - make_interval(days => %s) "
        "WHERE channel = %s AND id = ANY(%s)", (days, channel, ids_),
    )
