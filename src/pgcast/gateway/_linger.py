"""Connections the gateway closed are gone within a bound, read or not.

asyncio's ``transport.close()`` sends what is buffered first, and only then
closes the socket. A client that stopped reading (the slow consumer the
gateway just closed with 4000, a stalled SSE stream) never lets that buffer
drain, so the socket, its buffers and its file descriptor stayed, for as long
as the peer kept the TCP connection open: 250 sockets held with
``--max-clients 50``, still there after 100 s. uvicorn closes with
``close()`` everywhere, so :class:`Linger` wraps each connection's transport:
a ``close()`` that leaves bytes unsent is followed, :data:`ABORT_AFTER`
seconds later, by a reset (``SO_LINGER`` 0, then ``abort()``: the socket is
freed and the peer gets RST) if bytes are still unsent.

:func:`http_protocol` is the uvicorn HTTP protocol class with the wrapper;
WebSocket connections start as HTTP, so their protocol gets the same
transport when the connection is upgraded. It also bounds the time a client
may take to send a request's headers (:data:`HEADER_TIMEOUT`), how many
connections may be doing so at once (:data:`MAX_UNFINISHED`; one more closes
the oldest), and their size
(:data:`MAX_HEADER_BYTES`): incomplete upgrade requests (slowloris) held
connections forever, outside ``max_clients``, which counts only clients past
their handshake; and httptools sets no limit on headers, so one request of
100 MB of short header lines took the process from 50 MB to 1.5 GB.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
from typing import Any

__all__ = ["ABORT_AFTER", "HEADER_TIMEOUT", "MAX_HEADER_BYTES", "MAX_UNFINISHED", "Linger",
           "http_protocol"]

logger = logging.getLogger("pgcast.gateway")

#: Seconds a closed connection may take to send what it still buffers.
ABORT_AFTER = 5.0


class Linger:
    """A transport whose ``close()`` turns into ``abort()`` after
    :data:`ABORT_AFTER` seconds if bytes are still unsent; everything else is
    the transport's own."""

    __slots__ = ("_aborted", "_timer", "transport")

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self._timer: asyncio.TimerHandle | None = None
        self._aborted = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.transport.write(data)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        transport = self.transport
        transport.close()
        if self._aborted:
            return
        if self._timer is None and transport.get_write_buffer_size() > 0:
            self._timer = asyncio.get_running_loop().call_later(ABORT_AFTER, self._abort)

    def abort(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._aborted = True
        self.transport.abort()

    def _abort(self) -> None:
        self._timer = None
        transport = self.transport
        if transport.get_write_buffer_size() == 0 and _unsent(transport) == 0:
            return  # it all went out: the close is completing by itself
        # Linger 0: the kernel resets the connection and drops what it still
        # holds, instead of keeping an orphan socket that waits on the peer.
        self._aborted = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):  # ValueError: already closed
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()  # a no-op on a transport that is already gone


def _unsent(transport: asyncio.WriteTransport) -> int:
    """Bytes the kernel still holds for the peer (Linux SIOCOUTQ), or -1."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(termios, "TIOCOUTQ"):
        return -1
    try:
        out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):  # ValueError: uvloop's socket of a closed transport
        return -1
    return int(struct.unpack("i", out)[0])


#: Seconds a client has to send a request's headers (slowloris: requests
#: whose headers never end held connections outside every limit).
HEADER_TIMEOUT = 10.0
#: Connections at once that have not finished sending their request's
#: headers; more are closed as they come.
MAX_UNFINISHED = 1000
#: The most bytes a request line and headers may take (a request over it
#: gets 431). Tokens in headers and cookies fit many times over.
MAX_HEADER_BYTES = 64 * 1024


def http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) whose
    connections close within :data:`ABORT_AFTER` seconds, and (httptools)
    whose requests must send their headers within :data:`HEADER_TIMEOUT`,
    with at most :data:`MAX_UNFINISHED` connections doing so at once (one
more closes the oldest), in at
    most :data:`MAX_HEADER_BYTES` (h11 has a limit of its own, 16 KiB)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]
        return _H11Linger
    return _httptools_linger(HttpToolsProtocol)


#: The connections still sending headers, across the process's servers,
#: oldest first (a dict as an ordered set).
_unfinished: dict[Any, None] = {}
#: When the last warning about the limit was logged (one every 10 s at most).
_warned = [-1e9]


def _httptools_linger(base: Any) -> type[asyncio.Protocol]:
    class HttpToolsLinger(base):  # type: ignore[misc]
        _header_timer: asyncio.TimerHandle | None = None
        #: Bytes received since the request began, while its headers are unfinished.
        _header_bytes = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(_wrap(transport))
            if len(_unfinished) >= MAX_UNFINISHED:
                # The oldest goes, not this one: an honest request sends its
                # headers at once, long before a flood pushes it out, where
                # closing the newest turned every honest client away.
                oldest = next(iter(_unfinished))
                oldest._headers_done()
                oldest.transport.abort()
                now = asyncio.get_running_loop().time()
                if now - _warned[0] >= 10.0:
                    _warned[0] = now
                    logger.warning("pgcast gateway: %d connections are still sending their "
                                   "headers (the limit): closing the oldest", MAX_UNFINISHED)
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is not None:  # the headers are not complete yet
                budget = MAX_HEADER_BYTES - self._header_bytes
                self._header_bytes += len(data)
                if len(data) > budget and not 0 <= data.find(b"\r\n\r\n") <= budget - 4:
                    self._too_big()
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_headers()  # the next request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._headers_done()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_done()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            if self._header_timer is None:
                _unfinished[self] = None
                self._header_timer = asyncio.get_running_loop().call_later(
                    HEADER_TIMEOUT, self._too_slow)

        def _headers_done(self) -> None:
            _unfinished.pop(self, None)
            self._header_bytes = 0
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            _unfinished.pop(self, None)
            logger.info("pgcast gateway: closing a connection that sent no complete "
                        "request headers within %g s", HEADER_TIMEOUT)
            self.transport.abort()

        def _too_big(self) -> None:
            self._headers_done()
            logger.info("pgcast gateway: refusing a request whose headers are over %d bytes",
                        MAX_HEADER_BYTES)
            body = (f"request headers over {MAX_HEADER_BYTES} bytes "
                    "(the gateway's limit)\n").encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.transport.close()

    return HttpToolsLinger


def _wrap(transport: asyncio.BaseTransport) -> Any:
    # Not isinstance(transport, asyncio.Transport): uvloop's transports are not.
    if isinstance(transport, Linger) or not hasattr(transport, "get_write_buffer_size"):
        return transport
    return Linger(transport)  # type: ignore[arg-type]


from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402


class _H11Linger(H11Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_wrap(transport))
