"""TLS handshakes within a bound of time and of number.

uvicorn hands its SSL context to ``loop.create_server``, whose handshake
timeout is 60 s and which counts nothing: a connection that opens TCP to the
TLS port and never finishes the handshake is held a minute, before any of
the gateway's limits sees it (request headers, ``max_clients``, the
per-address cap all start after it). 3,000 of them took the process from
49 MB to 201 MB and 3,000 descriptors for 58 s; at a few thousand a second
they would exhaust the descriptors and honest clients would be refused.

:func:`tls_front` wraps the HTTP protocol class so that TLS is started by the
gateway itself on the accepted connection (asyncio's TLS protocol, put in
between at once): the handshake
must end within :data:`~._linger.HEADER_TIMEOUT` seconds, and at most
:data:`~._linger.MAX_UNFINISHED` connections may be in a handshake at once:
one more closes the oldest (an honest handshake takes a round trip or two,
so it is done long before the attacker's connections behind it push it
out; closing the newest instead would turn the flood away honest clients
for as long as it lasts). The HTTP protocol then gets the TLS transport as if uvicorn had made
it (its scheme is ``https``), and its own header timeout starts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from asyncio import sslproto
from typing import Any

from . import _linger

__all__ = ["tls_front"]

logger = logging.getLogger("pgcast.gateway")

#: The connections in a TLS handshake now, across the process's servers,
#: oldest first, with their raw transports.
_handshaking: dict[Any, Any] = {}
#: When the last warning about the limit was logged (one every 10 s at most).
_warned = [-1e9]


def tls_front(protocol_class: type[asyncio.Protocol], context: ssl.SSLContext) -> type[Any]:
    """A protocol class that does the TLS handshake on the raw connection,
    bounded, then hands the TLS transport to *protocol_class*."""

    class TLSFront(asyncio.Protocol):
        # The TLS layer is put in place in connection_made itself, without
        # a turn of the loop (loop.start_tls takes one, and uvloop may hand
        # the ClientHello to the raw connection's protocol meanwhile). It
        # calls connection_made again, with the TLS transport, once the
        # handshake is done: the inner protocol then takes over.

        __slots__ = ("_kwargs", "_raw")

        def __init__(self, **kwargs: Any) -> None:
            self._kwargs = kwargs
            self._raw: Any = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if self._raw is not None:
                self._handed_over(transport)
                return
            self._raw = transport
            if len(_handshaking) >= _linger.MAX_UNFINISHED:
                oldest = next(iter(_handshaking))
                _handshaking.pop(oldest).abort()
                now = time.monotonic()
                if now - _warned[0] >= 10.0:
                    _warned[0] = now
                    logger.warning("pgcast gateway: %d connections in a TLS handshake (the "
                                   "limit): closing the oldest", _linger.MAX_UNFINISHED)
            _handshaking[self] = transport
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            done.add_done_callback(self._handshake_over)
            tls = _ssl_protocol(loop)(loop, self, context, done, server_side=True,
                                      ssl_handshake_timeout=_linger.HEADER_TIMEOUT)
            transport.set_protocol(tls)
            tls.connection_made(transport)

        def _handshake_over(self, done: asyncio.Future[None]) -> None:
            _handshaking.pop(self, None)
            if not done.cancelled() and done.exception() is not None:
                logger.debug("pgcast gateway: TLS handshake failed: %s", done.exception())
                if self._raw is not None:
                    self._raw.abort()

        def _handed_over(self, tls: asyncio.BaseTransport) -> None:
            _handshaking.pop(self, None)
            inner = protocol_class(**self._kwargs)
            tls.set_protocol(inner)
            inner.connection_made(tls)

        def connection_lost(self, exc: Exception | None) -> None:
            _handshaking.pop(self, None)

    return TLSFront


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol class of *loop*'s own (uvloop's, in C, with its
    buffer allocated and not touched until used, when the loop is uvloop's;
    else asyncio's): the one ``create_server(ssl=...)`` would have used."""
    try:
        import uvloop
        from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - uvloop is part of uvicorn[standard]
        return sslproto.SSLProtocol
    return SSLProtocol if isinstance(loop, uvloop.Loop) else sslproto.SSLProtocol
