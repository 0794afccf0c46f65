"""Running the gateway with uvicorn, and shutting it down gracefully.

On SIGTERM or Ctrl-C uvicorn stops accepting connections and then closes the
WebSockets still open with code 1012. :class:`GatewayServer` first closes
every gateway client itself, with 1001 ("going away", the code the protocol
documents) and a ``shutdown`` notice on SSE streams, then lets uvicorn finish,
and returns from :meth:`~GatewayServer.run` rather than dying of the signal.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette

from ._linger import http_protocol
from ._logging import log_config
from ._protocol import MAX_FRAME_BYTES
from ._tls import tls_front
from ._wsdirect import DirectProtocol

__all__ = ["GatewayServer", "config", "serve"]


class GatewayServer(uvicorn.Server):
    """A uvicorn server that closes the gateway's clients first on shutdown,
    and bounds TLS handshakes (see :mod:`._tls`)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """As uvicorn's, except that with TLS the listening sockets are
        plain and each connection's handshake is the gateway's own."""
        config = self.config
        context = config.ssl
        if context is None:
            await super().startup(sockets)
            return
        config.http_protocol_class = tls_front(config.http_protocol_class, context)
        config.ssl = None
        try:
            await super().startup(sockets)
        finally:
            config.ssl = context

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Close the gateway's clients (1001), then shut down as uvicorn does."""
        app = self.config.app
        hub = getattr(getattr(app, "state", None), "pgcast_gateway", None)
        if hub is not None:
            for server in self.servers:
                server.close()  # refuse new connections while clients close
            await hub.shutdown_clients()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """As uvicorn's, except that after a graceful shutdown on SIGTERM or
        SIGINT :meth:`run` returns instead of re-raising the signal, so the
        caller cleans up (the demo stops its embedded server) and exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


#: The largest client message the server reads, as a multiple of the
#: gateway's ``max_frame_bytes`` (64 KiB with the default 16 KiB).
WS_SIZE_FACTOR = 4


def _max_frame_bytes(app: Any) -> int:
    """The ``max_frame_bytes`` of the gateway *app* is (or the default)."""
    hub = getattr(getattr(app, "state", None), "pgcast_gateway", None)
    settings = getattr(hub, "settings", None)
    value = getattr(settings, "max_frame_bytes", None)
    return value if isinstance(value, int) else MAX_FRAME_BYTES


def config(
    app: Starlette, host: str = "127.0.0.1", port: int = 8000, **options: Any
) -> uvicorn.Config:
    """The uvicorn configuration the gateway runs with.

    Protocol-level WebSocket pings every 20 s find dead clients; messages up
    to :data:`WS_SIZE_FACTOR` times the app's ``max_frame_bytes`` reach the
    app, which answers those over ``max_frame_bytes`` with an error frame
    instead of letting the server drop the connection; a bigger one closes
    the connection (1009, naming the limit) as soon as its header says so,
    before it is read. No per-message compression.
    """
    options.setdefault("ws_ping_interval", 20.0)
    options.setdefault("ws_ping_timeout", 20.0)
    # The server holds a message until it is whole: this is what one
    # connection can make it hold. It was 1 MiB whatever max_frame_bytes:
    # 100 connections each sending 1 MiB less a byte grew the process by
    # 102 MB, and max_clients_per_address (1000) let one address hold 1 GB.
    options.setdefault("ws_max_size", WS_SIZE_FACTOR * _max_frame_bytes(app))
    # Per-message deflate would compress every frame once per client, undoing
    # the encode-once fan-out; notifications are small (< 8000 bytes) anyway.
    options.setdefault("ws_per_message_deflate", False)
    # Frames go straight to each client's socket, built once (see ._wsdirect).
    options.setdefault("ws", DirectProtocol)
    options.setdefault("timeout_graceful_shutdown", 10)
    # Connections the gateway closed are aborted if their peer does not read
    # the rest within a few seconds (see ._linger).
    options.setdefault("http", http_protocol())
    options.setdefault("log_level", "info")
    # Tokens in URLs (?token= for EventSource) never reach a log line.
    options.setdefault("log_config", log_config())
    options.setdefault("lifespan", "on")
    return uvicorn.Config(app, host=host, port=port, **options)


def serve(app: Starlette, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run *app* (from :func:`create_app`) until SIGTERM or Ctrl-C.

    *options* go to :class:`uvicorn.Config` (``log_level``, ``ssl_keyfile`` ...).
    """
    GatewayServer(config(app, host, port, **options)).run()
