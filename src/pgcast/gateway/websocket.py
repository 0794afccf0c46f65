"""The WebSocket transport: ``/ws``, JSON text frames both ways.

Under ``pgcast serve`` (uvicorn with :class:`._wsdirect.DirectProtocol`) an
admitted client is handed over to its protocol: frames are written straight
to its socket, its requests are carried out one at a time by a task that
exists only while there are some (:class:`_Requests`), and a close is written
by the callback that decides it. Anywhere else (the app mounted in another
ASGI server) it takes the generic path below.

On the generic path one connection runs two tasks: the *receiver* parses each client frame
(:func:`pgcast.gateway._protocol.parse_frame`) and carries it out through the
hub, one at a time and in order; the *sender* drains the client's bounded
queue into the socket. When the gateway drops the client (a full queue under
the ``disconnect`` policy, or shutdown) the sender is cancelled wherever it
is blocked and the socket is closed with a code and a reason:

==== ===============================================================
1001 the gateway is shutting down
1008 refused before the handshake: bad origin, token, or full (HTTP 403/503
     where the server supports denial responses, as uvicorn does)
4000 slow consumer: the client's queue was full
4001 its access expired and no fresh token came in an ``auth`` frame
4029 it kept exceeding its rate limits (see :mod:`._ratelimit`)
4003 it did not authenticate: no token in the handshake and its first
     frame was not an accepted ``auth`` (or none came within ``auth_timeout``)
1011 a request failed in the gateway itself (logged with its traceback)
==== ===============================================================

A close that cannot be sent within ``close_timeout`` (the client stopped
reading, so the socket is full) is given up on; the ASGI server then drops
the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from .._errors import AccessDenied, ProtocolError
from . import _protocol
from ._client import CLOSE_NOT_AUTHENTICATED, Client, TooManyFromAddress
from ._hub import Hub
from ._protocol import Auth
from ._wsdirect import EXTENSION, DirectProtocol
from .auth import SUBPROTOCOL, TOKEN_SUBPROTOCOL, Access, client_token, origin_allowed

__all__ = ["WebSocketEndpoint"]

logger = logging.getLogger("pgcast.gateway")

#: The close code of a request that failed in the gateway itself.
CLOSE_INTERNAL_ERROR = 1011


class WebSocketEndpoint:
    """The ASGI app serving ``/ws`` for *hub* (a ``WebSocketRoute`` endpoint).

    Raw ASGI rather than a Starlette endpoint function: the handshake, the
    receiving and the closing go through Starlette's :class:`WebSocket`, but
    frames are sent with the server's ``send`` directly, which saves the
    wrapper's checks on the one path that runs once per client per message.
    """

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _session(self.hub, WebSocket(scope, receive=receive, send=send), send)


async def _deny(websocket: WebSocket, status: int, message: str) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(PlainTextResponse(message, status_code=status))
    else:
        # A close reason is at most 123 bytes of UTF-8.
        reason = message.encode()[:123].decode(errors="ignore")
        await websocket.close(code=1008, reason=reason)


async def _admit(hub: Hub, websocket: WebSocket) -> tuple[Client, bool] | None:
    """Check the handshake and register the client; None if it was refused.

    Returns the client and whether it must still authenticate with its first
    frame (no token came with the handshake and the authorizer refused it
    without one).
    """
    origin = websocket.headers.get("origin")
    if not origin_allowed(origin, websocket.headers.get("host"), hub.settings.allowed_origins):
        hub.stats.rejected["origin"] += 1
        await _deny(websocket, 403, f"origin {origin!r} is not allowed by this gateway")
        return None
    bad = _protocol.query_utf8_error(websocket.scope.get("query_string", b""))
    offered = websocket.scope.get("subprotocols") or []
    if any(p.startswith(TOKEN_SUBPROTOCOL) for p in offered) and SUBPROTOCOL not in offered:
        bad = (f"a token subprotocol must be offered beside {SUBPROTOCOL!r}, "
               "which the gateway selects")
    if bad is not None:
        await _deny(websocket, 400, bad)
        return None
    try:
        hub.check_room(websocket)
    except AccessDenied as exc:
        await _deny(websocket, _status(exc), str(exc))
        return None
    token = client_token(websocket, hub.settings.token_cookie)
    pending = False
    try:
        access = await hub.authorize(websocket, token)
    except AccessDenied as exc:
        if token is not None:
            hub.stats.rejected["auth"] += 1
            await _deny(websocket, 403, str(exc) or "access denied")
            return None
        # No token yet: it may come in the first frame (no access until then).
        access, pending = Access(), True
    try:
        client = hub.attach("websocket", access, websocket)
    except AccessDenied as exc:
        await _deny(websocket, _status(exc), str(exc))
        return None
    return client, pending


async def _session(hub: Hub, websocket: WebSocket, send: Send) -> None:
    admitted = await _admit(hub, websocket)
    if admitted is None:
        return
    client, pending = admitted
    offered = websocket.scope.get("subprotocols") or []
    try:
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        if pending and not await _authenticate_first(hub, websocket, client):
            return
    except BaseException:
        hub.detach(client)
        raise
    direct = websocket.scope.get("extensions", {}).get(EXTENSION)
    if direct is not None:
        await _direct_session(hub, websocket, client, direct["protocol"])
        return
    sender = asyncio.create_task(_send(hub, send, client))
    receiver = asyncio.create_task(_receive(hub, websocket, client))
    try:
        waiting: list[asyncio.Future[Any]] = [sender, receiver, client.closing]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        client_left = receiver.done()
        await _cancel(sender, receiver)
        if client.closing.done() and not client_left:
            code, reason = client.closing.result()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    websocket.close(code=code, reason=reason), hub.settings.close_timeout
                )
    finally:
        await _cancel(sender, receiver)
        # Detached last: shutdown waits for this, so the close frame is out first.
        hub.detach(client)


async def _direct_session(
    hub: Hub, websocket: WebSocket, client: Client, protocol: DirectProtocol
) -> None:
    """The session under ``pgcast serve`` (see :mod:`._wsdirect`): frames are
    written to the socket by whoever queues them, so no sender task; a close
    is written by the callback that decides it; and the connection is handed
    over to the protocol, so this ASGI call returns and no task waits for the
    client's messages (:class:`_Requests` starts one while a request runs)."""
    timeout = hub.settings.close_timeout

    def close(closing: asyncio.Future[tuple[int, str]]) -> None:
        code, reason = closing.result()
        protocol.close_now(code, reason, timeout)

    protocol.attach(client.outbox, hub.stats, _dropped_notice)
    client.closing.add_done_callback(close)
    requests = _Requests(hub, client, protocol)
    protocol.hand_over(requests.received, requests.lost)


class _Requests:
    """A handed-over client's requests, carried out one at a time and in
    order by a task that exists only while there are some; the socket is not
    read meanwhile, so a client cannot pile requests up in memory."""

    __slots__ = ("client", "hub", "pending", "protocol", "task")

    def __init__(self, hub: Hub, client: Client, protocol: DirectProtocol) -> None:
        self.hub = hub
        self.client = client
        self.protocol = protocol
        self.pending: deque[str | bytes] | None = None
        self.task: asyncio.Task[None] | None = None

    def received(self, data: str | bytes) -> None:
        if self.task is not None:
            if self.pending is None:
                self.pending = deque()
            self.pending.append(data)
            self.protocol.pause_reading()
            return
        self.task = asyncio.get_running_loop().create_task(self._run(data))

    async def _run(self, data: str | bytes) -> None:
        try:
            await _carry_out(self.hub, self.client, data)
            while self.pending:
                await _carry_out(self.hub, self.client, self.pending.popleft())
        except Exception:
            # As the ASGI path, where it would end the session: never silently.
            logger.exception("pgcast gateway: a client's request failed; closing it")
            self.client.kick(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self.task = None
            self.pending = None
            self.protocol.resume_reading()

    def lost(self) -> None:
        """The connection is gone: forget the client (its channels may be
        UNLISTENed) and stop what it asked for."""
        self.hub.detach(self.client)
        if self.task is not None:
            self.task.cancel()


async def _authenticate_first(hub: Hub, websocket: WebSocket, client: Client) -> bool:
    """A client that gave no token must send ``auth`` first, within
    ``auth_timeout``; anything else closes it with 4003. True if it did."""
    timeout = hub.settings.auth_timeout
    reason = f"authenticate first: send {{\"type\": \"auth\", \"token\": ...}} within {timeout:g} s"
    # Watching closing too: shutdown must not wait for the auth deadline.
    receiving = asyncio.ensure_future(websocket.receive())
    waiting: list[asyncio.Future[Any]] = [receiving, client.closing]
    try:
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not receiving.done():
            receiving.cancel()
            with contextlib.suppress(BaseException):
                await receiving
    message = None if receiving.cancelled() else receiving.result()
    code = CLOSE_NOT_AUTHENTICATED
    if message is None and client.closing.done():  # shutdown: close like every client
        code, reason = client.closing.result()
    if message is not None and message["type"] == "websocket.disconnect":
        hub.detach(client)
        return False
    command = None
    if message is not None:
        data = message.get("text")
        if data is None:
            data = message.get("bytes")
        try:
            command = _protocol.parse_frame(data, hub.settings.max_frame_bytes)
        except ProtocolError as exc:  # say why (an oversized token, say), not just "first"
            reason = f"authenticate first; that frame: {exc}"
    if isinstance(command, Auth):
        try:
            await hub.authenticate(client, command.token, command.ref)
            return True
        except ProtocolError as exc:
            reason = str(exc)
    elif code == CLOSE_NOT_AUTHENTICATED:
        hub.stats.rejected["auth"] += 1
    with contextlib.suppress(Exception):
        # A close reason is at most 123 bytes of UTF-8.
        await asyncio.wait_for(
            websocket.close(code=code,
                            reason=reason.encode()[:123].decode(errors="ignore")),
            hub.settings.close_timeout,
        )
    hub.detach(client)  # after the close frame: shutdown waits for this
    return False


async def _cancel(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


def _status(exc: AccessDenied) -> int:
    return 429 if isinstance(exc, TooManyFromAddress) else 503


async def _receive(hub: Hub, websocket: WebSocket, client: Client) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        if data is None:
            data = message.get("bytes")
        await _carry_out(hub, client, data)


async def _carry_out(hub: Hub, client: Client, data: str | bytes | None) -> None:
    """Parse one client frame and carry it out; a refusal is an error frame."""
    try:
        command = _protocol.parse_frame(data, hub.settings.max_frame_bytes)
    except ProtocolError as exc:
        refusal = str(exc)
        try:
            hub.limit(client, None)  # a flood of bad frames is a flood too
        except ProtocolError as limited:
            refusal = str(limited)
        hub.refuse(client, refusal)
        return
    try:
        await hub.handle(client, command)
    except ProtocolError as exc:
        hub.refuse(client, str(exc), command.ref)


async def _send(hub: Hub, send: Send, client: Client) -> None:
    outbox = client.outbox
    wake = client.wake
    stats = hub.stats
    limit = outbox.maxsize
    try:
        while True:
            # Clear before taking: a frame queued after take() sets it again.
            wake.clear()
            frames = outbox.take()
            if not frames:
                if client.closing.done():
                    return
                await wake.wait()
                continue
            dropped = outbox.take_unreported()
            if dropped:
                stats.dropped += dropped
                await send({"type": "websocket.send", "text": _dropped_notice(dropped, limit)})
            for frame in frames:
                await send({"type": "websocket.send", "text": frame.text})
            stats.delivered(frames, time.monotonic())
    except (WebSocketDisconnect, OSError, RuntimeError):
        return  # the client went away; the session ends


def _dropped_notice(count: int, limit: int) -> str:
    return _protocol.notice(
        "dropped",
        f"{count} message(s) were dropped: this client did not keep up and its "
        f"queue holds {limit} (the oldest go first)",
        count=count,
    ).text
