# Generated from src/pgcast/client/_pubsub_async.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
"""The PubSub: listen to and notify PostgreSQL channels over one connection.

The asyncio one (:class:`PubSub`), written by hand; the sync one
(:class:`pgcast.PubSub`) is generated from this file by
``tools/async_to_sync.py``. The connection underneath is
:mod:`pgcast.client._session_async`; the decisions are the core's
(:mod:`pgcast._core`, :mod:`pgcast.durable._core`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, TypeVar, overload

from .. import diagnostics
from .._channels import unlisten_sql
from .._core import ExceptionHandler, Handler, Wait, check_timeout, plan
from .._errors import ClosedError, ConnectionLostError, ListenNotEffectiveError, PgcastError
from .._event import Event, Position
from .._flavour import AwaitRunner
from .._gap import Gap
from .._payload import Payload
from .._reconnect import Reconnected
from ..durable._core import Unfetched, publish_many_query, publish_query
from ._durable_session import query_steps
from ._runner import Runner
from ._supervised import Supervised

__all__ = ["PubSub", "ReconnectHook"]

T = TypeVar("T")

logger = logging.getLogger("pgcast")

#: A reconnect hook: see :meth:`PubSub.add_reconnect_hook`.
ReconnectHook = Callable[["PubSub"], None]


class PubSub(Supervised):
    """Listen to and notify PostgreSQL channels over one connection.

    Create it with ``connect()``. Use it as a context manager, or call
    ``close()``.

    Other threads or tasks may notify, listen and unlisten while one iterates
    :meth:`events`: they do not wait for its timeout. What is not safe: two
    iterating the same PubSub at once, and :meth:`transaction` while others
    notify through the same PubSub (their NOTIFYs would join the
    transaction). An asyncio PubSub belongs to the event loop it was created in.
    """

    #: Set by stop(), read by run() (asyncio flavour).
    _stopping = False

    def listening_channels(self) -> frozenset[str]:
        """The exact names of the channels listened to now."""
        return frozenset(self._core.channels)

    # -- subscriptions -----------------------------------------------------

    def listen(
        self,
        *channels: str,
        durable: bool = False,
        since: int | Position | None = None,
        consumer: str | None = None,
    ) -> None:
        """Start receiving notifications on *channels* (exact names).

        All names are validated before anything is sent; listening again to a
        channel already listened to does nothing. The LISTEN is confirmed
        with ``pg_listening_channels()``.

        With *durable*, the channels' durable messages (see
        :mod:`pgcast.durable`) are also replayed from the log: those after
        *since* (a log id, or a :class:`~pgcast.Position`,
        ``event.position``, which is also checked against the log's epoch);
        or, for a named *consumer*, those after the last one it acknowledged
        with :meth:`ack` (a new consumer starts at *since*, else at the end
        of the log; *since* given for an existing consumer **moves** it
        there, forward or back: seek and rewind); or, with neither, only what
        is missed across reconnects. Then they continue live, per channel in
        commit order, with no gap and no duplicate. The first batch of the
        replay is in the inbox when this returns.

        A resume that cannot be complete (messages after the position were
        pruned, or the position is from another epoch of the log) is
        announced: a :class:`~pgcast.Gap` marker comes before the replayed
        events, and ``on_gap`` (see ``connect()``) is called.

        :raises InvalidChannelError: a name is empty, contains NUL or is over
            63 bytes in UTF-8.
        :raises ListenNotEffectiveError: ``pg_listening_channels()`` does not
            show the LISTEN (a pooler in transaction mode); the channels are
            not counted as listened to.
        :raises HotStandbyError: the server is a standby.
        :raises SchemaError: durable, and the ``pgcast`` schema is missing
            and may not be installed by this role.
        """
        self._check_open(lost_ok=True)  # even when there is nothing to send
        core = self._core
        if not core.identified:  # names the probe channel: before plan_listen
            self._identify()
        new, sql = core.plan_listen(channels)
        fresh = core.durable.plan_subscribe(channels, durable, since, consumer)
        try:
            if sql is not None:
                probe_was_listening = core.probe_listening
                for _ in range(3):  # a reconnect per attempt at most
                    generation = self._generation
                    self._execute(sql)
                    if self._generation == generation:
                        break
                    # Restored before the LISTEN was sent: it was planned for
                    # the old session (its probe channel); plan it again.
                    new, sql = core.plan_listen(channels)
                    if sql is None:
                        break
                core.did_listen(new)
                try:
                    # A separate statement: behind a transaction-mode pooler it
                    # may run on another server session, which is what it is
                    # to catch.
                    checked, total = core.listen_check(new)
                    rows = self._fetch(diagnostics.VERIFY_NEW_SQL, (checked,))
                    if not diagnostics.check_listen(checked, total, rows[0] if rows else None):
                        rows = self._fetch(diagnostics.VERIFY_SQL)
                        diagnostics.check_shortfall(
                            core.expected_listening(), rows[0] if rows else None
                        )
                    self._check_pinned()
                except ListenNotEffectiveError:
                    core.channels.difference_update(new)
                    if core.pooled:
                        self._unlisten_shared(new, probe_was_listening)
                    raise
            if fresh:
                self._durable(core.durable.subscribe_steps(fresh, since, consumer))
        except BaseException:
            core.durable.abandon(fresh)
            raise

    def _unlisten_shared(self, new: list[str], probe_was_listening: bool) -> None:
        # Best effort, after a LISTEN through a pooler did not hold: UNLISTEN
        # where it may have landed (the session the pool hands back), so that
        # the next client given that session does not receive our channels.
        core = self._core
        names = list(new)
        if not probe_was_listening and core.probe_listening and (core.probe is not None):
            names.append(core.probe)
            core.probe_listening = False
        try:
            self._execute(unlisten_sql(names))
        except PgcastError as exc:
            logger.warning(
                "pgcast: UNLISTEN after a LISTEN that did not hold failed: %s",
                exc,
                extra={"pid": core.backend_pid, "channels": names},
            )

    def unlisten(self, *channels: str) -> None:
        """Stop receiving on *channels*; with no arguments, on every channel.

        Events of those channels already read but not yet handed out are
        discarded: after this returns, none arrives.
        """
        self._check_open(lost_ok=True)  # even when there is nothing to send
        gone, sql = self._core.plan_unlisten(channels)
        if sql is not None:
            self._execute(sql)
            self._core.did_unlisten(gone)

    def queue_usage(self) -> float:
        """``pg_notification_queue_usage()``: the fraction of the server's
        notification queue in use, 0.0 to 1.0. Near 1.0, a listener somewhere
        is not reading and NOTIFY is about to fail."""
        rows = self._fetch(diagnostics.QUEUE_USAGE_SQL)
        return float(rows[0][0]) if rows else 0.0

    # -- publishing --------------------------------------------------------

    def notify(self, channel: str, payload: Payload = "", *, durable: bool = False) -> int | None:
        """Send *payload* on *channel*. Dicts and lists are sent as JSON.

        Outside :meth:`transaction` it is delivered at once; inside, at commit.
        Payloads of any size are accepted: one of 8000 bytes or more in UTF-8
        is stored in the log and fetched by the receivers. With *durable*, the
        message is stored in the log for replay (see :mod:`pgcast.durable`).
        Returns the message's log id, or None for a plain NOTIFY.

        :raises PayloadError: the payload contains NUL or is not a str, dict
            or list. Nothing was sent and the PubSub stays usable.
        :raises SchemaError: the payload needs the log, and the ``pgcast``
            schema is missing and may not be installed by this role.
        """
        query, logged = publish_query(channel, payload, durable)
        if not logged:
            self._command(query[0], query[1], fetch=False)
            return None
        rows = self._durable(query_steps(query))
        return int(rows[0][0])

    def notify_many(
        self, messages: Iterable[tuple[str, Payload]], *, durable: bool = False
    ) -> int | None:
        """Send many ``(channel, payload)`` in one round trip and one transaction.

        Every message is checked first; one bad message means none is sent.
        As with any transaction, identical plain messages in one call arrive
        once. With *durable*, or when a payload needs the log (see
        :meth:`notify`), returns the last message's log id, else None.
        """
        planned = publish_many_query(messages, durable)
        if planned is None:
            return None
        query, logged = planned
        if not logged:
            self._execute(*query)
            return None
        rows = self._durable(query_steps(query))
        return None if rows[0][0] is None else int(rows[0][0])

    def ack(self, event: Event) -> None:
        """Record that the consumer of *event*'s channel processed it, and
        everything before it on that channel: after a restart, the consumer
        resumes after it. Acknowledgements only move forward.

        :raises TypeError: *event* is not a durable event.
        :raises ValueError: its channel is not listened to with a consumer.
        """
        self._execute(*self._core.durable.ack_query(event))

    # -- receiving ---------------------------------------------------------

    def get_event(self) -> Event | Reconnected | Gap | None:
        """The next event or marker (:class:`Reconnected`, :class:`~pgcast.Gap`),
        or None.

        Reads only what has arrived, without waiting; but when it finds the
        connection lost, it reconnects first (which waits), unless
        ``reconnect=False``: then :class:`~pgcast.ConnectionLostError`.
        """
        core = self._core
        inbox = core.inbox
        while True:  # ends: each turn takes an event out, or returns
            if not inbox:
                generation = self._generation
                try:
                    self._replay()
                    self._read()
                except ConnectionLostError as exc:
                    self._recover(exc, generation)
            event = inbox.popleft() if inbox else None
            if type(event) is Unfetched:
                fetched = self._fetch_payload(event)
                if fetched is None:
                    continue  # pruned meanwhile
                return fetched
            return event

    @overload
    def events(
        self,
        select_timeout: float | None = ...,
        yield_timeouts: Literal[False] = ...,
        ignore_own: bool = ...,
    ) -> Iterator[Event | Reconnected | Gap]: ...

    @overload
    def events(
        self, select_timeout: float | None, yield_timeouts: Literal[True], ignore_own: bool = ...
    ) -> Iterator[Event | Reconnected | Gap | None]: ...

    @overload
    def events(
        self,
        select_timeout: float | None = ...,
        *,
        yield_timeouts: Literal[True],
        ignore_own: bool = ...,
    ) -> Iterator[Event | Reconnected | Gap | None]: ...

    def events(
        self,
        select_timeout: float | None = 5.0,
        yield_timeouts: bool = False,
        ignore_own: bool = False,
    ) -> Iterator[Event | Reconnected | Gap | None]:
        """Yield events as they arrive (pgpubsub's interface).

        The socket is waited on in slices of *select_timeout* seconds; with
        *yield_timeouts*, ``None`` is yielded after each slice without an
        event (a chance to send a keep-alive). *ignore_own* skips the
        notifications this PubSub sent itself. Iteration ends when the PubSub
        is closed.

        After a lost connection is restored, a :class:`Reconnected` marker is
        yielded: notifications sent meanwhile were missed (the type says so:
        narrow it with ``isinstance(x, pgcast.Event)``). A durable resume
        that cannot be complete yields a :class:`~pgcast.Gap` before the
        replayed events (see :meth:`listen`). With
        ``reconnect=False``, :class:`~pgcast.ConnectionLostError` is raised
        instead.
        """
        timeout = check_timeout("select_timeout", select_timeout)
        if timeout == 0:
            raise ValueError("select_timeout must be > 0 (use get_event() to poll)")
        own = self._core.own_pids if ignore_own else None
        steps = plan(self._core.inbox, timeout=timeout, idle=yield_timeouts, skip_pids=own)
        return self._drive(steps)

    @overload
    def wait(self, timeout: None = ...) -> Iterator[Event | Reconnected | Gap]: ...

    @overload
    def wait(self, timeout: float) -> Iterator[Event | Reconnected | Gap | None]: ...

    def wait(self, timeout: float | None = None) -> Iterator[Event | Reconnected | Gap | None]:
        """Yield events, and ``None`` as an idle event about every *timeout*
        seconds without one (py-postgresql's interface).

        ``timeout=None`` never idles (and yields no ``None``); ``timeout=0``
        yields what is pending now and ends. Breaking out of the loop loses
        nothing. :class:`Reconnected` and :class:`~pgcast.Gap` markers are
        yielded as in :meth:`events`.
        """
        t = check_timeout("timeout", timeout)
        return self._drive(plan(self._core.inbox, timeout=t, idle=t is not None, once=t == 0))

    def _drive(
        self,
        steps: Iterator[Wait | Event | Reconnected | Gap | None],
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[Event | Reconnected | Gap | None]:
        """Hand out what *steps* (:func:`pgcast._core.plan`) yields, waiting
        where it says; until closed, or *stop* answers True."""
        self._check_open(lost_ok=True)
        for step in steps:
            if type(step) is Wait:
                if self._closed or (stop is not None and stop()):
                    return
                generation = self._generation
                try:
                    # A durable channel catching up: a batch, then a read.
                    self._fill(0 if self._replay() else step.timeout)
                except ConnectionLostError as exc:
                    if self._closed:
                        return
                    try:
                        self._recover(exc, generation)  # the marker lands in the inbox
                    except ClosedError:
                        return  # closed while reconnecting: iteration ends
            elif type(step) is Unfetched:
                fetched = self._fetch_payload(step)
                if fetched is not None:
                    yield fetched
            else:
                yield step  # type: ignore[misc]

    # -- callbacks ---------------------------------------------------------

    def subscribe(self, channel: str, handler: Handler) -> None:
        """Call *handler* with every event on *channel* (listening to it).

        Handlers may be functions or coroutine functions; those of one channel
        see its events in order. A handler that raises goes to the exception
        handler (see :meth:`set_exception_handler`); delivery goes on.
        """
        self._core.add_handler(channel, handler)
        self.listen(channel)

    def unsubscribe(self, channel: str) -> None:
        """Remove every handler of *channel* and stop listening to it."""
        self._core.remove_handlers(channel)
        self.unlisten(channel)

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        """Set what is called with ``(exception, event)`` when a handler fails.

        ``None`` restores the default, which logs to the ``pgcast`` logger.
        """
        self._core.exception_handler = handler

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Deliver events to the subscribed handlers until *stop* is set or
        the PubSub is closed. :meth:`run_in_thread` runs this in a thread."""
        self._deliver(None if stop is None else stop.is_set)

    def run_in_thread(self, *, daemon: bool = True) -> Runner:
        """Deliver events to the handlers from a background thread.

        Returns a :class:`Runner`; call its ``stop()`` to end it.
        """
        self._check_open()
        runner = Runner(self, daemon=daemon)
        runner.start()
        return runner

    def _deliver(self, stop: Callable[[], bool] | None) -> None:
        core = self._core
        runner = AwaitRunner()
        try:
            for event in self._drive(plan(core.inbox, timeout=None, idle=False), stop):
                for result in core.deliver(event):
                    try:
                        runner.run(result)
                    except Exception as exc:
                        core.handler_failed(exc, event)  # type: ignore[arg-type]
                if stop is not None and stop():
                    return  # the events not handled stay in the inbox
        finally:
            runner.close()

    # -- reconnecting ------------------------------------------------------

    def add_reconnect_hook(self, hook: ReconnectHook) -> None:
        """Call ``hook(pubsub)`` (awaited, in the asyncio flavour) after each
        reconnect, once every channel is LISTENed again and before the
        :class:`Reconnected` marker is queued.

        For extensions such as durable channels: the hook may run commands
        through this PubSub (it runs in the reconnecting thread or task, on
        the new connection) and append events to the inbox, which then come
        before the marker. A hook that raises a connection error makes the
        attempt fail and be retried; any other exception ends the reconnect
        and propagates to the one that was reconnecting.
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable, not {type(hook).__name__}")
        self._hooks.append(hook)
