"""Publishing through pgcast's log, pure: whether a message can go out as a
plain NOTIFY or must go through the log (:func:`publish_query`,
:func:`publish_many_query`), the statement either way, and the *reference
payload* NOTIFY carries for a message kept in the log (:func:`ref_payload`,
:func:`parse_ref`). Re-exported by :mod:`pgcast.durable._core`.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._channels import check_channel
from .._errors import PayloadError
from .._notify_many import message_pairs, notify_many_params, plain_messages
from .._payload import MAX_PAYLOAD_BYTES, Payload, to_text
from ._schema import REF_PREFIX, Query

__all__ = ["needs_log", "parse_ref", "publish_many_query", "publish_query", "ref_payload"]

# -- publishing ----------------------------------------------------------------

NOTIFY_LOGGED_SQL = "SELECT pgcast.notify(%s, %s, %s)"
NOTIFY_MANY_LOGGED_SQL = "SELECT pgcast.notify_many(%s::text[], %s::text[], %s)"


def _checked(payload: Payload) -> tuple[str, bool]:
    """The text of *payload*, and whether it must go through the log."""
    text = to_text(payload)
    if "\x00" in text:
        raise PayloadError("payload contains a NUL character, which PostgreSQL text cannot hold")
    if text.isascii():  # the common case: one byte per character
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise PayloadError(f"payload is not valid Unicode: {exc}") from exc
    return text, size >= MAX_PAYLOAD_BYTES or text.startswith("\x1e")


def needs_log(text: str) -> bool:
    """Whether *text* cannot travel as a plain NOTIFY payload: 8000 bytes or
    more in UTF-8, or starting like a reference payload.

    :raises PayloadError: NUL, or not valid Unicode.
    """
    return _checked(text)[1]


def publish_query(channel: str, payload: Payload, durable: bool) -> tuple[Query, bool]:
    """The statement sending one message, and whether it uses the log.

    A durable message, and one that NOTIFY cannot carry, goes through
    ``pgcast.notify()`` (which returns its id); anything else is a plain
    ``pg_notify``.
    """
    check_channel(channel)
    text, too_large = _checked(payload)
    if durable or too_large:
        return (NOTIFY_LOGGED_SQL, (channel, text, durable)), True
    return ("SELECT pg_notify(%s, %s)", (channel, text)), False


def publish_many_query(
    messages: Iterable[tuple[str, Payload]], durable: bool
) -> tuple[Query, bool] | None:
    """The statement sending every message in one round trip (``None``: no
    messages), and whether it uses the log. All are checked first."""
    pairs = message_pairs(messages)
    if not pairs:
        return None
    # The usual batch (short ASCII text, not durable) is checked all at once.
    plain = None if durable else plain_messages(pairs)
    if plain is not None:
        return notify_many_params(*plain), False
    channels: list[str] = []
    texts: list[str] = []
    logged = durable
    for channel, payload in pairs:
        channels.append(check_channel(channel))
        text, too_large = _checked(payload)
        texts.append(text)
        logged = logged or too_large
    if not channels:
        return None
    if logged:
        return (NOTIFY_MANY_LOGGED_SQL, (channels, texts, durable)), True
    return notify_many_params(channels, texts), False


# -- reference payloads --------------------------------------------------------


def ref_payload(id: int, payload: str | None = None) -> str:
    """What NOTIFY carries for log row *id*: with *payload* inline, or not."""
    if payload is None:
        return f"{REF_PREFIX}{id}"
    return f"{REF_PREFIX}{id}:{payload}"


_REF_START = len(REF_PREFIX)


def parse_ref(text: str) -> tuple[int, str | None] | None:
    """The log id and inline payload (``None``: to fetch) of a reference
    payload, or ``None`` if *text* is not one (then it is an ordinary payload)."""
    # On the receive path of every durable message: string methods, no regex.
    if not text.startswith(REF_PREFIX):
        return None
    colon = text.find(":", _REF_START)
    digits = text[_REF_START:] if colon < 0 else text[_REF_START:colon]
    if not (0 < len(digits) <= 19 and digits.isascii() and digits.isdigit()):
        return None
    return int(digits), (None if colon < 0 else text[colon + 1:])
