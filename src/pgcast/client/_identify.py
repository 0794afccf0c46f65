# Generated from src/pgcast/client/_identify_async.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
"""Knowing what a PubSub's connection leads to: the server session's own
pid, and behind a pooler whether the session is pinned to this connection.
A base of :class:`~pgcast.client._session_async.Session`; the sync twin
(:mod:`pgcast.client._identify`) is generated from this file by
``tools/async_to_sync.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from .. import diagnostics
from .._core import Core, wrap_error
from .._encoding import encoding_setup
from .._errors import PgcastError
from ..durable._schema import Rows

__all__ = ["Identified"]


class Identified:
    """The identification steps of a session, run on every (new) connection."""

    _conn: psycopg.Connection[Any]
    _core: Core
    _connector: Callable[[], psycopg.Connection[Any]]

    def _direct(self, sql: str | bytes, fetch: bool = False) -> Rows:
        """Run *sql* on the connection itself, not as a command: no reconnect,
        no probe to wait for (a new connection, before anything else runs)."""
        try:
            cur = self._conn.execute(sql, prepare=False)
            return cur.fetchall() if fetch else []
        except psycopg.Error as exc:
            raise wrap_error(exc) from exc

    def _identify(self) -> None:
        """Once per connection, before anything else runs on it: set the
        encoding to listen in (:func:`pgcast._encoding.encoding_setup`), take
        the server's own ``pg_backend_pid()`` (the pid given at login is made
        up behind a pooler), and behind a pooler stop preparing statements."""
        core = self._core
        if core.identified:
            return
        encoding_sql = encoding_setup(self._conn)  # SQL_ASCII: see pgcast._encoding
        if encoding_sql is not None:
            self._direct(encoding_sql)
        rows = self._direct(diagnostics.BACKEND_PID_SQL, fetch=True)
        if core.identify(int(rows[0][0])):
            # Under transaction pooling the next statement may run on another
            # server session, which does not know psycopg's prepared
            # statements (PgBouncer before 1.21 does not track them).
            self._conn.prepare_threshold = None

    def _check_pinned(self) -> None:
        """Behind a pooler, once per connection, after LISTEN: a second
        connection must not see this one's channels
        (:func:`pgcast.diagnostics.check_pinned`): notifications to a server
        session no client holds are dropped."""
        core = self._core
        if not core.pooled or core.pinned:
            return
        expected = core.expected_listening()
        try:
            other = self._connector()
            try:
                cur = other.execute(diagnostics.SHARED_SQL, prepare=False)
                rows = cur.fetchall()
            except psycopg.Error as exc:
                raise wrap_error(exc) from exc
            finally:
                other.close()
        except PgcastError as exc:
            raise diagnostics.unverified_pool(expected, exc) from exc
        diagnostics.check_pinned(expected, rows[0][0] if rows and rows[0][0] else ())
        core.pinned = True
