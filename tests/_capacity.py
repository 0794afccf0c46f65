"""How many more connections a test may open on the server under test.

The embedded server allows 600; a PostgreSQL given with PGCAST_TEST_DSN may
allow far fewer (100 by default), so tests that open many connections size
themselves with :func:`spare_connections` instead of assuming.
"""

from __future__ import annotations

from typing import Any

import psycopg

RESERVE = 20  # for the test's own connections and whatever else runs meanwhile


def spare_connections(conn: psycopg.Connection[Any], wanted: int) -> int:
    """*wanted*, or fewer if the server's max_connections would not allow it."""
    row = conn.execute(
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int"
        " - (SELECT count(*) FROM pg_stat_activity)::int"
    ).fetchone()
    assert row is not None
    free: int = row[0]
    return max(1, min(wanted, free - RESERVE))
