"""A frame for clients, encoded once for every recipient.

One notification is sent to thousands of clients, so its JSON text is made
once (:func:`pgcast.gateway._protocol.message`) and so are its bytes on each
wire, the first time a client of that transport needs them:

* :attr:`Frame.ws`: the whole WebSocket frame. Server frames are not masked
  and the gateway turns per-message compression off, so the bytes are the
  same for every client and go to each socket as they are (``websockets``
  builds them: a header of 2 to 10 bytes, then the UTF-8 text).
* :attr:`Frame.sse_data`: the ``data:`` lines of a Server-Sent Event and the
  blank line that ends it. A durable message's ``id:`` line differs per
  client (it carries the client's position on each of its channels), so it
  is written before these shared bytes, not cached with them.

Pure: no socket, no event loop.
"""

from __future__ import annotations

from websockets.frames import Frame as _WireFrame
from websockets.frames import Opcode

__all__ = ["Frame", "sse_event", "ws_text_frame"]


class Frame:
    """One frame queued for a client: JSON text, shared by every recipient."""

    __slots__ = ("_sse", "_ws", "channel", "id", "is_message", "received", "text")

    def __init__(
        self,
        text: str,
        id: str | None = None,
        is_message: bool = False,
        channel: str | None = None,
        received: float | None = None,
    ) -> None:
        #: The JSON object, as sent in a WebSocket text frame or an SSE ``data:`` line.
        self.text = text
        #: The durable event id (the SSE ``id:`` line), if the event has one.
        self.id = id
        #: Whether this is a ``message`` frame (counted as a message out).
        self.is_message = is_message
        #: The channel of a ``message`` frame.
        self.channel = channel
        #: When the notification of a ``message`` frame arrived from
        #: PostgreSQL (``time.monotonic()``), for the delivery latency
        #: metric; None for a replayed one.
        self.received = received
        self._ws: bytes | None = None
        self._sse: bytes | None = None

    def __repr__(self) -> str:
        return f"Frame({self.text!r}, id={self.id!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.text, self.id, self.is_message, self.channel) == (
            other.text, other.id, other.is_message, other.channel)

    def __hash__(self) -> int:
        return hash((self.text, self.id))

    @property
    def ws(self) -> bytes:
        """The WebSocket text frame, built on first use and then shared."""
        wire = self._ws
        if wire is None:
            wire = self._ws = ws_text_frame(self.text)
        return wire

    @property
    def sse_data(self) -> bytes:
        """The event's ``data:`` lines and its closing blank line, built on
        first use and then shared (an ``id:`` line, if any, goes before)."""
        data = self._sse
        if data is None:
            data = self._sse = sse_event(self.text).encode()
        return data


def ws_text_frame(text: str) -> bytes:
    """A complete, unmasked WebSocket text frame carrying *text*."""
    return _WireFrame(Opcode.TEXT, text.encode()).serialize(mask=False)


def sse_event(data: str, event_id: str | None = None, retry_ms: int | None = None) -> str:
    """One SSE event: optional ``id:`` and ``retry:`` lines, then *data*.

    Each line of *data* gets its own ``data:`` field, so a newline in it
    cannot end the event early; CR and LF in an id are refused, since they
    would split the ``id:`` line.
    """
    parts = []
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
