"""The synchronous PubSub: one PostgreSQL connection that listens and notifies.

The listening thread waits on the connection's socket with a selector and
holds no lock while it waits; it takes the connection's lock only to read what
arrived, which never blocks. Other threads may therefore call :meth:`notify`,
:meth:`listen` and :meth:`unlisten` while one thread iterates
:meth:`events`: they run at once and do not wait for the iterating thread's
timeout. Notifications that arrive during their queries go to the same inbox,
and the iterating thread is woken to hand them out.

What is not safe: two threads iterating the same PubSub at once, and
:meth:`transaction` while other threads notify through the same PubSub (their
NOTIFYs would join the transaction).

Reconnecting (see :mod:`pgcast._reconnect` for the order of things): the
thread that finds the connection lost reconnects, under a lock, so one thread
does it and the others wait for it. The iterating thread does it when a read
fails or the health check expires, with no time limit but the backoff's own;
a thread calling :meth:`PubSub.notify` (or any command) does it when nobody
else is, bounded by ``notify_timeout``, then sends. The health check's probe
is sent by the iterating thread only, without waiting for its answer; a
command from another thread first waits (briefly) for that answer, since libpq
runs one command at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import psycopg

from . import _ops as ops
from ._backoff import Backoff
from ._closing import Closing
from ._connect import connect_failed, connect_plan, reconnect_conninfo
from ._core import Handler, Wait, notify_query, wrap_error
from ._discard import DISCARD_TIMEOUT, shutdown
from ._durable_core import BATCHES_BEFORE_MARKER, Unfetched
from ._errors import ClosedError, ConnectionLostError
from ._event import DurableEvent, Event
from ._payload import Payload
from ._pubsub_base import PubSubBase
from ._reconnect import Attempt, OnReconnect, Reconnected, Resilience, Sleep
from ._runner import Runner

__all__ = ["PubSub", "Runner", "connect", "notify"]


logger = logging.getLogger("pgcast")

#: A reconnect hook: see :meth:`PubSub.add_reconnect_hook`.
ReconnectHook = Callable[["PubSub"], None]

T = TypeVar("T")


def connect(
    conninfo: str = "",
    *,
    reconnect: bool = True,
    reconnect_backoff: Backoff | None = None,
    health_check_interval: float | None = 30.0,
    on_reconnect: OnReconnect | None = None,
    notify_timeout: float = 30.0,
    **kwargs: Any,
) -> PubSub:
    """Open a :class:`PubSub` on a new connection.

    Takes what ``psycopg.connect`` takes: a DSN or URL, keyword arguments, or
    nothing (then ``DATABASE_URL``, then libpq's ``PG*`` variables). The
    connection arguments are kept to reconnect with.

    :param reconnect: when the connection is lost, reconnect with
        *reconnect_backoff* (default :class:`pgcast.Backoff`: 0.1 s growing
        to 10 s, with jitter, without end), LISTEN every channel again and
        deliver a :class:`pgcast.Reconnected` marker in the event stream.
        ``False``: raise :class:`~pgcast.ConnectionLostError` instead.
    :param health_check_interval: while listening, probe the connection after
        this many seconds of silence, and reconnect when a probe is not
        answered within as long again; also sets TCP keepalives. ``0`` turns
        the probe off.
    :param on_reconnect: called with each marker after every channel was
        LISTENed again, before the marker reaches the event stream; a coroutine
        function is run to completion.
    :param notify_timeout: how long a command (a notify, a listen) waits for a
        lost connection to come back before failing with
        :class:`~pgcast.NotSentError`.
    :raises ConnectError: the server could not be reached or refused the
        login; the message is the server's.
    """
    conninfo, options, res = connect_plan(
        conninfo, kwargs, reconnect=reconnect, reconnect_backoff=reconnect_backoff,
        health_check_interval=health_check_interval, notify_timeout=notify_timeout,
        on_reconnect=on_reconnect,
    )
    open_connection = _opener(conninfo, options)
    return PubSub(open_connection(), resilience=res, connector=open_connection)


def _opener(conninfo: str, options: dict[str, Any]) -> Callable[[], psycopg.Connection[Any]]:
    """What opens the PubSub's connections: the first one and every reconnect."""

    def open_connection() -> psycopg.Connection[Any]:
        try:
            return psycopg.Connection.connect(conninfo, **options)
        except psycopg.Error as exc:
            raise connect_failed(exc) from exc

    return open_connection


def notify(conn: psycopg.Connection[Any], channel: str, payload: Payload = "") -> None:
    """Send a notification through an application's own psycopg connection.

    It joins the connection's current transaction, if any, so it is delivered
    when (and only if) that transaction commits: the NOTIFY goes out with the
    data change it announces.
    """
    sql, params = notify_query(channel, payload)
    conn.execute(sql, params)


class PubSub(PubSubBase[psycopg.Connection[Any]], Closing):
    """Listen to and notify PostgreSQL channels over one connection.

    Create it with :func:`pgcast.connect`. Use it as a context manager, or call
    :meth:`close`.
    """


    def __init__(
        self,
        conn: psycopg.Connection[Any],
        *,
        resilience: Resilience | None = None,
        connector: Callable[[], psycopg.Connection[Any]] | None = None,
    ) -> None:
        """Wrap *conn*, which must be in autocommit mode and used by nothing else.

        *resilience* holds the reconnect and health-check settings (see
        :func:`pgcast.connect`); *connector* opens a new connection to
        reconnect with (default: *conn*'s own parameters).
        """
        self._setup(conn, resilience)
        self._connector = connector or _opener(reconnect_conninfo(conn), {"autocommit": True})
        self._lock = conn.lock
        self._closing = threading.Event()
        self._reconnect_lock = threading.Lock()
        self._reconnecting: int | None = None  # the thread reconnecting now
        self._hooks: list[ReconnectHook] = [PubSub._replay_after_reconnect]
        self._queries_lock = threading.Lock()
        # Whether the iterating thread is inside select(); see close().
        self._selecting = False
        self._select_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._pgconn.socket, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._registered = (self._generation, self._pgconn.socket)
        try:
            self._run(ops.identify(self._core))
        except BaseException:
            self.close()
            raise

    # -- connection --------------------------------------------------------

    def fileno(self) -> int:
        """The connection's socket, to wait on with ``select``/``selectors``
        (as :class:`pgcast.NotificationManager` does); then :meth:`get_event`.

        A reconnect replaces the socket: ask again after a :class:`Reconnected`
        marker (or when :attr:`generation` changed)."""
        self._check_open()
        try:
            return self._pgconn.socket
        except psycopg.Error as exc:
            raise wrap_error(exc) from exc

    def close(self) -> None:
        """Close the connection. Idempotent; iterating threads stop iterating."""
        if self._closed:
            return
        with self._select_lock:
            self._closed = True
            selecting = self._selecting
        self._closing.set()
        self._wake()
        self._conn.close()
        # A thread inside select() must find the wake byte: closing the wake
        # socket would remove it from epoll's ready list and leave the thread
        # asleep, so that thread releases them on its way out.
        if not selecting:
            self._release()

    def _release(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- subscriptions -----------------------------------------------------

    def listen(
        self,
        *channels: str,
        durable: bool = False,
        since: int | None = None,
        consumer: str | None = None,
    ) -> None:
        """Start receiving notifications on *channels* (exact names).

        All names are validated before anything is sent; listening again to a
        channel already listened to does nothing.

        With *durable*, the channels' durable messages (see
        :mod:`pgcast.durable`) are also replayed from the log: those after
        log id *since*; or, for a named *consumer*, those after the last one
        it acknowledged with :meth:`ack` (a new consumer starts at *since*,
        else at the end of the log); or, with neither, only what is missed
        across reconnects. Then they continue live, per channel in commit
        order, with no gap and no duplicate. The first batch of the replay is
        in the inbox when this returns.

        :raises InvalidChannelError: a name is empty, contains NUL or is over
            63 bytes in UTF-8.
        :raises ListenNotEffectiveError: ``pg_listening_channels()`` does not
            show the LISTEN (a pooler in transaction mode); the channels are
            not counted as listened to.
        :raises HotStandbyError: the server is a standby.
        :raises SchemaError: durable, and the ``pgcast`` schema is missing
            and may not be installed by this role.
        """
        self._run(ops.listen(self, channels, durable, since, consumer))

    def unlisten(self, *channels: str) -> None:
        """Stop receiving on *channels*; with no arguments, on every channel.

        Events of those channels already read but not yet handed out are
        discarded: after this returns, none arrives.
        """
        self._run(ops.unlisten(self, channels))

    def queue_usage(self) -> float:
        """``pg_notification_queue_usage()``: the fraction of the server's
        notification queue in use, 0.0 to 1.0. Near 1.0, a listener somewhere
        is not reading and NOTIFY is about to fail."""
        return self._run(ops.queue_usage())

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
        return self._run(ops.notify(self._core, channel, payload, durable))

    def notify_many(
        self, messages: Iterable[tuple[str, Payload]], *, durable: bool = False
    ) -> int | None:
        """Send many ``(channel, payload)`` in one round trip and one transaction.

        Every message is checked first; one bad message means none is sent.
        As with any transaction, identical plain messages in one call arrive
        once. With *durable*, or when a payload needs the log (see
        :meth:`notify`), returns the last message's log id, else None.
        """
        return self._run(ops.notify_many(self._core, messages, durable))

    def ack(self, event: Event) -> None:
        """Record that the consumer of *event*'s channel processed it, and
        everything before it on that channel: after a restart, the consumer
        resumes after it. Acknowledgements only move forward.

        :raises TypeError: *event* is not a durable event.
        :raises ValueError: its channel is not listened to with a consumer.
        """
        self._run(ops.ack(self._core, event))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction: notifications sent inside are delivered at commit,
        and not at all if it rolls back (on an exception). A connection lost
        inside raises :class:`~pgcast.ConnectionLostError`: nothing of the
        transaction was committed."""
        self._check_open()
        self._begin_command()
        try:
            with self._conn.transaction():
                yield
        except psycopg.Error as exc:
            raise wrap_error(exc) from exc
        finally:
            self._end_command()
            self._after_query()

    # -- receiving ---------------------------------------------------------

    def get_event(self) -> Event | Reconnected | None:
        """The next event or :class:`Reconnected` marker, or None.

        Reads only what has arrived, without waiting; but when it finds the
        connection lost, it reconnects first (which waits), unless
        ``reconnect=False``: then :class:`~pgcast.ConnectionLostError`.
        """
        return self._run(ops.get_event(self))

    def events(
        self,
        select_timeout: float | None = 5.0,
        yield_timeouts: bool = False,
        ignore_own: bool = False,
    ) -> Iterator[Event | Reconnected | None]:
        """Block and yield events as they arrive (pgpubsub's interface).

        The socket is waited on in slices of *select_timeout* seconds; with
        *yield_timeouts*, ``None`` is yielded after each slice without an
        event (a chance to send a keep-alive). *ignore_own* skips the
        notifications this PubSub sent itself. Iteration ends when the PubSub
        is closed.

        After a lost connection is restored, a :class:`Reconnected` marker is
        yielded: notifications sent meanwhile were missed. With
        ``reconnect=False``, :class:`~pgcast.ConnectionLostError` is raised
        instead.
        """
        return self._drive(self._events_plan(select_timeout, yield_timeouts, ignore_own))

    def wait(self, timeout: float | None = None) -> Iterator[Event | Reconnected | None]:
        """Yield events, and ``None`` as an idle event about every *timeout*
        seconds without one (py-postgresql's interface).

        ``timeout=None`` never idles; ``timeout=0`` yields what is pending now
        and ends. Breaking out of the loop loses nothing. :class:`Reconnected`
        markers are yielded as in :meth:`events`.
        """
        return self._drive(self._wait_plan(timeout))

    def _drive(
        self,
        steps: Iterator[Wait | Event | Reconnected | None],
        stop: threading.Event | None = None,
    ) -> Iterator[Event | Reconnected | None]:
        if self._closed:
            raise ClosedError("this PubSub is closed")
        for step in steps:
            if type(step) is Wait:
                if self._closed or (stop is not None and stop.is_set()):
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
        see its events in order. Events are delivered by :meth:`run_in_thread`
        or :meth:`run_forever`. A handler that raises goes to the exception
        handler (see :meth:`set_exception_handler`); delivery goes on.
        """
        self._core.add_handler(channel, handler)
        self.listen(channel)

    def unsubscribe(self, channel: str) -> None:
        """Remove every handler of *channel* and stop listening to it."""
        self._core.remove_handlers(channel)
        self.unlisten(channel)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Deliver events to the subscribed handlers until *stop* is set or
        the PubSub is closed. :meth:`run_in_thread` runs this in a thread."""
        core = self._core
        steps = self._run_plan()
        with contextlib.ExitStack() as stack:
            loop: asyncio.Runner | None = None
            for event in self._drive(steps, stop):
                for result in core.deliver(event):
                    try:
                        if loop is None:
                            loop = stack.enter_context(asyncio.Runner())
                        loop.run(result)  # type: ignore[arg-type]
                    except Exception as exc:
                        core.handler_failed(exc, event)  # type: ignore[arg-type]
                if stop is not None and stop.is_set():
                    return  # the events not handled stay in the inbox

    def run_in_thread(self, *, daemon: bool = True) -> Runner:
        """Deliver events to the handlers from a background thread.

        Returns a :class:`Runner`; call its ``stop()`` to end it.
        """
        self._check_open()
        runner = Runner(self, daemon=daemon)
        runner.start()
        return runner

    # -- the driver --------------------------------------------------------

    def _run(self, op: ops.Op[T]) -> T:
        """Execute the requests of *op* (see :mod:`pgcast._ops`) until it returns."""
        send = op.send
        reply: Any = None
        try:
            request = send(None)
            while True:
                try:
                    kind = type(request)
                    if kind is tuple:
                        reply = self._command(*request, fetch=True)  # type: ignore[misc]
                    elif kind is ops.Execute:
                        reply = self._command(*request, fetch=False)  # type: ignore[misc]
                    elif request is ops.WAKE:
                        self._wake()
                        reply = None
                    elif request is ops.READ:
                        self._read()
                        reply = None
                    else:
                        reply = self._serve(request)
                except BaseException as exc:
                    request = op.throw(exc)
                    continue
                request = send(reply)
        except StopIteration as done:
            result: T = done.value
            return result

    def _serve(self, request: ops.Request) -> Any:
        """Execute the requests other than commands (see :meth:`_run`)."""
        if request is ops.SETTLE:
            return self._settle()
        if type(request) is ops.Recover:
            return self._recover(
                request.error, request.generation, request.deadline, force=request.force
            )
        if type(request) is ops.CallOnReconnect:
            self._call_on_reconnect(request.marker)
        elif request is ops.RECONNECTING:
            self._reconnecting = threading.get_ident()
        elif type(request) is ops.Transaction:
            with self.transaction():
                return self._run(request.steps)
        elif type(request) is Sleep:
            if self._closing.wait(request.seconds):
                raise ClosedError("this PubSub was closed while reconnecting")
        elif type(request) is Attempt:
            self._run(ops.attempt(self._core))
        elif request is ops.DISCARD:
            self._discard()
        elif request is ops.CHECK_CLOSED:
            if self._closed:
                self._discard()
                raise ClosedError("this PubSub was closed while reconnecting")
        elif request is ops.CONNECT:
            self._install(self._connector())
        elif type(request) is ops.Direct:
            try:
                cur = self._conn.execute(request.sql, prepare=False)
                return cur.fetchall() if request.fetch else None
            except psycopg.Error as exc:
                raise wrap_error(exc) from exc
        elif type(request) is ops.Elsewhere:
            other = self._connector()
            try:
                return other.execute(request.sql, prepare=False).fetchall()
            except psycopg.Error as exc:
                raise wrap_error(exc) from exc
            finally:
                other.close()
        elif request is ops.NO_PREPARE:
            self._conn.prepare_threshold = None
        elif request is ops.AFTER_QUERY:
            self._after_query()
        elif request is ops.HOOKS:
            for hook in self._hooks:
                hook(self)
        else:
            raise TypeError(f"unknown request {request!r}")
        return None

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._on_wake is not None:  # a NotificationManager watching us
            self._on_wake()

    def _execute(self, sql: str | bytes, params: Any = None) -> None:
        self._command(sql, params, fetch=False)

    def _fetch(self, sql: str | bytes, params: Any = None) -> list[tuple[Any, ...]]:
        """Run a query and return its rows, as :meth:`_execute` runs commands."""
        return self._command(sql, params, fetch=True)

    def _command(self, sql: str | bytes, params: Any, *, fetch: bool) -> list[tuple[Any, ...]]:
        # A connection known lost before anything is sent is restored first
        # (bounded by notify_timeout): the command is then sent, never dropped.
        # A connection lost while the command is on the wire cannot tell
        # whether the server ran it: that is raised, not retried.
        if self._closed:
            raise ClosedError("this PubSub is closed")
        self._begin_command()
        try:
            conn = self._conn
            generation = self._generation
            with self._queries_lock:
                self._in_flight += 1
            try:
                cur = conn.execute(sql, params, prepare=None if params else False)
                rows = cur.fetchall() if fetch and cur.description is not None else []
            except psycopg.Error as exc:
                raise self._command_failed(exc, generation) from exc
            finally:
                with self._queries_lock:
                    self._in_flight -= 1
            self._core.health.heard(self._core.clock())
            return rows
        finally:
            self._end_command()
            self._after_query()

    def _begin_command(self) -> None:
        """Make the connection ready for a command: no probe outstanding, not
        known to be lost (else reconnect, within notify_timeout)."""
        with self._queries_lock:
            self._queries += 1
        try:
            self._run(ops.begin_command(self))
        except BaseException:
            self._end_command()
            raise

    def _in_reconnect(self) -> bool:
        return self._reconnecting == threading.get_ident()

    def _end_command(self) -> None:
        with self._queries_lock:
            self._queries -= 1

    def _settle(self) -> None:
        # Reads what is pending (which notices a connection closed by the
        # server) and waits for an outstanding probe's answer.
        self._check_open()
        conn = self._conn
        with conn.lock:
            for step in self._core.settle(conn.pgconn):
                select.select([conn.pgconn.socket], [], [], step.timeout)

    def _after_query(self) -> None:
        # Notifications that came in with the query's results are already in
        # the inbox, and libpq may hold more parsed ones; the iterating thread
        # is waiting on a socket that will not become readable for them.
        conn = self._conn
        if self._closed or conn.closed:
            return
        with conn.lock:
            try:
                self._core.take(conn.pgconn)
            except ConnectionLostError:
                return  # the next read or command notices it
        # Not only what take() added: psycopg's notify handler already put in
        # the inbox what came with the results, and nobody was woken for it.
        # Only a thread blocked in select() needs the wake byte (_fill looks
        # at the inbox after setting _selecting): a byte nobody waits for
        # costs the next wait a spurious wake-up and read, which showed in
        # the ping-pong round trip (benchmarks/bench_latency.py).
        if self._core.inbox:
            with self._select_lock:
                selecting = self._selecting
            if selecting or self._on_wake is not None:
                self._wake()

    def _read(self) -> None:
        self._check_open()
        conn = self._conn
        with conn.lock:
            self._core.read(conn.pgconn)

    def _fill(self, timeout: float | None) -> None:
        core = self._core
        if timeout != 0:
            self._check_open()
            self._maybe_probe()
            try:
                sock = self._pgconn.socket
            except psycopg.Error as exc:  # closed by another thread meanwhile
                if self._closed:
                    return
                raise ConnectionLostError(f"connection to PostgreSQL lost: {exc}") from exc
            if self._registered != (self._generation, sock):
                self._register(sock)
            with self._select_lock:
                if self._closed:
                    return
                self._selecting = True
            try:
                # Events that reached the inbox before _selecting was set
                # woke nobody (see _after_query): hand them out, do not wait.
                ready = self._selector.select(0 if core.inbox else core.wait_time(timeout))
            finally:
                with self._select_lock:
                    self._selecting = False
                    release = self._closed
                if release:
                    self._release()
            if release:
                return
            if not ready:
                core.check_health()
                return
            for key, _ in ready:
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
            if self._closed:
                return
        self._check_open()
        conn = self._conn
        # A command running in another thread holds the lock and reads the
        # socket itself (its notifications reach the inbox); wait for it no
        # longer than the health check allows, so a command stuck in a dead
        # network cannot hold the listener too.
        limit = core.wait_time(None)
        if not conn.lock.acquire(timeout=-1 if limit is None else max(0.01, limit)):
            core.check_health()
            return
        try:
            core.read(conn.pgconn)
        finally:
            conn.lock.release()
        core.check_health()

    def health_tick(self) -> float | None:
        """One step of the health check, for a supervisor that waits on
        :meth:`fileno` itself instead of iterating (a NotificationManager):
        sends the probe if one is due, raises
        :class:`~pgcast.ConnectionLostError` if the last one went unanswered
        (then call :meth:`reconnect`), and returns how many seconds may pass
        before the next call (``None``: no health check to run)."""
        self._check_open()
        self._maybe_probe()
        self._core.check_health()
        return self._core.wait_time(None)

    def _maybe_probe(self) -> None:
        core = self._core
        if not core.wants_probe() or self._reconnecting is not None:
            return
        with self._queries_lock:
            if self._queries:
                # libpq runs one command at a time. A command on the wire is a
                # round trip too: it stands in for the probe, so one stuck in
                # a dead network is noticed like an unanswered probe.
                if self._in_flight:
                    core.health.probe_sent(core.clock())
                return
            conn = self._conn
            with conn.lock:
                core.send_probe(conn.pgconn)

    def _register(self, sock: int) -> None:
        _, old = self._registered
        with contextlib.suppress(KeyError, OSError, ValueError):
            self._selector.unregister(old)
        self._selector.register(sock, selectors.EVENT_READ)
        self._registered = (self._generation, sock)

    # -- durable channels (the logic is in pgcast._durable_core) ------------

    def _replay(self) -> bool:
        """Read one replay batch if a durable channel is catching up."""
        return self._run(ops.replay(self._core))

    def _replay_after_reconnect(self) -> None:
        # BATCHES_BEFORE_MARKER is looked up here, so that tests may lower it.
        self._run(ops.replay_after_reconnect(self._core, BATCHES_BEFORE_MARKER))

    def _ready_inbox(self) -> None:
        """Make the inbox fit to be handed out as it is (a NotificationManager
        does): run a replay batch if one is due, fetch referenced payloads."""
        self._run(ops.ready_inbox(self))

    def _fetch_payload(self, event: Unfetched) -> DurableEvent | None:
        """The event with its payload read from the log (None: pruned)."""
        return self._run(ops.fetch_payload(self, event))

    # -- reconnecting ------------------------------------------------------

    def add_reconnect_hook(self, hook: ReconnectHook) -> None:
        """Call ``hook(pubsub)`` after each reconnect, once every channel is
        LISTENed again and before the :class:`Reconnected` marker is queued.

        For extensions such as durable channels: the hook may run commands
        through this PubSub (it runs in the reconnecting thread, on the new
        connection) and append events to the inbox, which then come before
        the marker. A hook that raises a connection error makes the attempt
        fail and be retried; any other exception ends the reconnect and
        propagates to the thread that was reconnecting.
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable, not {type(hook).__name__}")
        self._hooks.append(hook)

    def reconnect(self) -> Reconnected:
        """Drop the connection and open a new one now (for example when a
        supervisor decided it is dead); returns the marker, which is also
        queued. Works with ``reconnect=False`` too.

        :raises ConnectionLostError: the backoff gave up.
        """
        return self._run(ops.force_reconnect(self))

    def _recover(
        self,
        exc: ConnectionLostError,
        generation: int,
        deadline: float | None = None,
        *,
        force: bool = False,
    ) -> Reconnected | None:
        """Reconnect after *exc*, seen on *generation*, unless another thread
        did meanwhile (:func:`pgcast._ops.restore`, under the reconnect lock);
        raise *exc* itself when reconnecting is off."""
        self._check_reconnect(exc, force)
        timeout = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._reconnect_lock.acquire(timeout=timeout):
            raise self._reconnect_busy(exc) from exc
        try:
            return self._run(ops.restore(self, exc, generation, deadline))
        finally:
            self._reconnecting = None
            self._reconnect_lock.release()

    def _install(self, conn: psycopg.Connection[Any]) -> None:
        self._lock = conn.lock
        self._adopt(conn)
        self._wake()  # the iterating thread waits on the old socket

    def _discard(self) -> None:
        conn = self._conn
        if conn.closed:
            return
        # A command stuck on a dead connection holds its lock: shutting the
        # socket down makes it fail at once (and release the lock) rather
        # than wait for the kernel's timeout; only then is it safe to close.
        shutdown(conn.pgconn)
        if conn.lock.acquire(timeout=DISCARD_TIMEOUT):
            try:
                with contextlib.suppress(Exception):
                    conn.close()
            finally:
                conn.lock.release()
        else:
            logger.warning("pgcast: a command on the lost connection did not end; leaving it")

    def _call_on_reconnect(self, marker: Reconnected) -> None:
        callback = self._res.on_reconnect
        if callback is None:
            return
        try:
            result = callback(marker)
            if inspect.iscoroutine(result):
                asyncio.run(result)
        except Exception:
            logger.exception("pgcast: on_reconnect failed on %r", marker)
