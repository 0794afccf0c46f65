"""The gateway's wire protocol: client frames in, server frames out, SSE framing.

Everything here is pure (no socket, no event loop), so every rule of the
protocol is decided once, for the WebSocket and the Server-Sent Events
transports alike, and tested without a server.

Client to server (JSON text frames; ``ref`` is optional in each and, when
given as a string or an integer, is echoed in the reply so a client can match
replies to requests)::

    {"type": "subscribe",   "channels": ["a", "b"]}   (+ "since": ID or {"a": ID}, "epoch": "E")
    {"type": "unsubscribe", "channels": ["a"]}
    {"type": "publish",     "channel": "a", "payload": "text or JSON value"}
    {"type": "ping"}

Server to client::

    {"type": "subscribed",   "channels": [...]}      once LISTEN is in effect
                         (+ "epoch", + with since: "recovered", "oldest", "reason")
    {"type": "unsubscribed", "channels": [...]}
    {"type": "published",    "channel": "a"}         the NOTIFY was sent
    {"type": "message", "channel": "a", "payload": "...", "pid": 123}   (+ "id" when durable,
                         + "raw": the payload's bytes in base64 when they are not UTF-8)
    {"type": "error",   "message": "..."}            the request was refused; nothing changed
    {"type": "notice",  "event": "...", "message": "..."}   reconnected, dropped, shutdown,
                                                            gap
    {"type": "pong"}

**Resuming durable channels.** ``since`` is the last id the client saw (one,
or per channel), ``epoch`` the log epoch it came from (as ``subscribed``
gave it). ``subscribed`` carries ``epoch`` whenever a durable channel is
among the channels; with ``since``, also ``"recovered": {"a": true, "b":
false}`` per resumed durable channel, and for each ``false`` one ``"oldest":
{"b": ID or null}`` (the oldest id the log still holds) and ``"reason":
{"b": "pruned" or "epoch"}``; the replay follows (from the log's start after
an epoch change). A gap found during the replay (a prune racing it) comes as
``{"type": "notice", "event": "gap", "channel", "since", "oldest", "reason",
"epoch"}``; SSE sends every incomplete resume so, as ``event: notice``,
before the replay, and its ``id:`` lines carry the epoch under the key
``""``. On a schema before version 2, ``recovered`` is left out (unknown).
See :mod:`pgcast.gateway._resume`.

:func:`parse_frame` turns a frame into a :data:`Command` or raises
:class:`~pgcast.ProtocolError` whose message is fit to send back verbatim.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any, NamedTuple, TypeAlias
from urllib.parse import parse_qsl

from .._channels import check_channels
from .._errors import InvalidChannelError, PayloadError, ProtocolError
from .._event import Event, UndecodableEvent
from .._payload import encode_payload
from ._frame import Frame, sse_event
from ._json import _json_kind, _short, _utf8_size, loads

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_TOKEN_CHARS",
    "Auth",
    "Command",
    "Frame",
    "Ping",
    "Publish",
    "Ref",
    "Since",
    "Subscribe",
    "Unsubscribe",
    "authenticated",
    "error",
    "event_message",
    "gap_notice",
    "message",
    "notice",
    "parse_epoch",
    "parse_frame",
    "parse_position",
    "parse_since",
    "pong",
    "published",
    "query_utf8_error",
    "sse_comment",
    "sse_event",
    "sse_position",
    "subscribed",
    "unsubscribed",
]

#: The default limit on the size of one client frame, in bytes of UTF-8.
MAX_FRAME_BYTES = 16 * 1024

#: A client's request tag, echoed in the reply.
Ref: TypeAlias = "str | int | None"

_MAX_REF_CHARS = 64
_MAX_ID = 2**63 - 1
_MAX_EPOCH_CHARS = 64

#: Where a durable subscription resumes: one log id for every channel, or one
#: per channel; messages with a larger id are replayed, then live ones follow.
Since: TypeAlias = "int | dict[str, int] | None"


class Subscribe(NamedTuple):
    """Start receiving messages on :attr:`channels` (exact names)."""

    channels: tuple[str, ...]
    ref: Ref = None
    since: Since = None
    epoch: str | None = None
    """The log epoch the ids of :attr:`since` came from (``None``: unknown)."""


class Unsubscribe(NamedTuple):
    """Stop receiving messages on :attr:`channels`."""

    channels: tuple[str, ...]
    ref: Ref = None


class Publish(NamedTuple):
    """Send :attr:`payload` (already checked and encoded) on :attr:`channel`."""

    channel: str
    payload: str
    ref: Ref = None


class Ping(NamedTuple):
    """Ask for a ``pong``: an application-level liveness check."""

    ref: Ref = None


class Auth(NamedTuple):
    """Authenticate with :attr:`token`: the first frame of a client that
    gave no token in the handshake, or later a fresh token (one that is
    about to expire, say), which replaces the client's access."""

    token: str
    ref: Ref = None


#: Every request a client can make.
Command: TypeAlias = "Subscribe | Unsubscribe | Publish | Ping | Auth"

#: The longest token an ``auth`` frame may carry, in characters.
MAX_TOKEN_CHARS = 8192


class EventFrame(Frame):
    """A frame that SSE sends as a named event (``event: NAME`` before its
    ``data:`` lines); a WebSocket sends its text like any other."""

    __slots__ = ("sse_name",)

    def __init__(self, text: str, sse_name: str) -> None:
        super().__init__(text)
        #: The SSE event name.
        self.sse_name = sse_name

    @property
    def sse_data(self) -> bytes:
        """The ``event:`` line, then the ``data:`` lines."""
        return f"event: {self.sse_name}\n".encode() + super().sse_data


def query_utf8_error(query: bytes) -> str | None:
    """Why a raw query string is refused, or None: percent-encoded bytes
    that are not UTF-8 (``%FF``, an encoded surrogate ``%ED%A0%80``), which
    a lenient decoding turns into U+FFFD, a channel or token the client
    never sent."""
    try:
        parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="utf-8",
                  errors="strict")
    except UnicodeDecodeError as exc:
        return (f"the query string is not UTF-8 once percent-decoded "
                f"({exc.reason} at byte {exc.start})")
    return None


# -- client frames -----------------------------------------------------------


def parse_frame(data: str | bytes | None, max_bytes: int = MAX_FRAME_BYTES) -> Command:
    """Decode and validate one client frame.

    :raises ProtocolError: the frame is binary and not UTF-8, over *max_bytes*,
        not a JSON object, of an unknown type, or has a missing or mistyped
        field, a bad channel name or an unsendable payload. The message says
        which, and the limit where there is one.
    """
    if data is None:
        raise ProtocolError("empty frame: send a JSON object with a \"type\" field")
    if isinstance(data, bytes):
        size = len(data)
        if size > max_bytes:
            raise ProtocolError(f"frame is {size} bytes; the limit is {max_bytes} bytes")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("binary frame is not UTF-8 JSON text") from None
    else:
        # One byte per character at least, so only long frames pay for encoding.
        size = len(data) if len(data) * 4 <= max_bytes else _utf8_size(data)
        if size > max_bytes:
            raise ProtocolError(f"frame is {size} bytes; the limit is {max_bytes} bytes")
    try:
        obj = loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(
            f"frame must be a JSON object with a \"type\" field, not {_json_kind(obj)}"
        )
    ref = _ref(obj)
    kind = obj.get("type")
    if kind == "subscribe":
        channels = _channels(obj, kind)
        since = parse_since(obj.get("since"), channels)
        return Subscribe(channels, ref, since, parse_epoch(obj.get("epoch")))
    if kind == "unsubscribe":
        return Unsubscribe(_channels(obj, kind), ref)
    if kind == "publish":
        return _publish(obj, ref)
    if kind == "ping":
        return Ping(ref)
    if kind == "auth":
        return Auth(_token(obj), ref)
    if "type" not in obj:
        raise ProtocolError("frame has no \"type\" field")
    raise ProtocolError(
        f"unknown frame type {_short(kind)}; expected subscribe, unsubscribe, publish, ping "
        "or auth"
    )


def _ref(obj: dict[str, Any]) -> Ref:
    ref = obj.get("ref")
    if ref is None:
        return None
    if isinstance(ref, bool) or not isinstance(ref, str | int):
        raise ProtocolError(f"\"ref\" must be a string or an integer, not {_json_kind(ref)}")
    if isinstance(ref, str) and len(ref) > _MAX_REF_CHARS:
        raise ProtocolError(f"\"ref\" is {len(ref)} characters; the limit is {_MAX_REF_CHARS}")
    if isinstance(ref, int) and not -(2**53) <= ref <= 2**53:
        raise ProtocolError("\"ref\" must be an integer JavaScript can represent exactly")
    return ref


def _token(obj: dict[str, Any]) -> str:
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        raise ProtocolError(f"auth needs \"token\": a non-empty string, not {_json_kind(token)}")
    if len(token) > MAX_TOKEN_CHARS:
        raise ProtocolError(
            f"\"token\" is {len(token)} characters; the limit is {MAX_TOKEN_CHARS}"
        )
    return token


def _channels(obj: dict[str, Any], kind: str) -> tuple[str, ...]:
    channels = obj.get("channels")
    if channels is None and isinstance(obj.get("channel"), str):
        channels = [obj["channel"]]  # the singular form, a common slip
    if channels is None:
        raise ProtocolError(f"{kind} needs \"channels\": a list of channel names")
    if not isinstance(channels, list):
        raise ProtocolError(
            f"\"channels\" must be a list of channel names, not {_json_kind(channels)}"
        )
    if not channels:
        raise ProtocolError("\"channels\" is empty")
    try:
        names = check_channels(channels)
    except InvalidChannelError as exc:
        raise ProtocolError(str(exc)) from None
    return tuple(dict.fromkeys(names))


def _log_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_ID:
        raise ProtocolError(f"{what} must be a log id (an integer >= 0), not {_short(value)}")
    return value


def parse_epoch(value: object) -> str | None:
    """Validate a log epoch sent back by a client: ``None``, or the string a
    ``subscribed`` reply gave (1 to 64 printable ASCII characters).

    :raises ProtocolError: anything else.
    """
    if value is None:
        return None
    if not (isinstance(value, str) and 0 < len(value) <= _MAX_EPOCH_CHARS
            and value.isascii() and value.isprintable()):
        raise ProtocolError(
            "epoch must be the string a subscribed reply gave (1 to "
            f"{_MAX_EPOCH_CHARS} printable ASCII characters), not {_short(value)}"
        )
    return value


def parse_since(value: object, channels: Iterable[str] = ()) -> Since:
    """Validate a resume position: ``None``, a log id, or ``{channel: id}``
    whose channels must be among *channels* when those are given.

    Strings are parsed as JSON first (an SSE ``Last-Event-ID`` or ``?since=``).

    :raises ProtocolError: anything else, saying what was expected.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = loads(value)
        except (ValueError, RecursionError):
            raise ProtocolError(
                f"since must be a log id or a JSON object of log ids, not {_short(value)}"
            ) from None
    if isinstance(value, dict):
        names = set(channels)
        out = {}
        for channel, position in value.items():
            if names and channel not in names:
                raise ProtocolError(f"since names {channel!r}, which is not being subscribed to")
            out[channel] = _log_id(position, f"since[{channel!r}]")
        return out
    return _log_id(value, "since")


def _publish(obj: dict[str, Any], ref: Ref) -> Publish:
    channel = obj.get("channel")
    if channel is None:
        raise ProtocolError("publish needs \"channel\": a channel name")
    try:
        (name,) = check_channels([channel])
    except InvalidChannelError as exc:
        raise ProtocolError(str(exc)) from None
    payload = obj.get("payload", "")
    if not isinstance(payload, str):
        # Any other JSON value is sent as its compact JSON text.
        payload = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    try:
        text = encode_payload(payload)
    except PayloadError as exc:
        raise ProtocolError(str(exc)) from None
    return Publish(name, text, ref)


# -- server frames -----------------------------------------------------------


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _with_ref(obj: dict[str, Any], ref: Ref) -> dict[str, Any]:
    if ref is not None:
        obj["ref"] = ref
    return obj


def subscribed(
    channels: Iterable[str],
    ref: Ref = None,
    *,
    epoch: str | None = None,
    gaps: dict[str, tuple[int | None, str] | None] | None = None,
) -> Frame:
    """The reply to a subscribe, sent once LISTEN is in effect for every channel.

    *epoch*: the log's epoch (a durable channel is among *channels*).
    *gaps*: for a subscribe with ``since``, each resumed durable channel:
    ``None`` when its replay is complete, else ``(oldest, reason)``.
    """
    obj: dict[str, Any] = {"type": "subscribed", "channels": list(channels)}
    if epoch is not None:
        obj["epoch"] = epoch
    if gaps is not None:
        obj["recovered"] = {c: gap is None for c, gap in gaps.items()}
        lost = {c: gap for c, gap in gaps.items() if gap is not None}
        if lost:
            obj["oldest"] = {c: gap[0] for c, gap in lost.items()}
            obj["reason"] = {c: gap[1] for c, gap in lost.items()}
    return Frame(_dump(_with_ref(obj, ref)))


def gap_notice(
    channel: str, since: int, oldest: int | None, reason: str, epoch: str | None
) -> Frame:
    """A resume of *channel* from *since* that is not complete: messages
    after it were pruned, or it is from another epoch. An SSE ``notice``
    event; on a WebSocket a ``notice`` frame like the others."""
    text = _dump({"type": "notice", "event": "gap", "channel": channel, "since": since,
                  "oldest": oldest, "reason": reason, "epoch": epoch,
                  "message": f"messages of {channel!r} after {since} are no longer in the "
                             f"log ({reason}); the replay goes on from what is left"})
    return EventFrame(text, "notice")


def unsubscribed(channels: Iterable[str], ref: Ref = None) -> Frame:
    """The reply to an unsubscribe: no message on *channels* follows it."""
    return Frame(_dump(_with_ref({"type": "unsubscribed", "channels": list(channels)}, ref)))


def published(channel: str, ref: Ref = None) -> Frame:
    """The reply to a publish: PostgreSQL accepted the NOTIFY."""
    return Frame(_dump(_with_ref({"type": "published", "channel": channel}, ref)))


def event_message(event: Event, received: float | None = None) -> Frame:
    """:func:`message` for *event* (its log id if durable, bytes if undecodable)."""
    raw = event.raw if isinstance(event, UndecodableEvent) else None
    return message(event.channel, event.payload, event.pid, getattr(event, "id", None),
                   received, raw=raw)


def message(channel: str, payload: str, pid: int, event_id: object = None,
            received: float | None = None, *, raw: bytes | None = None) -> Frame:
    """One notification, encoded once and shared by every subscriber;
    *received*: when it arrived (see :attr:`Frame.received`); *raw*: the
    payload's bytes when not UTF-8 (:class:`~pgcast.UndecodableEvent`)."""
    obj: dict[str, Any] = {"type": "message", "channel": channel, "payload": payload, "pid": pid}
    if raw is not None:
        obj["raw"] = base64.b64encode(raw).decode("ascii")
    sid = None
    if event_id is not None:
        obj["id"] = event_id
        sid = str(event_id)
    return Frame(_dump(obj), sid, True, channel, received)


def error(text: str, ref: Ref = None) -> Frame:
    """A refused request; the state is as it was before the request."""
    return Frame(_dump(_with_ref({"type": "error", "message": text}, ref)))


def notice(event: str, text: str, **fields: Any) -> Frame:
    """Something the client should know that is not a reply: ``reconnected``,
    ``dropped`` (with ``count``), ``shutdown``."""
    return Frame(_dump({"type": "notice", "event": event, "message": text, **fields}))


def authenticated(ref: Ref = None, expires: float | None = None) -> Frame:
    """The reply to an ``auth`` frame: the token was accepted (and, if the
    authorizer said so, is valid until *expires*, Unix time in seconds)."""
    obj: dict[str, Any] = {"type": "authenticated"}
    if expires is not None:
        obj["expires"] = expires
    return Frame(_dump(_with_ref(obj, ref)))


def pong(ref: Ref = None) -> Frame:
    """The reply to a ping."""
    return Frame(_dump(_with_ref({"type": "pong"}, ref)))


# -- Server-Sent Events ------------------------------------------------------


def sse_position(positions: dict[str, int], epoch: str | None = None) -> str:
    """The SSE ``id:`` of a client with durable channels: the log id reached
    on each, as JSON, so ``Last-Event-ID`` resumes every channel where it was
    (ids grow in commit order per channel, not across channels); and, under
    the key ``""`` (never a channel name), the log's *epoch*, so that an
    EventSource that reconnects by itself is checked against it too."""
    if epoch is None:
        return _dump(positions)
    return _dump({**positions, "": epoch})


def parse_position(value: str | None) -> tuple[Since, str | None]:
    """Read an SSE ``Last-Event-ID`` or ``?since=``: the positions
    (:func:`parse_since`) and the epoch the ``""`` key carries, if any.

    :raises ProtocolError: what :func:`parse_since` and :func:`parse_epoch`
        refuse.
    """
    if value is None:
        return None, None
    try:
        obj = loads(value)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict) and "" in obj:
        epoch = parse_epoch(obj.pop(""))
        return parse_since(obj), epoch
    return parse_since(value), None


def sse_comment(text: str = "") -> str:
    """An SSE comment line: ignored by EventSource, keeps the stream alive."""
    return "".join(f": {line}\n" for line in text.split("\n")) + "\n"
