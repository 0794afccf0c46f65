"""Waiting for the socket: a PubSub's own iteration (``_fill``), and the
supervisor interface through which a NotificationManager drives it without
iterating it (:class:`AsyncSupervised`).

Written for asyncio (``_supervised_async.py``); the sync twin is generated
from it by ``tools/async_to_sync.py``.
"""

from __future__ import annotations

from collections.abc import Callable

from .._errors import ConnectionLostError
from .._event import Event
from .._flavour_async import acquire
from .._gap import Gap
from .._reconnect import Reconnected
from ..durable._core import Unfetched
from ._durable_session_async import AsyncDurableSession

__all__ = ["AsyncSupervised"]


class AsyncSupervised(AsyncDurableSession):
    """The waiting of a PubSub, and its supervisor interface: wait on
    :meth:`fileno` yourself, call :meth:`read_ready` when it is readable (or
    when :attr:`wake_callback` says something arrived another way) and hand
    out :meth:`take_pending`; run :meth:`health_tick` when
    :meth:`health_check_due` says, and :meth:`reconnect` when the connection
    is lost; :meth:`wake` ends a wait without an event."""

    # -- waiting -----------------------------------------------------------

    async def _read(self) -> None:
        """Take in what has arrived on the socket, without waiting."""
        self._check_open()
        conn = self._conn
        async with conn.lock:
            self._core.read(conn.pgconn)

    async def _fill(self, timeout: float | None) -> None:
        """Wait up to *timeout* seconds (0: not at all) for the socket, then
        read what arrived into the inbox; raises ConnectionLostError."""
        core = self._core
        if timeout != 0:
            self._check_open()
            await self._maybe_probe()
            ready = await self._waiter.wait(
                self._pgconn, core.wait_time(timeout), bool(core.inbox)
            )
            if self._closed:
                return
            if not ready:
                core.check_health()
                return
        self._check_open()
        conn = self._conn
        # A command running elsewhere holds the lock and reads the socket
        # itself (its notifications reach the inbox); wait for it no longer
        # than the health check allows, so a command stuck in a dead network
        # cannot hold the listener too.
        limit = core.wait_time(None)
        if not await acquire(conn.lock, None if limit is None else max(0.01, limit)):
            core.check_health()
            return
        try:
            core.read(conn.pgconn)
        finally:
            conn.lock.release()
        core.check_health()

    async def _maybe_probe(self) -> None:
        core = self._core
        if not core.wants_probe() or self._reconnecting is not None:
            return
        with self._state_lock:
            if self._queries:
                # A command on the wire is a round trip too: it stands in for
                # the probe, so one stuck in a dead network is noticed like an
                # unanswered probe.
                if self._in_flight:
                    core.health.probe_sent(core.clock())
                return
            conn = self._conn
            async with conn.lock:
                core.send_probe(conn.pgconn)

    def fileno(self) -> int:
        """A descriptor of the connection's socket, to wait on with
        ``select``/``selectors`` (sync) or ``loop.add_reader`` (asyncio, a
        duplicate owned by the PubSub until :meth:`close`), as a
        NotificationManager does; then :meth:`read_ready`.

        A reconnect replaces it: ask again after a :class:`Reconnected` marker
        (or when :attr:`generation` changed)."""
        self._check_open()
        return self._waiter.fileno(self._pgconn)

    @property
    def wake_callback(self) -> Callable[[], object] | None:
        """What is called when this PubSub has events for its waiter that did
        not come off the socket (a command's results, a reconnect, close)."""
        return self._wake_callback

    def set_wake_callback(self, callback: Callable[[], object] | None) -> None:
        """Set :attr:`wake_callback` (a supervisor waiting on :meth:`fileno`
        sets it; the sync one may be called from any thread)."""
        self._wake_callback = callback

    def wake(self) -> None:
        """End the current wait on this PubSub (its iteration's, or a
        supervisor's through :attr:`wake_callback`) without an event, so the
        waiter looks at its own state again: a worker asked to stop, say.
        No event is made up. Any thread (sync) or task."""
        self._wake()

    @property
    def health_check_interval(self) -> float:
        """Seconds of silence before the health check probes (0: it is off)."""
        return self._core.health.interval

    def health_check_due(self) -> float | None:
        """When (on ``time.monotonic()``) :meth:`health_tick` is next due;
        None: no health check to run."""
        return self._core.health.due()

    async def health_tick(self) -> float | None:
        """One step of the health check, for a supervisor that waits on
        :meth:`fileno` itself instead of iterating (a NotificationManager):
        sends the probe if one is due, raises
        :class:`~pgcast.ConnectionLostError` if the last one went unanswered
        (then call :meth:`reconnect`), and returns how many seconds may pass
        before the next call (``None``: no health check to run)."""
        self._check_open()
        await self._maybe_probe()
        self._core.check_health()
        return self._core.wait_time(None)

    async def reconnect(self) -> Reconnected:
        """Drop the connection and open a new one now (for example when a
        supervisor decided it is dead); returns the marker, which is also
        queued. Works with ``reconnect=False`` too.

        :raises ConnectionLostError: the backoff gave up.
        """
        self._check_open(lost_ok=True)
        for _ in range(3):  # another reconnect may end just as this one starts
            error = ConnectionLostError("reconnect() was called")
            marker = await self._recover(error, self._generation, force=True)
            if marker is not None:
                return marker
        raise ConnectionLostError("reconnect() could not restore the connection")

    async def read_ready(self) -> None:
        """Take in what has arrived, without waiting, and make the pending
        events ready to hand out: a replay batch if one is due, payloads kept
        in the log fetched. Then :meth:`take_pending`."""
        await self._read()
        core = self._core
        if await self._replay() and core.durable.pending:
            self._wake()  # more to replay: come back
        inbox = core.inbox
        i = 0
        while i < len(inbox):  # only the consumer removes, so indexes hold
            event = inbox[i]
            if type(event) is Unfetched:
                fetched = await self._fetch_payload(event)
                if fetched is None:
                    del inbox[i]
                    continue
                inbox[i] = fetched
            i += 1

    def take_pending(self) -> list[Event | Reconnected | Gap]:
        """Every event and marker received and not yet handed out, in order
        (none: an empty list); they are handed out now."""
        inbox = self._core.inbox
        # popleft, not clear(): another thread may be appending.
        return [inbox.popleft() for _ in range(len(inbox))]
