"""Channel names: validation and the SQL that uses them.

PostgreSQL channel names are identifiers. Unquoted, they are folded to lower
case; longer than 63 bytes, they are silently truncated, so a ``LISTEN`` on a
long name would never match a ``pg_notify`` of the same name. pgcast treats a
channel name as an exact string: it is validated here, then always quoted as an
identifier, so any string a user can type is just a channel name and never SQL.

Everything here is pure: no connection, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._errors import InvalidChannelError

__all__ = [
    "MAX_CHANNEL_BYTES",
    "check_channel",
    "check_channels",
    "listen_sql",
    "quote_ident",
    "unlisten_sql",
]

#: The longest identifier PostgreSQL keeps whole (NAMEDATALEN - 1).
MAX_CHANNEL_BYTES = 63


def check_channel(channel: object) -> str:
    """Return *channel* if it is a usable channel name, else raise.

    :raises InvalidChannelError: (a ``ValueError``) for a non-string, an empty
        name, a name containing NUL, or one over 63 bytes in UTF-8.
    """
    if not isinstance(channel, str):
        raise InvalidChannelError(
            f"channel name must be a str, not {type(channel).__name__}"
        )
    if not channel:
        raise InvalidChannelError("channel name is empty")
    if "\x00" in channel:
        raise InvalidChannelError(f"channel name {channel!r} contains a NUL character")
    try:
        size = len(channel.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidChannelError(f"channel name {channel!r} is not valid Unicode") from exc
    if size > MAX_CHANNEL_BYTES:
        raise InvalidChannelError(
            f"channel name is {size} bytes in UTF-8; PostgreSQL keeps at most "
            f"{MAX_CHANNEL_BYTES} and would silently truncate it: {channel[:20]!r}..."
        )
    return channel


def check_channels(channels: Iterable[object]) -> list[str]:
    """Validate every name first, so a bad one means nothing is sent."""
    return [check_channel(c) for c in channels]


def quote_ident(name: str) -> str:
    """Quote *name* as a PostgreSQL identifier (double quotes, doubled inside)."""
    return '"' + name.replace('"', '""') + '"'


def listen_sql(channels: Iterable[str]) -> bytes:
    """One simple-protocol query that LISTENs to every channel in one round trip."""
    return "".join(f"LISTEN {quote_ident(c)};" for c in channels).encode()


def unlisten_sql(channels: Iterable[str] | None) -> bytes:
    """UNLISTEN the given channels, or all of them when *channels* is None."""
    if channels is None:
        return b"UNLISTEN *"
    return "".join(f"UNLISTEN {quote_ident(c)};" for c in channels).encode()
