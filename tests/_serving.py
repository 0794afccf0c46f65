"""A uvicorn server in a thread on a free loopback port, for the gateway tests.

``with serving(server_for_port) as port:`` binds 127.0.0.1:0, builds the
server for that port (``server_for_port(port)``, a :class:`uvicorn.Server`),
runs it in a daemon thread until it has started (failing loudly after
*timeout* seconds), and on the way out asks it to exit and joins the thread,
failing if it did not stop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import uvicorn

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


@contextlib.contextmanager
def serving(
    server_for_port: Callable[[int], uvicorn.Server], timeout: float = START_TIMEOUT
) -> Iterator[int]:
    """Run the server ``server_for_port(port)`` on a free loopback port; yield the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    server = server_for_port(port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start within {timeout} s")
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        sock.close()
    assert not thread.is_alive(), "the server did not shut down"
