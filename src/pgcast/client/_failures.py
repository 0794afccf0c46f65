"""What a failure becomes in a PubSub's public API, the same in both flavours.

:class:`Failures` is a mixin of :class:`~pgcast.client._session_async.AsyncSession`
and its generated sync twin: no waiting happens here, so it is written once,
by hand, for both. No psycopg exception leaves a public call; a failure is
told apart by what the PubSub knows when it happens (closed meanwhile by
another thread or task, the connection lost with a command on the wire, or
not restored in time to send).
"""

from __future__ import annotations

from typing import NoReturn

import psycopg

from .._core import Core, wrap_error
from .._errors import ClosedError, ConnectionLostError, NotSentError, PgcastError
from .._reconnect import Resilience

__all__ = ["Failures"]


class Failures:
    """The error mapping of a session (see the module docstring)."""

    _closed: bool
    _generation: int
    _core: Core
    _res: Resilience

    def _public_error(self, exc: PgcastError | psycopg.Error | OSError) -> PgcastError:
        """What a public call raises for *exc*: :class:`ClosedError` when the
        PubSub was closed meanwhile (by another thread or task: whatever the
        closed connection made psycopg raise, a bare ``DatabaseError`` such as
        "got no result from the query" included, or the ``OSError`` of a
        wait on its socket), else *exc* in pgcast's tree. No psycopg
        exception leaves a public call."""
        if self._closed and not isinstance(exc, ClosedError):
            return ClosedError(f"this {type(self).__name__} was closed during the command")
        if isinstance(exc, psycopg.Error):
            return wrap_error(exc)
        if isinstance(exc, OSError):
            return ConnectionLostError(f"connection to PostgreSQL lost: {exc}")
        return exc

    def _raise_public(self, exc: PgcastError | psycopg.Error | OSError) -> NoReturn:
        """Raise what a public call raises for *exc* (:meth:`_public_error`),
        from inside the ``except`` block that caught it: *exc* itself when it
        is already pgcast's, so its traceback stays whole. (An ``except``
        clause, not a context manager: it costs a command nothing when all
        goes well.)"""
        error = self._public_error(exc)
        if error is exc:
            raise exc
        raise error from exc

    def _command_failed(self, exc: psycopg.Error, generation: int) -> PgcastError:
        """What a command that failed on the wire raises; a lost connection
        is recorded (when nobody reconnected since *generation*)."""
        if self._closed:
            # close() from another thread or task while the command was on
            # the wire: psycopg reports whatever the torn connection gave.
            return ClosedError(
                f"this {type(self).__name__} was closed while the command was on "
                f"its way: the server may or may not have run it ({exc})"
            )
        error = wrap_error(exc)
        if isinstance(error, ConnectionLostError):
            if generation == self._generation:
                self._core.lost(error)
            return ConnectionLostError(
                f"{error} (while the command was on its way: the server may or "
                "may not have run it)"
            )
        return error

    def _not_sent(self, gave_up: ConnectionLostError) -> NotSentError:
        """What a command raises that was never sent: the connection was lost
        before and not restored within ``notify_timeout``."""
        return NotSentError(
            f"not sent: the connection to PostgreSQL was lost and not "
            f"restored within notify_timeout={self._res.notify_timeout:g} s "
            f"({gave_up})"
        )

