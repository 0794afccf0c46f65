"""The gateway's driver: one LISTEN connection, fanned out to every client.

A :class:`Hub` owns one :class:`pgcast.AsyncPubSub` and a :class:`Router`. One
task (the *pump*) iterates the connection's events and queues each one, JSON
encoded once, for the subscribers of its channel; the transports
(:mod:`.websocket`, :mod:`.sse`) drain each client's queue in a task of their
own, so a slow client only fills its own bounded queue.

Subscription changes are serialised by one lock, and made in this order, so
the ``subscribed`` reply goes out only once LISTEN is in effect and no message
of a channel precedes it: LISTEN the channels nobody listened to yet, then, in
one step without awaiting, add the client to the router and queue the reply.
UNLISTEN follows a channel's last subscriber (the *reaper* task, batched: :data:`UNLISTEN_DELAY`).

Statements on the shared connection run in tasks of the hub, never in a
client's task, so a client that disconnects mid-request cannot cancel a query
half-way and break the connection for everyone.

When the connection is lost, the AsyncPubSub reconnects by itself, LISTENs
again (durable channels replay what they missed) and yields a
:class:`pgcast.Reconnected` marker, which the pump turns into a
``reconnected`` notice for every client. If it gives up (or was opened with
``reconnect=False``), the pump opens a new connection itself, with backoff,
LISTENs every channel some client wants and sends the same notice. Requests
made meanwhile wait for the connection, up to ``database_timeout`` seconds.

Durable channels (``durable`` globs) are LISTENed durably; a client resuming
from a position is served by :mod:`._resume`, whose replay queries run on a
second connection (the *query* connection), opened when first needed, never on the
LISTEN one. How each connection is opened (and the NOTIFY queue usage read
for ``/metrics``) is in :mod:`._database`; admitting, authorizing and
rate-limiting clients in :mod:`._client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import psycopg

from .. import aio
from .._errors import ConnectError, ConnectionLostError, PgcastError, ProtocolError
from .._event import Event
from .._gap import Gap
from .._reconnect import Reconnected, RetryLog, describe_attempts
from . import _client, _metrics, _protocol, _resume
from ._client import CLOSE_GOING_AWAY, CLOSE_SLOW_CONSUMER, Client, Clients, Settings
from ._database import QueryConnection, QueueUsage, connect_listener, listen_all
from ._protocol import Auth, Command, Frame, Ping, Publish, Ref, Since, Subscribe, Unsubscribe
from ._resume import Resume
from ._router import Router, Subscriber
from .auth import Authorizer, globs_matcher

__all__ = ["Hub"]

logger = logging.getLogger("pgcast.gateway")

T = TypeVar("T")

_RETRY_DELAY = 0.1

#: Seconds a channel nobody wants stays LISTENed, UNLISTENed with the others.
UNLISTEN_DELAY = 1.0

class Hub(Clients):
    """One LISTEN connection and the clients it serves; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = _metrics.Stats()
        self.router = Router(settings.max_subscriptions, self.stats.written, settings.max_channels)
        self._aps: aio.AsyncPubSub | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._clients: dict[Subscriber, Client] = {}
        self._per_address: Counter[str] = Counter()
        self._created: dict[str, set[str]] = {}
        self._closing = False
        self._pump_task: asyncio.Task[None] | None = None
        self._reap_task: asyncio.Task[None] | None = None
        self._reap_wanted = asyncio.Event()
        self._jobs: set[asyncio.Task[Any]] = set()
        self._queue_usage = QueueUsage(settings)
        self._authorize: Authorizer = settings.authorizer or _client.deny_all
        self.is_durable = globs_matcher(settings.durable)
        self._query = QueryConnection(settings, self.stats)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the LISTEN connection and start the pump.

        :raises pgcast.ConnectError: PostgreSQL cannot be reached; the
            gateway does not start without its database.
        """
        self._aps = await connect_listener(self.settings)
        self._ready.set()
        self._pump_task = asyncio.create_task(self._pump(), name="pgcast-gateway-pump")
        self._reap_task = asyncio.create_task(self._reaper(), name="pgcast-gateway-reaper")

    async def shutdown_clients(self, timeout: float | None = None) -> None:
        """Refuse new clients and close every connected one (WebSocket close
        1001, SSE streams end after a ``shutdown`` notice); wait up to
        *timeout* seconds (default ``close_timeout``) for them to go."""
        self._closing = True
        clients = list(self._clients.values())
        for client in clients:
            client.kick(CLOSE_GOING_AWAY, "server shutting down")
        if clients:
            self.stats.disconnects["shutdown"] += len(clients)
        wait = self.settings.close_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while self._clients and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        """Close every client, stop the tasks and close the connection."""
        await self.shutdown_clients()
        for task in (self._pump_task, self._reap_task, *self._jobs):
            if task is not None:
                task.cancel()
        for task in (self._pump_task, self._reap_task, *self._jobs):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        if self._aps is not None:
            await self._aps.close()
        await self._query.close()

    @property
    def closing(self) -> bool:
        """Whether the gateway is shutting down (new clients are refused)."""
        return self._closing

    @property
    def database_up(self) -> bool:
        """Whether the LISTEN connection is open and in use."""
        aps = self._aps
        return (
            self._ready.is_set() and aps is not None and not aps.closed
            and not aps.connection.closed  # lost, while it reconnects by itself
        )

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection, while it is up."""
        aps = self._aps
        if aps is None or aps.closed:
            return None
        return aps.backend_pid

    def listening(self) -> frozenset[str]:
        """The channels the database connection LISTENs to now."""
        aps = self._aps
        return aps.listening_channels() if aps is not None else frozenset()

    # -- admission ---------------------------------------------------------

    async def handle(self, client: Client, command: Command) -> None:
        """Carry out one client request; the reply goes to its queue.

        :raises ProtocolError: the request is refused (not allowed, over a
            limit, database unavailable); nothing changed.
        """
        if client.gone:
            return  # being closed (over its limits, say): nothing more is done for it
        self.limit(client, command)
        if isinstance(command, Subscribe):
            await self.subscribe(client, command.channels, command.ref, command.since,
                                 epoch=command.epoch)
        elif isinstance(command, Unsubscribe):
            await self.unsubscribe(client, command.channels, command.ref)
        elif isinstance(command, Publish):
            await self.publish(client, command)
        elif isinstance(command, Ping):
            self.reply(client, _protocol.pong(command.ref))
        elif isinstance(command, Auth):
            await self.authenticate(client, command.token, command.ref)

    def reply(self, client: Client, frame: Frame) -> None:
        """Queue a reply or notice; a client that floods requests without
        reading the replies is disconnected."""
        if not client.outbox.put_control(frame):
            self._slow(client)

    def refuse(self, client: Client, message: str, ref: Ref = None) -> None:
        """Queue an ``error`` frame."""
        self.stats.errors += 1
        self.reply(client, _protocol.error(message, ref))

    async def subscribe(
        self,
        client: Client,
        channels: tuple[str, ...],
        ref: Ref = None,
        since: Since = None,
        strict: bool = True,
        *,
        epoch: str | None = None,
    ) -> None:
        """Subscribe *client* to *channels*; ``subscribed`` is queued once
        LISTEN is in effect for all of them. All or nothing.

        With *since*, durable channels first replay the log after that
        position (see :mod:`._resume`). *strict*: a *since* for a channel that
        is not durable here is an error (else it is ignored, as for an SSE
        ``Last-Event-ID`` naming a channel that is no longer durable).
        *epoch*: the log epoch the client's positions came from. The reply
        says whether each resume is complete (:func:`._resume.check`).
        """
        refused = [c for c in channels if not client.access.can_read(c)]
        if refused:
            raise ProtocolError(_client.not_allowed("subscribe to", refused))
        self.router.check_subscribe(client.sub, channels)
        resume_from = _resume.positions(client, channels, since, strict, self.is_durable)
        durable = any(map(self.is_durable, channels))
        checked = await self._shielded(_resume.check(
            self._query.fetch_for(client), resume_from, epoch, durable)) if durable else None

        def commit() -> None:
            if client.detached:
                return
            self.router.subscribe(client.sub, channels)
            if resume_from:
                resume = client.resume
                if resume is None:
                    resume = client.resume = Resume(
                        client.outbox, lambda: self._slow(client), self.stats)
                for channel, position in resume_from.items():
                    resume.start(channel, position, checked, epoch)
                    client.sub.diverted[channel] = resume.divert
            for frame in _resume.replies(channels, ref, checked, bool(resume_from),
                                         sse=client.sub.transport == "sse"):
                self.reply(client, frame)

        await self._shielded(self._listen_then(channels, commit, client.address))
        if resume_from and client.resume is not None and not client.gone:
            resume = client.resume
            try:
                await self._shielded(
                    resume.replay(resume_from, self._query.fetch_for(client), lambda: client.gone)
                )
            except (PgcastError, psycopg.Error) as exc:
                # An error frame means nothing changed: undo the whole
                # subscription (all or nothing, as its checks), so the client
                # can subscribe again (the query connection is reopened).
                gone = self.router.unsubscribe(client.sub, channels)
                resume.forget(gone)
                if gone:
                    self._reap_wanted.set()
                raise ProtocolError(
                    f"replaying the log failed: {exc}; the subscription to "
                    f"{', '.join(map(repr, channels))} was undone: subscribe again"
                ) from None

    async def unsubscribe(
        self, client: Client, channels: tuple[str, ...], ref: Ref = None
    ) -> None:
        """Unsubscribe at once (no message on *channels* follows the reply);
        the UNLISTEN of channels left without subscribers follows."""
        gone = self.router.unsubscribe(client.sub, channels)
        if client.resume is not None:
            client.resume.forget(gone)
        self.reply(client, _protocol.unsubscribed(channels, ref))
        if gone:
            self._reap_wanted.set()

    async def publish(self, client: Client, command: Publish) -> None:
        """NOTIFY on behalf of *client*, if it may write to the channel."""
        if not client.access.can_write(command.channel):
            raise ProtocolError(_client.not_allowed("publish on", [command.channel]))
        await self._shielded(self._notify(command.channel, command.payload))
        self.stats.published += 1
        self.reply(client, _protocol.published(command.channel, command.ref))

    # -- the database side -------------------------------------------------

    async def _shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        # The statement finishes even if the client's task is cancelled.
        task = asyncio.ensure_future(coro)
        self._jobs.add(task)
        task.add_done_callback(self._job_done)
        return await asyncio.shield(task)

    def _job_done(self, task: asyncio.Task[Any]) -> None:
        # Its error is its caller's, who may have left (a client gone): taken
        # here, or asyncio logs "never retrieved" for every one, a flood.
        self._jobs.discard(task)
        if not task.cancelled():
            task.exception()

    async def _wait_ready(self, deadline: float) -> None:
        if self._ready.is_set():
            return
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._ready.wait()
        except TimeoutError:
            raise ProtocolError(
                "the gateway's database connection is down and did not come back within "
                f"{self.settings.database_timeout:g} s; try again later"
            ) from None

    async def _listen_then(self, channels: tuple[str, ...], commit: Callable[[], None],
                           address: str | None = None) -> None:
        deadline = time.monotonic() + self.settings.database_timeout
        while True:
            await self._wait_ready(deadline)
            lost = False
            async with self._lock:
                aps = self._aps
                if not self._ready.is_set() or aps is None:
                    continue
                missing = self.router.missing(aps.listening_channels(), channels)
                self.claim_created(address, channels)  # max_channels_per_address
                try:
                    await listen_all(aps, missing, self.is_durable)
                except ConnectionLostError:
                    lost = True
                except PgcastError as exc:
                    raise ProtocolError(f"PostgreSQL refused to LISTEN: {exc}") from None
                else:
                    commit()
                    return
            # The pump (or the connection itself) is reconnecting: retry soon.
            if lost and time.monotonic() + _RETRY_DELAY < deadline:
                await asyncio.sleep(_RETRY_DELAY)
                continue
            raise ProtocolError(
                "the gateway's database connection is down and did not come back within "
                f"{self.settings.database_timeout:g} s; try again later"
            )

    async def _notify(self, channel: str, payload: str) -> None:
        deadline = time.monotonic() + self.settings.database_timeout
        await self._wait_ready(deadline)
        aps = self._aps
        assert aps is not None
        try:
            await aps.notify(channel, payload)
        except ConnectionLostError:
            raise ProtocolError(
                "the gateway's database connection was lost while publishing; "
                "the message may not have been sent"
            ) from None
        except PgcastError as exc:
            raise ProtocolError(f"PostgreSQL refused the NOTIFY: {exc}") from None

    async def _reaper(self) -> None:
        while True:
            await self._reap_wanted.wait()
            # Churn (subscribe, unsubscribe, again) costs no statement; past
            # max_channels LISTENed, no waiting.
            limit = self.settings.max_channels
            if limit is None or len(self.listening()) <= limit:
                await asyncio.sleep(UNLISTEN_DELAY)
            self._reap_wanted.clear()
            await self._ready.wait()
            async with self._lock:
                aps = self._aps
                if aps is None or not self._ready.is_set():
                    continue
                orphans = self.router.orphans(aps.listening_channels())
                if not orphans:
                    continue
                try:
                    await aps.unlisten(*orphans)
                except ConnectionLostError:
                    # Whoever reconnects LISTENs to the wanted channels only.
                    self._reap_wanted.set()
                    await asyncio.sleep(_RETRY_DELAY)
                except PgcastError:
                    logger.exception("pgcast gateway: UNLISTEN %s failed", orphans,
                                     extra={"pid": aps.backend_pid, "channels": orphans})

    async def _pump(self) -> None:
        router = self.router
        stats = self.stats
        event_message = _protocol.event_message
        while not self._closing:
            aps = self._aps
            assert aps is not None
            try:
                async for event in aps.events(select_timeout=5.0):
                    if not isinstance(event, Event):
                        if isinstance(event, Gap):
                            # Its own durable channel resumed across the
                            # reconnect, and the log no longer held everything.
                            frame = _resume.gap_frame(event)
                            for sub in router.publish(event.channel, frame, event)[1]:
                                self._slow(self._clients.get(sub))
                        elif isinstance(event, Reconnected):
                            # The connection reconnected by itself (and
                            # re-LISTENed): clients may have missed messages.
                            self._reap_wanted.set()
                            self._announce_reconnect()
                        continue
                    stats.messages_in += 1
                    frame = event_message(event, time.monotonic())
                    _, overflowed = router.publish(event.channel, frame, event)
                    for sub in overflowed:
                        self._slow(self._clients.get(sub))
                    # Let the clients' senders run between events, so a burst
                    # is streamed out rather than piled up in every queue.
                    await asyncio.sleep(0)
            except (ConnectionLostError, psycopg.Error) as exc:
                logger.warning("pgcast gateway: LISTEN connection lost: %s", exc,
                               extra={"pid": aps.backend_pid})
            except Exception:
                # Never die silently: log, then start over on a new connection.
                logger.exception("pgcast gateway: the LISTEN loop failed; reconnecting",
                                 extra={"pid": aps.backend_pid})
            if self._closing:
                return
            await self._reconnect(aps)

    async def _reconnect(self, old: aio.AsyncPubSub) -> None:
        self._ready.clear()
        with contextlib.suppress(Exception):
            await old.close()
        policy = self.settings.reconnect_backoff
        attempts = policy.attempts(time.monotonic())
        attempt = 0
        quiet = RetryLog()  # not a warning per attempt: Backoff(initial=0) floods
        while not self._closing:
            delay = attempts.next_delay(time.monotonic())
            if delay is None:
                # The series ended (max_attempts, max_time); the gateway does
                # not give up its database: a new series, after the longest delay.
                attempts = policy.attempts(time.monotonic())
                delay = policy.maximum
            await asyncio.sleep(delay)
            attempt += 1
            try:
                aps = await connect_listener(self.settings)
            except ConnectError as exc:
                covered = quiet.failed(attempt, time.monotonic())
                if covered is not None:
                    logger.warning("pgcast gateway: reconnect %s failed: %s",
                                   describe_attempts(*covered), exc, extra={"attempt": attempt})
                continue
            async with self._lock:
                try:
                    await listen_all(aps, sorted(self.router.channels()), self.is_durable)
                except PgcastError as exc:
                    logger.warning("pgcast gateway: re-LISTEN failed: %s", exc,
                                   extra={"pid": aps.backend_pid})
                    with contextlib.suppress(Exception):
                        await aps.close()
                    continue
                self._aps = aps
                self._ready.set()
            self._reap_wanted.set()
            self._announce_reconnect()
            logger.info("pgcast gateway: LISTEN connection restored (pid %d)", aps.backend_pid,
                        extra={"pid": aps.backend_pid,
                               "channels": sorted(aps.listening_channels())})
            return

    def _announce_reconnect(self) -> None:
        self.stats.reconnects += 1
        frame = _protocol.notice(
            "reconnected",
            "the gateway's database connection was lost and restored; "
            "notifications sent in between were missed",
        )
        for sub in self.router.broadcast(frame):
            self._slow(self._clients.get(sub))

    def _slow(self, client: Client | None) -> None:
        if client is None or client.closing.done():
            return
        self.stats.disconnects["slow_consumer"] += 1
        client.kick(
            CLOSE_SLOW_CONSUMER,
            f"slow consumer: {self.settings.queue_size} messages queued (queue_size)",
        )

    # -- operations --------------------------------------------------------

    async def metrics(self) -> str:
        """The Prometheus text for ``/metrics`` (the NOTIFY queue's usage read
        on a short separate connection, cached for ``metrics_cache`` seconds)."""
        return _metrics.render(self.metric_families(await self._queue_usage.read()))

    def metric_families(self, queue_usage: float | None) -> list[_metrics.Family]:
        """The metric families of now, with *queue_usage* as read by the caller."""
        return _metrics.families(
            self.stats, clients=self.clients_by_transport(),
            subscriptions=self.router.subscriptions, channels=len(self.listening()),
            database_up=self.database_up, backend_pid=self.backend_pid, queue_usage=queue_usage,
        )

