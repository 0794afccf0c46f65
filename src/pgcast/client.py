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
from types import TracebackType
from typing import Any, Self

import psycopg
import psycopg.conninfo

from . import diagnostics
from ._backoff import Backoff
from ._core import (
    Core,
    ExceptionHandler,
    Handler,
    Wait,
    check_timeout,
    connect_args,
    notify_many_query,
    notify_query,
    plan,
    wrap_error,
)
from ._errors import ClosedError, ConnectError, ConnectionLostError, NotSentError
from ._event import Event
from ._payload import Payload
from ._reconnect import (
    Attempt,
    OnReconnect,
    Reconnected,
    Resilience,
    Sleep,
    add_keepalives,
    reconnect_plan,
    resilience,
)

__all__ = ["PubSub", "Runner", "connect", "notify"]


logger = logging.getLogger("pgcast")

#: A reconnect hook: see :meth:`PubSub.add_reconnect_hook`.
ReconnectHook = Callable[["PubSub"], None]


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
    res = resilience(reconnect, reconnect_backoff, health_check_interval, notify_timeout,
                     on_reconnect)
    conninfo, options = connect_args(conninfo, kwargs)
    options = add_keepalives(conninfo, options, res.health_check_interval)

    def open_connection() -> psycopg.Connection[Any]:
        try:
            return psycopg.Connection.connect(conninfo, **options)
        except psycopg.Error as exc:
            raise ConnectError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc

    return PubSub(open_connection(), resilience=res, connector=open_connection)


def _connector_for(conn: psycopg.Connection[Any]) -> Callable[[], psycopg.Connection[Any]]:
    """Reconnect with what *conn* was opened with (its password included)."""
    conninfo = psycopg.conninfo.make_conninfo(conn.info.dsn, password=conn.info.password)

    def open_connection() -> psycopg.Connection[Any]:
        try:
            return psycopg.Connection.connect(conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise ConnectError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc

    return open_connection


def notify(conn: psycopg.Connection[Any], channel: str, payload: Payload = "") -> None:
    """Send a notification through an application's own psycopg connection.

    It joins the connection's current transaction, if any, so it is delivered
    when (and only if) that transaction commits: the NOTIFY goes out with the
    data change it announces.
    """
    sql, params = notify_query(channel, payload)
    conn.execute(sql, params)


class PubSub:
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
        if not conn.autocommit:
            raise ValueError("a PubSub needs a connection in autocommit mode")
        res = resilience or Resilience()
        self._res = res
        self._connector = connector or _connector_for(conn)
        self._conn = conn
        self._pgconn = conn.pgconn
        self._lock = conn.lock
        self._core = Core(res.health_check_interval)
        self._core.new_connection(conn.info.backend_pid)
        self._closed = False
        self._closing = threading.Event()
        # Bumped by every reconnect: a thread that saw the connection fail
        # under generation g reconnects only if nobody did since.
        self._generation = 0
        self._reconnect_lock = threading.Lock()
        self._reconnecting: int | None = None  # the thread reconnecting now
        self._last_marker: Reconnected | None = None
        self._hooks: list[ReconnectHook] = []
        # Commands running or about to run: the iterating thread sends no
        # probe meanwhile (libpq runs one command at a time).
        self._queries = 0
        self._queries_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._pgconn.socket, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._registered = (self._generation, self._pgconn.socket)
        # Set by a NotificationManager: called (from any thread) whenever this
        # PubSub wakes its own waiter, i.e. on events taken in off the socket
        # and on close.
        self._on_wake: Callable[[], object] | None = None
        conn.add_notify_handler(self._core.on_notify)

    # -- connection --------------------------------------------------------

    @property
    def connection(self) -> psycopg.Connection[Any]:
        """The psycopg connection underneath. Run no queries on it yourself."""
        return self._conn

    @property
    def backend_pid(self) -> int:
        """The server process id of this connection, the one :meth:`notify` uses."""
        return self._conn.info.backend_pid

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called, or the connection broke and
        ``reconnect=False`` (a reconnecting PubSub is not closed by a loss)."""
        return self._closed or (self._conn.closed and not self._res.reconnect)

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
        self._closed = True
        self._closing.set()
        self._wake()
        self._conn.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pid={self.backend_pid}"
        return f"<pgcast.PubSub {state} channels={sorted(self._core.channels)!r}>"

    # -- subscriptions -----------------------------------------------------

    def listen(self, *channels: str) -> None:
        """Start receiving notifications on *channels* (exact names).

        All names are validated before anything is sent; listening again to a
        channel already listened to does nothing.

        :raises InvalidChannelError: a name is empty, contains NUL or is over
            63 bytes in UTF-8.
        """
        if self._closed:  # even when there is nothing to send
            raise ClosedError("this PubSub is closed")
        new, sql = self._core.plan_listen(channels)
        if sql is not None:
            self._execute(sql)
            self._core.did_listen(new)

    def unlisten(self, *channels: str) -> None:
        """Stop receiving on *channels*; with no arguments, on every channel.

        Events of those channels already read but not yet handed out are
        discarded: after this returns, none arrives.
        """
        if self._closed:  # even when there is nothing to send
            raise ClosedError("this PubSub is closed")
        gone, sql = self._core.plan_unlisten(channels)
        if sql is not None:
            self._execute(sql)
            self._core.did_unlisten(gone)

    def listening_channels(self) -> frozenset[str]:
        """The exact names of the channels listened to now."""
        return frozenset(self._core.channels)

    # -- publishing --------------------------------------------------------

    def notify(self, channel: str, payload: Payload = "") -> None:
        """Send *payload* on *channel*. Dicts and lists are sent as JSON.

        Outside :meth:`transaction` it is delivered at once; inside, at commit.

        :raises PayloadTooLargeError: the payload is 8000 bytes or more in
            UTF-8. Nothing was sent and the PubSub stays usable.
        """
        sql, params = notify_query(channel, payload)
        self._execute(sql, params)

    def notify_many(self, messages: Iterable[tuple[str, Payload]]) -> None:
        """Send many ``(channel, payload)`` in one round trip and one transaction.

        Every message is checked first; one bad message means none is sent.
        As with any transaction, identical messages in one call arrive once.
        """
        query = notify_many_query(messages)
        if query is not None:
            self._execute(*query)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction: notifications sent inside are delivered at commit,
        and not at all if it rolls back (on an exception)."""
        self._check_open()
        try:
            with self._conn.transaction():
                yield
        except psycopg.Error as exc:
            raise wrap_error(exc) from exc
        finally:
            self._after_query()

    # -- receiving ---------------------------------------------------------

    def get_event(self) -> Event | None:
        """The next event, or None. Never blocks: reads only what has arrived."""
        inbox = self._core.inbox
        if not inbox:
            self._read()
        return inbox.popleft() if inbox else None

    def events(
        self,
        select_timeout: float | None = 5.0,
        yield_timeouts: bool = False,
        ignore_own: bool = False,
    ) -> Iterator[Event | None]:
        """Block and yield events as they arrive (pgpubsub's interface).

        The socket is waited on in slices of *select_timeout* seconds; with
        *yield_timeouts*, ``None`` is yielded after each slice without an
        event (a chance to send a keep-alive). *ignore_own* skips the
        notifications this PubSub sent itself. Iteration ends when the PubSub
        is closed.
        """
        timeout = check_timeout("select_timeout", select_timeout)
        if timeout == 0:
            raise ValueError("select_timeout must be > 0 (use get_event() to poll)")
        skip = self.backend_pid if ignore_own else None
        return self._drive(plan(self._core.inbox, timeout=timeout, idle=yield_timeouts,
                                skip_pid=skip))

    def wait(self, timeout: float | None = None) -> Iterator[Event | None]:
        """Yield events, and ``None`` as an idle event about every *timeout*
        seconds without one (py-postgresql's interface).

        ``timeout=None`` never idles; ``timeout=0`` yields what is pending now
        and ends. Breaking out of the loop loses nothing.
        """
        t = check_timeout("timeout", timeout)
        return self._drive(plan(self._core.inbox, timeout=t, idle=t is not None, once=t == 0))

    def _drive(
        self, steps: Iterator[Wait | Event | None], stop: threading.Event | None = None
    ) -> Iterator[Event | None]:
        self._check_open()
        for step in steps:
            if type(step) is Wait:
                if self._closed or (stop is not None and stop.is_set()):
                    return
                self._fill(step.timeout)
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

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        """Set what is called with ``(exception, event)`` when a handler fails.

        ``None`` restores the default, which logs to the ``pgcast`` logger.
        """
        self._core.exception_handler = handler

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Deliver events to the subscribed handlers until *stop* is set or
        the PubSub is closed. :meth:`run_in_thread` runs this in a thread."""
        core = self._core
        steps = plan(core.inbox, timeout=None, idle=False)
        with contextlib.ExitStack() as stack:
            loop: asyncio.Runner | None = None
            for event in self._drive(steps, stop):
                assert event is not None
                for handler in core.handlers.get(event.channel, ()):
                    try:
                        result = handler(event)
                        if core.is_async(handler):
                            if loop is None:
                                loop = stack.enter_context(asyncio.Runner())
                            loop.run(result)  # type: ignore[arg-type]
                    except Exception as exc:
                        core.handler_failed(exc, event)

    def run_in_thread(self, *, daemon: bool = True) -> Runner:
        """Deliver events to the handlers from a background thread.

        Returns a :class:`Runner`; call its ``stop()`` to end it.
        """
        self._check_open()
        runner = Runner(self, daemon=daemon)
        runner.start()
        return runner

    # -- the driver --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this PubSub is closed")
        if self._conn.closed:
            raise ConnectionLostError("the connection to PostgreSQL is closed")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._on_wake is not None:  # a NotificationManager watching us
            self._on_wake()

    def _execute(self, sql: str | bytes, params: Any = None) -> None:
        self._check_open()
        try:
            self._conn.execute(sql, params, prepare=None if params else False)
        except psycopg.Error as exc:
            raise wrap_error(exc) from exc
        finally:
            self._after_query()

    def _after_query(self) -> None:
        # Notifications that came in with the query's results are already in
        # the inbox, and libpq may hold more parsed ones; the iterating thread
        # is waiting on a socket that will not become readable for them.
        if self._closed or self._conn.closed:
            return
        with self._lock:
            self._core.take(self._pgconn)
        # Not only what take() added: psycopg's notify handler already put in
        # the inbox what came with the results, and nobody was woken for it.
        if self._core.inbox:
            self._wake()

    def _read(self) -> None:
        self._check_open()
        with self._lock:
            self._core.read(self._pgconn)

    def _fill(self, timeout: float | None) -> None:
        if timeout != 0:
            try:
                ready = self._selector.select(timeout)
            except (OSError, ValueError):  # closed by another thread meanwhile
                if self._closed:
                    return
                raise
            if not ready:
                return
            for key, _ in ready:
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
            if self._closed:
                return
        self._read()


class Runner(threading.Thread):
    """A thread delivering a PubSub's events to its handlers; see
    :meth:`PubSub.run_in_thread`."""

    def __init__(self, pubsub: PubSub, *, daemon: bool = True) -> None:
        super().__init__(name="pgcast-runner", daemon=daemon)
        self.pubsub = pubsub
        self._stop_event = threading.Event()
        self.exception: BaseException | None = None

    def run(self) -> None:
        try:
            self.pubsub.run_forever(self._stop_event)
        except ClosedError:
            pass
        except BaseException as exc:
            self.exception = exc
            raise

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop delivering and wait up to *timeout* seconds for the thread.

        :raises TimeoutError: a handler is still running after *timeout*.
        """
        self._stop_event.set()
        self.pubsub._wake()
        if threading.current_thread() is not self:
            self.join(timeout)
            if self.is_alive():
                raise TimeoutError(f"pgcast runner did not stop within {timeout} s")
