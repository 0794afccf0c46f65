"""The Server-Sent Events transport: ``GET /sse?channel=a&channel=b``.

Each SSE event's ``data:`` is one server frame of the WebSocket protocol as
JSON (``subscribed`` first, once LISTEN is in effect, then ``message``,
``notice`` ...), so ``EventSource.onmessage`` sees the same objects a
WebSocket client does. A comment line is sent every ``heartbeat`` seconds so
proxies and clients can tell a quiet stream from a dead one; a write the
client does not take within :data:`STALL_TIMEOUT` seconds ends the stream
(a slow consumer).

Durable messages carry an ``id:`` line: the log position reached on each of
the client's durable channels, as JSON (``{"orders": 42}``). EventSource
sends the last one back as ``Last-Event-ID`` when it reconnects, and the
stream resumes each channel after its position (``?since=ID`` or
``?since={"orders": 42}`` does the same for a first connection; ``?epoch=E``
names the log epoch the positions came from, as the ``subscribed`` data
gave it; the ``id:`` lines carry it under the key ``""``, so EventSource's
own reconnects are checked against it). A resume that cannot be complete
(messages after the position were pruned, or it is from another epoch) is
announced before the replay by an ``event: notice`` whose data is
``{"event": "gap", "channel", "since", "oldest", "reason", ...}`` (see
:mod:`pgcast.gateway._resume`).

Everything that can be refused is checked before the stream starts, with a
plain-text HTTP error: a bad origin or token (403), no or bad channel names
(400), a channel outside the allow-list (403), too many channels (400), a full
gateway or one at its ``max_channels`` (503).

This is a raw ASGI app rather than a ``StreamingResponse``: the gateway must
be able to stop writing to a client that stopped reading (a full queue), and
only the task that owns ``send`` can be cancelled for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from .._channels import check_channels
from .._errors import AccessDenied, InvalidChannelError, ProtocolError
from . import _protocol
from ._client import CLOSE_SLOW_CONSUMER, Client, TooManyFromAddress, address_of
from ._hub import Hub
from ._protocol import Since
from .auth import client_token, origin_allowed

__all__ = ["SSEEndpoint"]

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]

#: What EventSource waits before reconnecting after the stream ends, in ms.
RETRY_MS = 2000

#: Seconds a write may wait for the client to read (its socket is full):
#: SSE has no pings, so a client that stops reading while no more messages
#: come (no overflow) was never found out, and held its socket and queue
#: (with replayed messages, its own) for as long as it liked.
STALL_TIMEOUT = 30.0


class SSEEndpoint:
    """The ASGI app serving ``/sse`` for *hub*."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.hub
        request = Request(scope, receive)
        if request.method not in ("GET", "HEAD"):
            await PlainTextResponse("use GET", 405, {"allow": "GET"})(scope, receive, send)
            return
        try:
            client, channels, since, epoch = await self._admit(request)
        except _Refusal as r:
            await PlainTextResponse(r.message, r.status)(scope, receive, send)
            return
        try:
            await self._stream(client, (channels, since, epoch), scope, receive, send)
        finally:
            hub.detach(client)

    async def _admit(
        self, request: Request
    ) -> tuple[Client, tuple[str, ...], Since, str | None]:
        hub = self.hub
        origin = request.headers.get("origin")
        if not origin_allowed(origin, request.headers.get("host"), hub.settings.allowed_origins):
            hub.stats.rejected["origin"] += 1
            raise _Refusal(403, f"origin {origin!r} is not allowed by this gateway")
        bad_query = _protocol.query_utf8_error(request.scope.get("query_string", b""))
        if bad_query is not None:
            raise _Refusal(400, bad_query)
        names = request.query_params.getlist("channel")
        if not names:
            raise _Refusal(400, "name at least one channel: /sse?channel=NAME&channel=...")
        try:
            channels = tuple(dict.fromkeys(check_channels(names)))
        except InvalidChannelError as exc:
            raise _Refusal(400, str(exc)) from None
        try:
            since, id_epoch = _protocol.parse_position(
                request.headers.get("last-event-id") or request.query_params.get("since")
            )
            epoch = _protocol.parse_epoch(request.query_params.get("epoch")) or id_epoch
        except ProtocolError as exc:
            raise _Refusal(400, str(exc)) from None
        if len(channels) > hub.settings.max_subscriptions:
            raise _Refusal(
                400,
                f"{len(channels)} channels requested; the limit per client is "
                f"{hub.settings.max_subscriptions}",
            )
        try:
            hub.check_room(request)
        except AccessDenied as exc:
            raise _Refusal(_status(exc), str(exc)) from None
        token = client_token(request, hub.settings.token_cookie)
        try:
            access = await hub.authorize(request, token)
        except AccessDenied as exc:
            hub.stats.rejected["auth"] += 1
            raise _Refusal(403, str(exc) or "access denied") from None
        refused = [c for c in channels if not access.can_read(c)]
        if refused:
            hub.stats.rejected["auth"] += 1
            names_ = ", ".join(repr(c) for c in refused[:5])
            raise _Refusal(403, f"not allowed to subscribe to {names_}: "
                                "not in this gateway's allow-list")
        try:
            hub.router.check_room(channels)  # max_channels
        except ProtocolError as exc:
            raise _Refusal(503, str(exc)) from None
        try:
            hub.check_created(address_of(request), channels)
        except ProtocolError as exc:
            raise _Refusal(429, str(exc)) from None
        try:
            return hub.attach("sse", access, request), channels, since, epoch
        except AccessDenied as exc:
            raise _Refusal(_status(exc), str(exc)) from None

    async def _stream(
        self,
        client: Client,
        request: tuple[tuple[str, ...], Since, str | None],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        channels, since, epoch = request
        hub = self.hub
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        writer = asyncio.create_task(self._write(client, (channels, since, epoch), send))
        watcher = asyncio.create_task(_until_disconnect(receive))
        try:
            waiting: list[asyncio.Future[Any]] = [writer, watcher, client.closing]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            client_left = watcher.done()
            writer_ended = (writer.done() and not writer.cancelled()
                            and writer.exception() is None)
        finally:
            for task in (writer, watcher):
                task.cancel()
            for task in (writer, watcher):
                with contextlib.suppress(BaseException):
                    await task
        if client_left:
            return
        if writer_ended and not client.closing.done():
            # The writer ended the stream itself (its subscription was refused).
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if client.closing.done():
            code, reason = client.closing.result()
            event = "shutdown" if code == 1001 else "disconnected"
            last = _protocol.sse_event(_protocol.notice(event, reason, code=code).text)
            # End the response cleanly if the client still reads; else give up.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    send({"type": "http.response.body", "body": last.encode(),
                          "more_body": False}),
                    hub.settings.close_timeout,
                )

    async def _write(
        self, client: Client, request: tuple[tuple[str, ...], Since, str | None], send: Send
    ) -> None:
        channels, since, epoch = request
        hub = self.hub
        wake = client.wake

        async def write(text: str | bytes) -> None:
            body = text if isinstance(text, bytes) else text.encode()
            try:
                async with asyncio.timeout(STALL_TIMEOUT):
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            except TimeoutError:
                hub.stats.disconnects["slow_consumer"] += 1
                client.kick(CLOSE_SLOW_CONSUMER,
                            f"slow consumer: it read nothing for {STALL_TIMEOUT:g} s")
                raise

        await write(f"retry: {RETRY_MS}\n" + _protocol.sse_comment("pgcast gateway"))
        # The durable position reached on each channel, for the id: lines.
        positions: dict[str, int] = {}
        if since is not None:
            start = since if isinstance(since, dict) else dict.fromkeys(channels, since)
            positions = {c: p for c, p in start.items() if c in channels and hub.is_durable(c)}
        # Subscribing (and replaying the log from Last-Event-ID) runs beside
        # this loop, not before it: the replay waits for the queue to drain,
        # and this loop is what drains it (a resume over half the queue or
        # more never started when both were one task).
        subscribing = asyncio.create_task(
            hub.subscribe(client, channels, since=since, strict=False, epoch=epoch)
        )
        subscribing.add_done_callback(lambda _: wake.set())
        try:
            await self._drain(client, subscribing, positions, write)
        finally:
            if not subscribing.done():
                subscribing.cancel()
                with contextlib.suppress(BaseException):
                    await subscribing

    async def _drain(
        self,
        client: Client,
        subscribing: asyncio.Task[None],
        positions: dict[str, int],
        write: Callable[[str | bytes], Awaitable[None]],
    ) -> None:
        hub = self.hub
        stats = hub.stats
        outbox = client.outbox
        wake = client.wake
        sse_event = _protocol.sse_event
        heartbeat = hub.settings.heartbeat
        epoch: str | None = None  # the log's, from the subscribed reply
        while True:
            wake.clear()
            frames = outbox.take()
            if not frames:
                if subscribing.done() and not subscribing.cancelled() \
                        and (exc := subscribing.exception()) is not None:
                    if not isinstance(exc, ProtocolError):
                        raise exc
                    # Only the database being unavailable gets here (the rest
                    # was checked before the stream began): say so and end the
                    # stream; EventSource retries after RETRY_MS.
                    stats.errors += 1
                    await write(sse_event(_protocol.error(str(exc)).text))
                    return
                if client.closing.done():
                    return
                try:
                    # Not wait_for: on Python 3.11 it can swallow a cancellation
                    # that arrives as the event is set (the kick does both).
                    async with asyncio.timeout(heartbeat):
                        await wake.wait()
                except TimeoutError:
                    await write(_protocol.sse_comment("heartbeat"))
                continue
            parts = []
            dropped = outbox.take_unreported()
            if dropped:
                stats.dropped += dropped
                parts.append(sse_event(_protocol.notice(
                    "dropped",
                    f"{dropped} message(s) were dropped: this client did not keep up and "
                    f"its queue holds {outbox.maxsize} (the oldest go first)",
                    count=dropped,
                ).text))
            chunks = [part.encode() for part in parts]
            for frame in frames:
                if frame.id is not None and frame.channel is not None:
                    # The id: line is this client's (its position on each of
                    # its channels); the data: lines are shared by every client.
                    positions[frame.channel] = int(frame.id)
                    chunks.append(f"id: {_protocol.sse_position(positions, epoch)}\n".encode())
                elif epoch is None and frame.text.startswith('{"type":"subscribed"'):
                    epoch = json.loads(frame.text).get("epoch")  # for the id: lines
                chunks.append(frame.sse_data)
            await write(b"".join(chunks))
            stats.delivered(frames, time.monotonic())


def _status(exc: AccessDenied) -> int:
    return 429 if isinstance(exc, TooManyFromAddress) else 503


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
