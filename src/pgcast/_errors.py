"""The pgcast exception tree.

Every error pgcast raises on purpose is a :class:`PgcastError`; errors caused by
bad arguments are also :class:`ValueError`, so code written for the standard
library's conventions keeps working::

    PgcastError
    ├── InvalidChannelError (also ValueError)   a channel name PostgreSQL would mangle
    ├── PayloadError (also ValueError)          a payload NOTIFY cannot carry
    │   └── PayloadTooLargeError                8000 bytes or more in UTF-8
    ├── ConnectError                            could not connect (bad DSN, server gone, auth)
    ├── ConnectionLostError                     an established connection broke
    │   └── NotSentError                        lost, and not back in time to send
    ├── HotStandbyError                         the server is a standby (in recovery)
    ├── ListenNotEffectiveError                 LISTEN did not hold (a pooler in transaction mode)
    ├── ClosedError                             the PubSub was closed by its user
    ├── DatabaseError                           the server refused a command
    │   └── SchemaError                         the pgcast schema cannot be installed, or is too new
    ├── PublishError                            a Publisher's transaction failed
    ├── PublisherFullError                      a Publisher's buffer stayed full
    ├── AccessDenied                            the gateway's authorizer refused a client
    ├── ProtocolError (also ValueError)         a gateway client frame malformed or over a limit
    ├── WatchError (also ValueError)            a change feed on a missing table or column
    ├── QueueError (also ValueError)            a queue table name or job pgcast cannot use
    └── EmbeddedServerError (also RuntimeError) the embedded server would not start or stop

Errors that wrap a psycopg exception keep it as ``__cause__`` and carry the
server's own message in theirs.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "ClosedError",
    "ConnectError",
    "ConnectionLostError",
    "DatabaseError",
    "EmbeddedServerError",
    "HotStandbyError",
    "InvalidChannelError",
    "ListenNotEffectiveError",
    "NotSentError",
    "PayloadError",
    "PayloadTooLargeError",
    "PgcastError",
    "ProtocolError",
    "PublishError",
    "PublisherFullError",
    "QueueError",
    "SchemaError",
    "WatchError",
]


class PgcastError(Exception):
    """Base class of every error raised by pgcast."""


class InvalidChannelError(PgcastError, ValueError):
    """A channel name that PostgreSQL cannot use exactly as given."""


class PayloadError(PgcastError, ValueError):
    """A payload that NOTIFY cannot carry (for example one containing NUL)."""


class PayloadTooLargeError(PayloadError):
    """A payload whose UTF-8 encoding reaches PostgreSQL's NOTIFY limit.

    :attr:`size` is the payload's size in bytes and :attr:`limit` the largest
    size NOTIFY accepts, plus one.
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"payload is {size} bytes in UTF-8; NOTIFY payloads must be under {limit} bytes"
        )


class ConnectError(PgcastError):
    """Connecting to PostgreSQL failed; the message is the server's or libpq's."""


class ConnectionLostError(PgcastError):
    """The connection to PostgreSQL broke while it was in use."""


class NotSentError(ConnectionLostError):
    """A notification was not sent: the connection was lost and was not
    restored within the PubSub's ``notify_timeout``. Nothing went out; the
    message says for how long it waited and why the connection was lost."""


class HotStandbyError(PgcastError):
    """The server is a hot standby (``pg_is_in_recovery()``), where LISTEN and
    NOTIFY cannot run: connect to the primary (``target_session_attrs=read-write``)."""


class ListenNotEffectiveError(PgcastError):
    """``LISTEN`` returned but ``pg_listening_channels()`` does not show it.

    The usual cause is a connection pooler in transaction or statement mode
    (PgBouncer ``pool_mode=transaction``): each statement may run on another
    server session, so the LISTEN is lost. :attr:`missing` holds the channels
    the server session does not listen to.
    """

    def __init__(self, message: str, missing: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.missing = missing


class ClosedError(PgcastError):
    """The PubSub was closed and cannot be used any more."""


class DatabaseError(PgcastError):
    """PostgreSQL refused a command; the message is the server's."""


class SchemaError(DatabaseError):
    """The ``pgcast`` schema (durable channels, large payloads) cannot be used:
    it could not be installed (the message says what to run, and as whom), or
    it is newer than this pgcast."""


class PublishError(PgcastError):
    """A :class:`pgcast.Publisher` transaction failed: its notifications were
    not sent, or, when the connection was lost before the server answered,
    may or may not have been (the message says which; none is sent again).

    :attr:`messages` holds every ``(channel, payload)`` of the failed
    transactions, in the order they were published, so nothing is lost; the
    cause (the server's or libpq's error) is ``__cause__``.
    """

    def __init__(self, message: str, messages: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.messages = messages


class PublisherFullError(PgcastError):
    """A :class:`pgcast.Publisher` held *limit* unsent notifications for longer
    than the publishing caller agreed to wait; that notification was not queued."""

    def __init__(self, limit: int, waited: float) -> None:
        self.limit = limit
        self.waited = waited
        super().__init__(
            f"the Publisher already holds {limit} unsent notifications (max_pending) "
            f"and no room came free within {waited:g} s; this one was not queued"
        )


class EmbeddedServerError(PgcastError, RuntimeError):
    """The embedded server could not be initialised, started, attached to or stopped.

    When the server itself failed, the message ends with the tail of its log.
    """


class AccessDenied(PgcastError):
    """The gateway refuses a client: raised by an authorizer (the message is
    sent to the client), or by the gateway for a bad origin or a refused token."""


class ProtocolError(PgcastError, ValueError):
    """A frame a gateway client sent that is malformed, of an unknown type, or
    over a limit; the client gets the message in an ``error`` frame."""


class WatchError(PgcastError, ValueError):
    """A table change feed that cannot be set up as asked: no such table, not
    a table, an unknown column or operation."""


class QueueError(PgcastError, ValueError):
    """A queue table name pgcast cannot use, or a job it cannot store."""
