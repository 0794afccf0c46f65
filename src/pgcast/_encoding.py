"""The encoding of a listening connection, and notifications that are not UTF-8.

pgcast connections speak UTF-8 (:func:`pgcast._core.connect_args`): PostgreSQL
converts every text it sends from the database encoding, so a notification's
channel and payload arrive as valid UTF-8, whatever the sender's encoding.

Except on a database in ``SQL_ASCII``: it stores the bytes a session sends
unchecked, so ``NOTIFY c, 'café'`` from a client in ``LATIN1`` (or in
``SQL_ASCII``, psql's default there) puts ``caf\\xe9`` in the queue. Sending it
to a listener that asked for UTF-8, the server checks it, fails, and ends the
listening session (``FATAL: invalid byte sequence for encoding "UTF8"``): the
notification is lost, and so is every one sent before the listener has
reconnected and LISTENed again. So on such a database :func:`encoding_setup`
switches the listening connection to ``SQL_ASCII`` before anything else runs
on it: the server then passes the bytes on as they are. pgcast decodes them
as UTF-8 itself (what its own publishers send, what psql sends from a UTF-8
terminal), and a payload that is not valid UTF-8 is delivered as a
:class:`pgcast.UndecodableEvent` (:func:`undecodable_event`), its bytes
kept, with a warning logged: nothing is dropped, the connection stays.

psycopg decodes a notification strictly in the connection's encoding before
its notify handlers see it (``ascii`` for ``SQL_ASCII``), and a decoding
error there escapes from the query that happened to receive it, with the
query's results left unread. pgcast therefore sets the connection's
``pgconn.notify_handler`` to its own (:meth:`pgcast._core.Core.on_notify`),
which takes the bytes.

In ``SQL_ASCII`` psycopg returns text columns as bytes; :func:`encoding_setup`
gives the connection loaders that decode them as UTF-8, so pgcast's queries
(``pg_listening_channels()``, the durable log) read ``str`` as before.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg.abc import Buffer
from psycopg.types.string import TextBinaryLoader, TextLoader

from ._event import UndecodableEvent

__all__ = [
    "SQL_ASCII_SQL",
    "UTF8_SQL",
    "decode_channel",
    "encoding_setup",
    "read_text_as_utf8",
    "undecodable_event",
]

logger = logging.getLogger("pgcast")

#: Run first on a listening connection to a database in ``SQL_ASCII``.
SQL_ASCII_SQL = "SET client_encoding TO 'SQL_ASCII'"
#: Run first on a listening connection that speaks neither UTF-8 nor ``SQL_ASCII``.
UTF8_SQL = "SET client_encoding TO 'UTF8'"

#: The text types psycopg would return as bytes in ``SQL_ASCII``.
_TEXT_TYPES = ("text", "varchar", "bpchar", "name", '"char"')


def _text(data: Buffer) -> str:
    """*data* as UTF-8; bytes that are not (stored in the log by a client in
    another encoding) become U+FFFD, with a warning: a strict decoding
    raised from the replay, for ever at the same row."""
    raw = bytes(data)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        logger.warning(
            "pgcast: a text value read from PostgreSQL is not valid UTF-8 (%s at byte %d): "
            "read with U+FFFD in place of its bad bytes", exc.reason, exc.start,
        )
        return raw.decode("utf-8", "replace")


class _Utf8Loader(TextLoader):
    """Text as UTF-8, whatever the connection's encoding says."""

    def load(self, data: Buffer) -> str:
        return _text(data)


class _Utf8BinaryLoader(TextBinaryLoader):
    def load(self, data: Buffer) -> str:
        return _text(data)


def read_text_as_utf8(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """On a database in ``SQL_ASCII``, give *conn* loaders that read text
    as UTF-8, the bytes that are not replaced (a client in another encoding
    may have stored them: psycopg's own loaders raise, or give bytes);
    whether it is such a database."""
    if conn.info.parameter_status("server_encoding") != "SQL_ASCII":
        return False
    for name in _TEXT_TYPES:
        conn.adapters.register_loader(name, _Utf8Loader)
        conn.adapters.register_loader(name, _Utf8BinaryLoader)
    return True


def encoding_setup(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str | None:
    """Make *conn* fit to listen (once per connection, before anything else
    runs on it): return the ``SET client_encoding`` to run on it first, or
    None if it speaks the right encoding already.

    On a database in ``SQL_ASCII`` that is ``SQL_ASCII`` (see the module's
    docstring), and *conn* gets loaders that read text results as UTF-8;
    elsewhere UTF-8, as :func:`pgcast.connect` asks already (a connection
    handed to ``PubSub()`` may speak another).
    """
    info = conn.info
    client = info.parameter_status("client_encoding")
    if read_text_as_utf8(conn):
        return None if client == "SQL_ASCII" else SQL_ASCII_SQL
    return None if client in ("UTF8", "UNICODE") else UTF8_SQL


def decode_channel(relname: bytes) -> str:
    """A channel name that is not valid UTF-8, decoded without loss.

    pgcast LISTENs in UTF-8 and PostgreSQL delivers only what a session
    listens to, so this is a name pgcast never listened to: lone surrogates
    (``surrogateescape``) keep it distinct from every name that it did.
    """
    return relname.decode("utf-8", "surrogateescape")


def undecodable_event(channel: str, raw: bytes, pid: int) -> UndecodableEvent:
    """The event for a payload that is not valid UTF-8, reported in the log."""
    event = UndecodableEvent.from_bytes(channel, raw, pid)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"{exc.reason} at byte {exc.start}: {raw[exc.start:exc.end]!r}"
    else:
        reason = "valid UTF-8"  # as called, not reached
    logger.warning(
        "pgcast: a notification on channel %r from pid %d is not valid UTF-8 (%s): "
        "delivered with U+FFFD in place of its bad bytes",
        channel, pid, reason, extra={"channel": channel, "pid": pid},
    )
    return event
