"""Dropping a lost connection, for both drivers.

A command stuck on a dead connection (a network that drops packets) holds the
connection's lock until the kernel gives up, which can take many minutes.
:func:`shutdown` shuts the socket down both ways, so that such a command fails
at once and releases the lock; the driver then waits at most
:data:`DISCARD_TIMEOUT` seconds for the lock before it closes the connection,
and leaves the connection alone (with a warning) if the lock is not released.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import psycopg

__all__ = ["DISCARD_TIMEOUT", "shutdown"]

#: How long a driver waits for a lost connection's lock before leaving it.
DISCARD_TIMEOUT = 5.0


def shutdown(pgconn: Any) -> None:
    """Shut the connection's socket down (both ways) without closing it."""
    try:
        fd = os.dup(pgconn.socket)
    except (psycopg.Error, OSError):
        return
    sock = socket.socket(fileno=fd)
    try:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()
