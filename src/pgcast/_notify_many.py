"""The statement that sends many plain notifications in one round trip.

``notify_many`` and the Publisher send their messages as one statement, so one
round trip and one transaction: ``pg_notify`` over ``unnest`` of the channel
and payload arrays, in array order. The arrays travel as text literals built
here (:func:`text_array`), not through psycopg's list adapter, which costs
about a microsecond per element in Python and made ``notify_many`` several
times slower than the server's own rate (benchmarks/bench_publish.py). When
every message is on one channel, the usual case, only the payloads go as an
array.

:func:`plain_messages` is the fast check for the common batch: every payload a
plain ASCII ``str`` that NOTIFY carries as it is. It checks the whole batch
with a few C-level string operations instead of one Python call per message;
anything else (JSON payloads, non-ASCII text, sizes near the limit, reference
payloads for :mod:`pgcast.durable`) returns None and goes the careful way.

Everything here is pure: no connection, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any, cast

from ._channels import check_channel
from ._payload import MAX_PAYLOAD_BYTES, Payload

__all__ = [
    "NOTIFY_MANY_ONE_CHANNEL_SQL",
    "NOTIFY_MANY_SQL",
    "message_pairs",
    "notify_many_params",
    "plain_messages",
    "text_array",
]

NOTIFY_MANY_SQL = "SELECT count(pg_notify(c, p)) FROM unnest(%s::text[], %s::text[]) AS t(c, p)"
NOTIFY_MANY_ONE_CHANNEL_SQL = "SELECT count(pg_notify(%s, p)) FROM unnest(%s::text[]) AS p"


def text_array(items: Sequence[str]) -> str:
    """*items* as a PostgreSQL ``text[]`` literal.

    Every element is double-quoted, with ``"`` and backslash escaped, so
    commas, braces, spaces, ``NULL`` and empty strings stay plain text. NUL
    cannot be represented; callers have refused it already.
    """
    if not items:
        return "{}"
    joined = "".join(items)
    if '"' in joined or "\\" in joined:
        items = [item.replace("\\", "\\\\").replace('"', '\\"') for item in items]
    return '{"' + '","'.join(items) + '"}'


def notify_many_params(channels: list[str], payloads: list[str]) -> tuple[str, tuple[str, str]]:
    """The statement and parameters sending checked messages (at least one),
    in order, in one round trip."""
    first = channels[0]
    if channels.count(first) == len(channels):
        return NOTIFY_MANY_ONE_CHANNEL_SQL, (first, text_array(payloads))
    return NOTIFY_MANY_SQL, (text_array(channels), text_array(payloads))


def _only_pairs(messages: list[Any]) -> bool:
    """Whether every one of *messages* is a tuple of two (C-level loops)."""
    return {tuple} >= set(map(type, messages)) and {2} >= set(map(len, messages))


def message_pairs(messages: Iterable[object]) -> list[tuple[str, Payload]]:
    """*messages* as a list of ``(channel, payload)`` pairs, checked for shape.

    :raises TypeError: *messages* is not iterable, or one of them is not a
        pair (a tuple or list of two); the error names its index.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Iterable):
        raise TypeError(
            "messages must be an iterable of (channel, payload) pairs, "
            f"not {type(messages).__name__}"
        )
    # The usual call, a list of tuples, is checked by C-level loops (one
    # Python turn per message was a tenth of notify_many()'s client time); a
    # generator is not listed first: it stops at a bad message.
    if type(messages) is list and _only_pairs(messages):
        return cast("list[tuple[str, Payload]]", messages.copy())
    pairs: list[tuple[str, Payload]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, tuple | list) or len(message) != 2:
            shape = (
                f"a {type(message).__name__} of {len(message)}"
                if isinstance(message, tuple | list)
                else f"a {type(message).__name__}"
            )
            raise TypeError(
                f"message {index} must be a (channel, payload) pair, not {shape}: "
                f"{message!r:.100}"
            )
        pairs.append((message[0], message[1]))
    return pairs


def plain_messages(
    pairs: Sequence[tuple[str, Payload]],
) -> tuple[list[str], list[str]] | None:
    """``(channels, payloads)`` if every message can go as it is, else None.

    Channels are checked (each distinct one once) and raise
    :class:`InvalidChannelError` as usual. Payloads qualify when all are
    ASCII ``str`` without NUL, under the size limit, and none starts with
    ``\\x1e`` (the mark of a :mod:`pgcast.durable` reference payload); a
    batch that does not qualify is left to the caller's per-message checks,
    which also produce the right error.
    """
    channels: list[str] = list(map(itemgetter(0), pairs))
    payloads: list[Any] = list(map(itemgetter(1), pairs))
    try:
        joined = "".join(payloads)
    except TypeError:  # not all str: dicts and lists become JSON
        return None
    if (
        not joined.isascii()  # otherwise len() is not the size in bytes
        or "\x00" in joined
        # Each pass over the batch costs: none is longer than all together,
        # and none starts with \x1e if none has one.
        or (len(joined) >= MAX_PAYLOAD_BYTES and max(map(len, payloads)) >= MAX_PAYLOAD_BYTES)
        # NUL is in no payload, so it separates them: no payload starts with \x1e.
        or ("\x1e" in joined and "\x00\x1e" in "\x00" + "\x00".join(payloads))
    ):
        return None
    distinct: Sequence[object] = channels[:1]  # the usual batch: one channel
    if channels and channels.count(channels[0]) != len(channels):
        try:
            distinct = list(dict.fromkeys(channels))
        except TypeError:  # an unhashable "channel": check_channel says what is wrong
            distinct = channels
    for channel in distinct:
        check_channel(channel)
    return channels, payloads
