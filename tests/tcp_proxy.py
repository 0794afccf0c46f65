"""A loopback TCP proxy for fault-injection tests: it forwards, and on demand
drops traffic without closing (a network that silently lost the connection)
or cuts connections outright.

One thread with a selector serves every connection. Only loopback addresses
are accepted as targets. ``stop()`` closes everything and joins the thread
within a timeout, failing loudly if it does not end.

- :meth:`TcpProxy.blackhole` makes the connections open *now* swallow
  everything in both directions, forever, while staying open: neither end
  gets a FIN or RST, so only an application-level probe can notice. New
  connections are forwarded normally, so a client that reconnects gets
  through (a NAT that forgot a mapping behaves like this).
- :meth:`TcpProxy.cut` closes every open connection with an RST.
- :meth:`TcpProxy.refuse` closes the listening socket: every new connection
  is refused at once (a server that is down), until :meth:`stop`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["TcpProxy"]

_CHUNK = 65536
_JOIN_TIMEOUT = 10.0


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    server: socket.socket
    dropped: bool = False
    sockets: tuple[socket.socket, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.sockets = (self.client, self.server)

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.server if sock is self.client else self.client


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to *target_host*:*target_port* (loopback only)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        if not ipaddress.ip_address(socket.gethostbyname(target_host)).is_loopback:
            raise ValueError(f"the test proxy only forwards to loopback, not {target_host}")
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._pairs: dict[socket.socket, _Pair] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        #: How many connections were accepted so far.
        self.accepted = 0
        #: How many bytes blackholed connections swallowed so far.
        self.swallowed = 0

    @classmethod
    def for_dsn(cls, dsn: str) -> TcpProxy:
        """A proxy to the host and port of *dsn* (a URL or ``key=value``)."""
        params = conninfo_to_dict(dsn)
        host = str(params.get("host") or "127.0.0.1")
        if host.startswith("/"):
            raise ValueError(f"a TCP proxy needs a TCP server, not the socket in {host}")
        return cls(host, int(params.get("port") or 5432))

    def dsn(self, dsn: str) -> str:
        """*dsn* rewritten to go through this proxy."""
        return make_conninfo(dsn, host="127.0.0.1", hostaddr="127.0.0.1", port=self.port)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(_JOIN_TIMEOUT)
        if self._thread.is_alive():
            raise AssertionError(f"the TCP proxy thread did not stop within {_JOIN_TIMEOUT} s")
        for pair in list(self._pairs.values()):
            self._close_pair(pair, reset=False)
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------

    def blackhole(self) -> int:
        """Swallow all traffic of the connections open now, keeping them open.
        Returns how many connections were affected."""
        with self._lock:
            pairs = set(self._pairs.values())
            for pair in pairs:
                pair.dropped = True
        return len(pairs)

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut."""
        with self._lock:
            pairs = set(self._pairs.values())
            for pair in pairs:
                pair.dropped = True  # the loop closes them
            self._cut_pending = pairs
        self._wake()
        return len(pairs)

    def refuse(self) -> None:
        """Refuse every new connection from now on (the listening socket is
        closed by the loop thread); open ones are left as they are."""
        with self._lock:
            self._refuse_pending = True
        self._wake()
        deadline = time.monotonic() + _JOIN_TIMEOUT
        while self._listener.fileno() != -1 and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._listener.fileno() != -1:
            raise AssertionError(f"the TCP proxy did not stop listening within {_JOIN_TIMEOUT} s")

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(set(self._pairs.values()))

    # -- the loop --------------------------------------------------------------

    _cut_pending: set[_Pair] | None = None
    _refuse_pending = False

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                cut, self._cut_pending = self._cut_pending, None
                refuse, self._refuse_pending = self._refuse_pending, False
            if refuse:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(self._listener)
                self._listener.close()
            for pair in cut or ():
                self._close_pair(pair, reset=True)
            for key, _ in self._selector.select(1.0):
                sock = key.fileobj
                if sock is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                elif sock is self._listener:
                    self._accept()
                else:
                    assert isinstance(sock, socket.socket)
                    self._forward(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.target, timeout=5.0)
        except OSError:
            client.close()
            return
        client.setblocking(False)
        server.setblocking(False)
        pair = _Pair(client, server)
        with self._lock:
            self._pairs[client] = pair
            self._pairs[server] = pair
            self.accepted += 1
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(server, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        pair = self._pairs.get(sock)
        if pair is None:
            return
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_pair(pair, reset=False)
            return
        if pair.dropped:
            with self._lock:
                self.swallowed += len(data)
            return  # swallowed: the other end never hears of it
        try:
            # Loopback, small messages: a short blocking send is fine here.
            peer = pair.peer(sock)
            peer.setblocking(True)
            peer.settimeout(5.0)
            peer.sendall(data)
            peer.setblocking(False)
        except OSError:
            self._close_pair(pair, reset=False)

    def _close_pair(self, pair: _Pair, *, reset: bool) -> None:
        with self._lock:
            for sock in pair.sockets:
                self._pairs.pop(sock, None)
        for sock in pair.sockets:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(sock)
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()
