"""The NotificationManager: one loop over many PubSubs, py-postgresql's semantics.

::

    nm = pgcast.NotificationManager(ps1, ps2, timeout=2)
    for x in nm:
        if x is None:
            ...                          # idle: 2 s without events
            continue
        ps, events = x                   # one connection, every event picked up on it
        for channel, payload, pid in events:
            ...

The contract (the policy itself lives in :mod:`pgcast.manager._policy`, shared
with the asyncio twin :class:`pgcast.aio.NotificationManager`):

* The manager is an iterator (``iter(nm) is nm``). It yields
  ``(pubsub, [events...])`` with every event picked up on that connection, or
  ``None`` as an idle event: never with timeout ``None``, after each
  ``timeout`` seconds without events otherwise. With timeout ``0`` it reads
  every connection once, yields what is pending and stops; iterating again
  starts over.
* Nothing is held in the manager while the user holds a value: breaking out
  of the loop, at an idle event or while handling events, loses nothing; the
  connections not yet visited are visited by the next iteration.
* :attr:`~NotificationManager.connections` is a set; add and remove
  connections at any time, from inside the loop or (the manager is woken)
  from another thread. A connection that dies or raises moves to
  :attr:`~NotificationManager.garbage` and the others keep delivering; what
  it had received is still yielded. The iteration ends when no connection is
  left. With ``reconnect=True`` a lost connection is reconnected instead (in
  a short-lived thread of its own, so the backoff holds up no other
  connection) and its :class:`~pgcast.Reconnected` marker is yielded.
* The manager runs its connections' health checks (``health_check_interval``
  of :func:`pgcast.connect`), which a managed PubSub cannot run itself: it
  wakes when a connection's probe is due (:meth:`PubSub.health_tick`), so a
  connection the network silently dropped is found dead within about two
  intervals and goes to garbage, or is reconnected with ``reconnect=True``.
* One thread waits on every socket with one ``selectors.DefaultSelector``
  (epoll on Linux). Each socket is registered once, and the health checks'
  times are kept in a heap, so a wake-up costs the same with 1 or 500 idle
  connections.

A PubSub belongs to at most one manager at a time, and is not iterated by
other means (``events()``, ``wait()``, ``run_in_thread()``) while it is
managed; other threads may still ``notify`` through it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
import weakref
from typing import ClassVar, Self

from .._closing import Closing
from ..client import PubSub
from ._policy import Events, ManagerBase

__all__ = ["NotificationManager"]


def _release(selector: selectors.BaseSelector, rfd: int, wfd: int) -> None:
    selector.close()
    os.close(rfd)
    os.close(wfd)


class NotificationManager(ManagerBase[PubSub], Closing):
    """Wait for notifications on many :class:`~pgcast.PubSub` connections at once.

    :param connections: the PubSubs to watch; more can be added later.
    :param timeout: seconds without events before an idle event (``None``);
        ``None`` never idles, ``0`` polls once and ends the iteration.
    :param reconnect: reconnect a lost connection (with the PubSub's own
        backoff, :meth:`PubSub.reconnect`) instead of moving it to
        :attr:`garbage`; it stays in :attr:`connections` meanwhile and its
        :class:`~pgcast.Reconnected` marker comes in its events list. Only a
        reconnect that gives up, or a connection closed by its user, goes to
        garbage. A connection found dead by its health check counts as lost.

    Use it as a context manager, or call :meth:`close`, to release the
    selector; the PubSubs themselves stay open.
    """

    _NAME: ClassVar[str] = "pgcast.NotificationManager"

    def __init__(
        self, *connections: PubSub, timeout: float | None = None, reconnect: bool = False
    ) -> None:
        self._closed = False
        self._pipe_lock = threading.Lock()  # no write to the pipe once closed
        # A pipe rather than a socketpair: plain descriptors, so a manager
        # dropped without close() is cleaned up by its finalizer silently.
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self._rfd, self._wfd = rfd, wfd
        self._selector = selectors.DefaultSelector()
        self._selector.register(rfd, selectors.EVENT_READ, None)
        self._finalizer = weakref.finalize(self, _release, self._selector, rfd, wfd)
        super().__init__(connections, timeout, reconnect)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> tuple[PubSub, Events] | None:
        for step in self._pending():
            request = self._request(step)
            if request is None:
                return step  # type: ignore[return-value]
            request[0](request[1])
        self._steps = None  # the next iteration starts over
        raise StopIteration

    # -- lifetime ------------------------------------------------------------

    def close(self) -> None:
        """Stop watching every connection and release the selector.

        The PubSubs stay open and keep their unread events. Idempotent.
        """
        with self._pipe_lock:
            if self._closed:
                return
            self._closed = True
        for conn in list(self._core.fds):
            self._unregister(conn)
        self._finalizer()

    # -- the driver ----------------------------------------------------------

    def _wake(self) -> None:
        with self._pipe_lock:
            if not self._closed:
                with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                    os.write(self._wfd, b"\0")

    def _reconnect_soon(self, conn: PubSub) -> None:
        # In a thread of its own, so that the backoff between attempts does
        # not hold up the other connections; the thread ends with the reconnect.
        threading.Thread(
            target=self._reconnect, args=(conn,), name="pgcast-manager-reconnect", daemon=True
        ).start()

    def _reconnect(self, conn: PubSub) -> None:
        try:
            conn.reconnect()
        except Exception as exc:
            self._reconnect_done(conn, exc)
        else:
            self._reconnect_done(conn)

    def _read(self, conn: PubSub) -> None:
        try:
            conn.read_ready()
        except Exception as exc:
            self._lose(conn, exc)

    def _health_tick(self, conn: PubSub) -> None:
        try:
            conn.health_tick()
        except Exception as exc:
            self._lose(conn, exc)

    def _wait(self, timeout: float | None) -> None:
        core = self._core
        for key, _ in self._selector.select(timeout):
            conn = key.data
            if conn is None:
                with contextlib.suppress(OSError):
                    os.read(self._rfd, 4096)
            else:
                core.ready(conn)

    def _register(self, conn: PubSub) -> None:
        selector = self._selector
        try:
            fd = conn.fileno()
            try:
                selector.register(fd, selectors.EVENT_READ, conn)
            except KeyError:
                # The descriptor number is still registered for a connection
                # whose socket was closed, and the system reused the number.
                stale = selector.get_key(fd).data
                self._unregister(stale)
                self._lose(stale, OSError(f"its socket (fd {fd}) was closed"))
                selector.register(fd, selectors.EVENT_READ, conn)
        except Exception as exc:
            self._lose(conn, exc)
            return
        self._watch(conn, fd)

    def _unregister(self, conn: PubSub) -> None:
        fd = self._core.fds.get(conn)
        if fd is not None:
            key = self._selector.get_map().get(fd)
            if key is not None and key.data is conn:
                # EpollSelector ignores the error of a descriptor already closed.
                self._selector.unregister(fd)
        self._forget(conn)
