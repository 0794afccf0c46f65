"""The WebSocket protocol of ``pgcast serve``: frames written straight to the socket.

Through ASGI, every frame for every client is a ``send`` awaited in a task
of that client, and the server builds the frame again each time. One
notification for 5,000 clients was 5,000 task switches and 5,000 frame
encodings; the tail of the fan-out was 5.6 times the floor of a plain
asyncio server that writes the same bytes to every socket.

:class:`DirectProtocol` is uvicorn's WebSocket protocol (``websockets``'
sans-I/O layer does the handshake, the parsing of client frames, pings and
the closing handshake) with one addition: the ASGI scope of each connection
carries the extension ``"pgcast.direct"``, through which the gateway's
WebSocket endpoint (:mod:`.websocket`) attaches the client's queue
(:class:`~pgcast.gateway._router.Outbox`) to the socket. From then on:

* a frame for the client is written to the socket at once, as the bytes
  built once for every recipient (:attr:`Frame.ws <._frame.Frame.ws>`),
  whenever nothing is queued before it and the socket's buffer is under its
  high-water mark (asyncio's: 64 KiB);
* when the buffer is over it (the client reads slower than it is sent to),
  frames wait in the client's queue, bounded by ``queue_size`` and its
  policy as before; when the buffer drains below the low-water mark, the
  queue is written out in order. So what one client holds is bounded by the
  high-water mark plus ``queue_size`` frames, and it never delays another;
* a close (slow consumer, expiry, shutdown) is written at once, from the
  callback that decides it, and the connection is reset after
  ``close_timeout`` seconds if the peer does not answer (see also
  :mod:`._linger`);
* the pong a client's ping asks for is written at once, as in uvicorn; but
  a ping that finds the socket over its high-water mark pauses reading until
  the buffer drains: a client sending pings without reading the pongs grew
  the process by 250 MB in 10 s (2 million pings), now by at most what one
  read holds;
* the fragments of a client message are gathered in one buffer, not kept
  as one object each: a message of a million 1-byte fragments (7 MB sent,
  1 MB in all) held 50 MB until it ended;
* once the client is admitted, the endpoint *hands the connection over*
  (:meth:`DirectProtocol.hand_over`) and its ASGI call returns: the
  connection lives on in this protocol, without a task. Each client message
  goes to a callback (which starts a task only while a request is being
  carried out), the end of the connection to another; the ASGI receive queue
  and the objects of the handshake are let go. An idle client is then its
  socket, this protocol, ``websockets``' parser and pgcast's few slotted
  objects: about a third of what a task per client held.

It subclasses uvicorn's ``websockets_sansio_impl`` and relies on some of its
attributes (``queue``, ``writable``, ``frames``, ``close_sent``,
``read_paused``, ``close_timer``): the ``gateway`` extra asks for the uvicorn
it was written and tested against (0.55 or later), and the gateway tests run
every WebSocket path through it.

Every other ASGI app (a route of an application that mounts the gateway, any
other WebSocket endpoint) sees plain ASGI and works as with uvicorn's own
protocol; so does :func:`pgcast.gateway.create_app` mounted in another ASGI
server, where the endpoint falls back to a sender task per client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ._frame import Frame
from ._linger import Linger
from ._metrics import Stats
from ._router import Outbox

__all__ = ["EXTENSION", "DirectProtocol"]

#: The ASGI scope extension that carries the protocol (``{"protocol": ...}``).
EXTENSION = "pgcast.direct"


class _NoQueue:
    """Stands for the ASGI receive queue once the connection is handed over:
    what uvicorn's code puts there (a disconnect) has no reader any more."""

    def put_nowait(self, message: object) -> None:
        pass

    def empty(self) -> bool:
        return True


_NO_QUEUE = _NoQueue()


class _Flag:
    """Stands for uvicorn's ``writable`` event once the connection is handed
    over: only ``set``/``clear``/``is_set`` are used then (nothing awaits
    it), and an :class:`asyncio.Event` costs a queue of waiters per client."""

    __slots__ = ("_set",)

    def __init__(self, value: bool) -> None:
        self._set = value

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set


class DirectProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, plus :data:`EXTENSION`."""

    _outbox: Outbox | None = None
    #: The Wire's flag: the socket takes more (under its high-water mark, no
    #: close sent, not lost); kept up to date by every method that changes it.
    open = False
    #: Set by hand_over(): each client message, and the end of the connection.
    _on_message: Callable[[str | bytes], None] | None = None
    _on_lost: Callable[[], None] | None = None
    _stats: Stats = Stats()  # replaced by attach(); counts nothing that matters before
    _notice: Any = None
    #: The socket's transport itself (uvicorn's may be wrapped, see ._linger).
    _raw: Any = None
    #: Reading is paused until the socket drains: a ping came while it was full.
    _pongs_unread = False

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the handshake was valid: the app runs next
            scope["extensions"][EXTENSION] = {"protocol": self}

    # -- the Wire the client's Outbox writes to ----------------------------

    def attach(self, outbox: Outbox, stats: Stats, dropped_notice: Any) -> None:
        """Write *outbox*'s frames to this socket from now on, counting
        messages in *stats*; *dropped_notice(count, limit)* makes the text of
        a ``dropped`` notice."""
        self._outbox = outbox
        self._stats = stats
        self._notice = dropped_notice
        transport = self.transport
        # Past pgcast's own wrapper only (never into a TLS transport's inner one).
        self._raw = transport.transport if isinstance(transport, Linger) else transport
        self.write_bytes = self._raw.write  # type: ignore[method-assign]  # one call less
        self.open = self.ready()
        outbox.attach(self)

    def hand_over(
        self, on_message: Callable[[str | bytes], None], on_lost: Callable[[], None]
    ) -> None:
        """From now on call *on_message* with each client message (text as
        ``str``) and *on_lost* once the connection is gone; the app's ASGI
        call may then return without the connection being closed."""
        self._on_message = on_message
        self._on_lost = on_lost
        # Messages that came while the app was still reading through ASGI
        # (a subscribe sent right behind an auth frame) go to on_message first.
        waiting = []
        while not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        self.queue = _NO_QUEUE  # type: ignore[assignment]
        self.writable = _Flag(self.writable.is_set())  # type: ignore[assignment]
        # The handshake's request stays referenced by websockets' parser for
        # the life of the connection; its headers (a copy is in the scope)
        # are not needed any more.
        request = getattr(self, "request", None)
        if request is not None:
            request.headers.clear()
        self.request = self.response = None  # type: ignore[assignment]
        for message in waiting:
            if message["type"] == "websocket.receive":
                text = message.get("text")
                on_message(text if text is not None else message.get("bytes") or b"")
        if self.disconnected:  # it went while the app was admitting it
            self._on_lost = None
            on_lost()
            return
        if not self.close_sent:
            self.resume_reading()  # uvicorn pauses reading while its queue holds a message

    async def run_asgi(self) -> None:
        """As uvicorn's, except that a connection the app handed over stays open."""
        try:
            await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
        if self._on_message is None and self.close_timer is None:
            self.transport.close()

    def send_receive_event_to_app(self) -> None:
        on_message = self._on_message
        if on_message is None:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # closing: the peer's close reply is what is read now
        if self.curr_msg_data_type == "bytes":
            on_message(data)
            return
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self.close_now(1007, "a text frame that is not UTF-8", self.close_timeout)
            return
        on_message(text)

    def handle_cont(self, event: Any) -> None:
        frames: list[Any] = self.frames  # its first item becomes a bytearray
        if not frames:  # no message begun (websockets refuses that anyway)
            return
        if type(frames[0]) is not bytearray:
            frames[0] = bytearray(frames[0])
        frames[0] += event.data  # one growing buffer, whatever the fragments
        if event.fin:
            self.frames = [bytes(frames[0])]
            self.send_receive_event_to_app()

    def handle_ping(self) -> None:
        super().handle_ping()  # writes the pong
        if not self.writable.is_set() and not self.disconnected:
            # The peer sends pings and does not read the pongs: read nothing
            # more from it until it reads (resume_writing), or the keepalive
            # ping it cannot answer meanwhile times the connection out.
            self._pongs_unread = True
            self.transport.pause_reading()

    def handle_close(self, event: Any) -> None:
        self.open = False  # the peer closes: what follows is the close reply
        super().handle_close(event)

    def keepalive_timeout(self) -> None:
        self.open = False
        super().keepalive_timeout()

    def handle_parser_exception(self) -> None:
        self.open = False
        super().handle_parser_exception()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        super().connection_lost(exc)
        on_lost = self._on_lost
        if on_lost is not None:
            self._on_lost = None
            on_lost()

    def pause_reading(self) -> None:
        """Read no more client messages until :meth:`resume_reading`."""
        if not self.read_paused and not self.close_sent:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read client messages again (once the socket drained, if a ping
        found it full)."""
        if self.read_paused:
            self.read_paused = False
            if not self._pongs_unread:
                self.transport.resume_reading()

    def ready(self) -> bool:
        """Whether the socket takes more: under its high-water mark and open."""
        return self.writable.is_set() and not self.close_sent and not self.disconnected

    def write_bytes(self, data: bytes) -> None:
        """Write *data* to the socket (replaced by the transport's own
        ``write`` in :meth:`attach`)."""
        self._raw.write(data)

    def write(self, frame: Frame) -> None:
        """Write *frame*'s shared bytes (nothing once the close is sent)."""
        if self.close_sent or self.disconnected:
            return
        self._raw.write(frame.ws)
        self._stats.written(frame)

    def dropped(self, count: int) -> None:
        """Write a ``dropped`` notice for *count* frames."""
        self._stats.dropped += count
        outbox = self._outbox
        if self._notice is not None and outbox is not None:
            self.write(Frame(self._notice(count, outbox.maxsize)))

    def pause_writing(self) -> None:
        super().pause_writing()
        self.open = False

    def resume_writing(self) -> None:
        super().resume_writing()
        self.open = self.ready()
        if self._pongs_unread:
            self._pongs_unread = False
            if not self.read_paused and not self.disconnected:
                self.transport.resume_reading()
        outbox = self._outbox
        if outbox is not None and len(outbox):
            outbox.drain()

    def close_now(self, code: int, reason: str, timeout: float) -> None:
        """Send a close frame now; reset the connection if the peer has not
        answered within *timeout* seconds (or closed with what it still buffers,
        which :mod:`._linger` turns into a reset if the peer does not read). The app's
        ``receive()`` then returns ``websocket.disconnect``."""
        if self.close_sent or self.disconnected or self.transport.is_closing():
            return
        self.open = False
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        # A close reason is at most 123 bytes of UTF-8.
        reason = reason.encode()[:123].decode(errors="ignore")
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        # uvicorn's transport resets a close that cannot send (see ._linger).
        self.close_timer = self.loop.call_later(timeout, self.transport.close)

