"""pgpubsub's interface on a :class:`pgcast.PubSub`.

::

    from pgcast.compat import pgpubsub      # was: import pgpubsub

    pubsub = pgpubsub.connect(user='postgres', database='test')
    pubsub.listen('test')
    pubsub.notify('test', 'message 1')
    pubsub.get_event()                      # Notify(9425, 'test', 'message 1')
    for e in pubsub.events(select_timeout=5, yield_timeouts=False):
        print(e.payload)

:func:`connect` takes what ``psycopg2.connect()`` takes (pgcast maps
psycopg2's spellings, see :func:`pgcast.connect`) and pgcast's own keywords
(``reconnect``, ``on_reconnect``, ``health_check_interval``, ...). Events are
:class:`Notify` objects, printed like psycopg2's. Underneath is a
:class:`pgcast.PubSub` (:attr:`PubSub.pubsub`), so channel names are exact
and quoted, payloads are checked before sending, half-open connections are
found by the health check, and a lost connection is reconnected: the event
stream then carries a :class:`pgcast.Reconnected` marker where notifications
may have been missed (``reconnect=False`` raises
:class:`pgcast.ConnectionLostError` instead, as pgpubsub's psycopg2 did).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, overload

from .._closing import Closing
from .._event import Event
from .._gap import Gap
from .._reconnect import Reconnected
from ..client._open import connect as _connect
from ..client._pubsub import PubSub as _PubSub

__all__ = ["Notify", "PubSub", "connect"]


class Notify:
    """A notification, as psycopg2's ``Notify`` shows it.

    ``pid``, ``channel`` and ``payload`` attributes; ``repr`` is
    ``Notify(9425, 'test', 'message 1')``; and, as psycopg2 keeps for code
    older than payloads, it is also the 2-tuple ``(pid, channel)``: it
    indexes, unpacks and compares equal to that tuple.
    """

    __slots__ = ("channel", "payload", "pid")

    pid: int
    channel: str
    payload: str

    def __init__(self, pid: int, channel: str, payload: str = "") -> None:
        object.__setattr__(self, "pid", pid)
        object.__setattr__(self, "channel", channel)
        object.__setattr__(self, "payload", payload)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Notify is immutable")

    def __repr__(self) -> str:
        return f"Notify({self.pid!r}, {self.channel!r}, {self.payload!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Notify):
            return (self.pid, self.channel, self.payload) == (
                other.pid, other.channel, other.payload)
        if isinstance(other, tuple):
            return (self.pid, self.channel) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.pid, self.channel, self.payload))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int | str:
        return (self.pid, self.channel)[index]

    def __iter__(self) -> Iterator[int | str]:
        return iter((self.pid, self.channel))


def _notify(item: Event | Reconnected | Gap | None) -> Notify | Reconnected | Gap | None:
    """pgcast's event as a :class:`Notify`; markers and idle ``None`` as they are."""
    if isinstance(item, Event):
        return Notify(item.pid, item.channel, item.payload)
    return item


class _Connection:
    """What pgpubsub users read from ``pubsub.conn``: the backend pid."""

    __slots__ = ("_pubsub",)

    def __init__(self, pubsub: _PubSub) -> None:
        self._pubsub = pubsub

    def get_backend_pid(self) -> int:
        """The server process id of the listening connection (the ``pid``
        of the notifications this PubSub sends itself); it changes when the
        connection is replaced after a loss."""
        return self._pubsub.backend_pid

    @property
    def closed(self) -> bool:
        """True once the PubSub is closed."""
        return self._pubsub.closed


class PubSub(Closing):
    """pgpubsub's ``PubSub``: listen, notify, receive :class:`Notify` events.

    Open it with :func:`connect`. The :class:`pgcast.PubSub` underneath is
    :attr:`pubsub`, for everything pgpubsub did not have.
    """

    def __init__(self, pubsub: _PubSub) -> None:
        self.pubsub = pubsub
        """The :class:`pgcast.PubSub` doing the work."""
        self.conn = _Connection(pubsub)
        """``conn.get_backend_pid()``, as on pgpubsub's psycopg2 connection."""

    def listen(self, *channels: str) -> None:
        """Subscribe to *channels* (exact names, any text: they are quoted)."""
        self.pubsub.listen(*channels)

    def unlisten(self, *channels: str) -> None:
        """Unsubscribe from *channels*; with none, from every channel."""
        self.pubsub.unlisten(*channels)

    def notify(self, channel: str, payload: str = "") -> None:
        """Send *payload* on *channel* (``pg_notify``: any channel name)."""
        self.pubsub.notify(channel, payload)

    def get_event(self) -> Notify | Reconnected | Gap | None:
        """The next event received, or None at once when there is none."""
        return _notify(self.pubsub.get_event())

    @overload
    def events(
        self, select_timeout: float = ..., yield_timeouts: Literal[False] = ...
    ) -> Iterator[Notify | Reconnected | Gap]: ...

    @overload
    def events(
        self, select_timeout: float = ..., *, yield_timeouts: Literal[True]
    ) -> Iterator[Notify | Reconnected | Gap | None]: ...

    @overload
    def events(
        self, select_timeout: float, yield_timeouts: bool
    ) -> Iterator[Notify | Reconnected | Gap | None]: ...

    def events(
        self, select_timeout: float = 5, yield_timeouts: bool = False
    ) -> Iterator[Notify | Reconnected | Gap | None]:
        """Yield events as they arrive, waiting on the socket in slices of
        *select_timeout* seconds; with *yield_timeouts*, ``None`` after each
        slice without one. Ends when the PubSub is closed."""
        if yield_timeouts:
            items = self.pubsub.events(select_timeout, yield_timeouts=True)
        else:
            items = self.pubsub.events(select_timeout)
        return map(_notify, items)

    def close(self) -> None:
        """Close the connection (pgpubsub left that to the psycopg2 connection)."""
        self.pubsub.close()

    def __repr__(self) -> str:
        return f"<pgcast.compat.pgpubsub.PubSub {self.pubsub!r}>"


def connect(*args: Any, **kwargs: Any) -> PubSub:
    """Open a :class:`PubSub`: ``psycopg2.connect()``'s arguments (a DSN,
    ``database=``, ``user=``, ...), plus :func:`pgcast.connect`'s keywords."""
    return PubSub(_connect(*args, **kwargs))
