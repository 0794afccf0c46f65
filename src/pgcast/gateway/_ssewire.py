"""Server-Sent Events framing, pure: an event's ``event:``, ``id:``,
``retry:`` and ``data:`` lines, the ``id:`` of a client with durable
channels, comments. Re-exported by :mod:`pgcast.gateway._protocol`.
"""

from __future__ import annotations

import json

__all__ = ["sse_comment", "sse_event", "sse_position"]


def sse_event(
    data: str, event_id: str | None = None, retry_ms: int | None = None,
    event: str | None = None,
) -> str:
    """One SSE event: optional ``event:``, ``id:`` and ``retry:`` lines, then *data*.

    Each line of *data* gets its own ``data:`` field, so a newline in it
    cannot end the event early; CR and LF in an id are refused, since they
    would split the ``id:`` line.
    """
    parts = []
    if event is not None:
        parts.append(f"event: {event}\n")
    if event_id is not None:
        if "\n" in event_id or "\r" in event_id or "\x00" in event_id:
            raise ValueError(f"SSE event id must not contain CR, LF or NUL: {event_id!r}")
        parts.append(f"id: {event_id}\n")
    if retry_ms is not None:
        parts.append(f"retry: {int(retry_ms)}\n")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts)


def sse_position(positions: dict[str, int]) -> str:
    """The SSE ``id:`` of a client with durable channels: the log id reached
    on each, as JSON, so ``Last-Event-ID`` resumes every channel where it was
    (ids grow in commit order per channel, not across channels)."""
    return json.dumps(positions, separators=(",", ":"), ensure_ascii=False)


def sse_comment(text: str = "") -> str:
    """An SSE comment line: ignored by EventSource, keeps the stream alive."""
    return "".join(f": {line}\n" for line in text.split("\n")) + "\n"
