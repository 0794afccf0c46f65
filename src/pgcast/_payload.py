"""Payloads: what NOTIFY can carry, checked before anything is sent.

PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (counted in the
server encoding, which pgcast sets to UTF-8) and one containing NUL. Checking
here, before the round trip, gives an error that names the limit and the
payload's size, and leaves the connection untouched. Dicts and lists are sent
as compact JSON; :meth:`pgcast.Event.json` decodes them on the other side.

Everything here is pure: no connection, no I/O.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import TypeAlias

from ._errors import PayloadError, PayloadTooLargeError

__all__ = ["MAX_PAYLOAD_BYTES", "Payload", "encode_payload", "payload_size"]

#: NOTIFY payloads must be strictly shorter than this many bytes.
MAX_PAYLOAD_BYTES = 8000

#: What :meth:`PubSub.notify` accepts: text as it is, dicts and lists as JSON.
Payload: TypeAlias = str | Mapping[str, object] | list[object] | tuple[object, ...] | None


def payload_size(text: str) -> int:
    """The size of *text* in UTF-8, the unit of PostgreSQL's limit."""
    return len(text.encode("utf-8"))


def to_text(payload: Payload) -> str:
    """Turn *payload* into the text to send, without checking its size."""
    if payload is None:
        return ""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, Mapping | list | tuple):
        try:
            # allow_nan=False: NaN and Infinity are not JSON, and a consumer
            # in another language would fail to parse the payload.
            return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"payload cannot be encoded as JSON: {exc}") from exc
        except RecursionError as exc:
            raise PayloadError(
                "payload cannot be encoded as JSON: it nests deeper than Python's "
                f"recursion limit ({sys.getrecursionlimit()}) allows"
            ) from exc
    raise PayloadError(
        f"payload must be a str, or a dict or list to send as JSON, not {type(payload).__name__}"
    )


def encode_payload(payload: Payload, limit: int = MAX_PAYLOAD_BYTES) -> str:
    """Return the text NOTIFY will carry for *payload*, or raise.

    :raises PayloadTooLargeError: the UTF-8 text is *limit* bytes or more.
    :raises PayloadError: the text contains NUL, is not valid Unicode, or the
        payload is of a type pgcast cannot send.
    """
    text = to_text(payload)
    if "\x00" in text:
        raise PayloadError("payload contains a NUL character, which NOTIFY cannot carry")
    if text.isascii():  # the common case: one byte per character, no encoding needed
        size = len(text)
    else:
        try:
            size = payload_size(text)
        except UnicodeEncodeError as exc:
            raise PayloadError(f"payload is not valid Unicode: {exc}") from exc
    if size >= limit:
        raise PayloadTooLargeError(size, limit)
    return text
