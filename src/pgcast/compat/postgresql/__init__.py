"""py-postgresql's notification interface on a :class:`pgcast.PubSub`.

::

    from pgcast.compat import postgresql      # was: import postgresql

    db = postgresql.open('pq://user:password@localhost:5432/app')
    db.listen('for_rabbits')
    db.notify('for_rabbits')
    for channel, payload, pid in db.iternotifies(timeout=None):
        ...

:func:`open` takes py-postgresql's PQ IRI and keywords (see
:mod:`pgcast.compat.postgresql._iri`) and pgcast's own keywords. The
:class:`Connection` it returns *is* a :class:`pgcast.PubSub` with
py-postgresql's names added: ``backend_id``, ``iternotifies()`` (and its
earlier name ``wait()``), and ``notify(*channels, **channel_and_payload)``.
``listen``, ``unlisten``, ``listening_channels``, ``close`` and ``closed``
are the PubSub's own. Only notifications: queries, prepared statements and
the rest of py-postgresql's driver are not here.

As py-postgresql, a connection is not reconnected by default: when it dies,
an ``iternotifies()`` loop ends (after the notifications already received)
and ``closed`` is True. With ``open(..., reconnect=True)`` it comes back
instead: the command that finds it dead raises
:class:`pgcast.ConnectionLostError` (it may or may not have run) and the next
one reconnects and LISTENs again; a
``pgcast.NotificationManager(db, reconnect=True)`` reconnects it and yields a
:class:`pgcast.Reconnected` marker after the gap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..._connect import RESILIENCE_KEYWORDS
from ..._event import Event
from ..._gap import Gap
from ..._payload import Payload
from ..._reconnect import Reconnected
from ...client._open import connect_as
from ...client._pubsub import PubSub
from ...manager._manager import NotificationManager
from ._iri import libpq_params

__all__ = ["Connection", "open"]


class Connection(PubSub):
    """A py-postgresql connection, for notifications: a :class:`pgcast.PubSub`
    with py-postgresql's names. Open it with :func:`open`."""

    @property
    def backend_id(self) -> int:
        """The server process id of this connection (py-postgresql's name for
        :attr:`backend_pid`): the ``pid`` of the notifications it sends."""
        return self.backend_pid

    def notify(  # type: ignore[override]
        self, *channels: str | tuple[str, Payload], **channel_and_payload: Payload
    ) -> None:
        """NOTIFY every channel, in one transaction (py-postgresql's signature).

        Each of *channels* is a channel name (no payload) or a ``(channel,
        payload)`` tuple, sent in that order; then each ``channel=payload``
        keyword. ``db.notify('a', 'b')`` notifies *two* channels, as in
        py-postgresql; use ``db.notify(('a', 'b'))`` for payload ``'b'`` on
        ``'a'``.
        """
        messages = [(c, "") if isinstance(c, str) else c for c in channels]
        self.notify_many([*messages, *channel_and_payload.items()])

    def iternotifies(
        self, timeout: float | None = None
    ) -> Iterator[Event | Reconnected | Gap | None]:
        """Yield ``(channel, payload, pid)`` triples (:class:`pgcast.Event`),
        and ``None`` as an idle event every *timeout* seconds without one.

        As py-postgresql's, it is a :class:`~pgcast.NotificationManager` on
        this connection, its pairs flattened: ``timeout=None`` never idles,
        ``0`` yields what is pending and ends; the iterator ends when the
        connection is closed or dies, after the notifications it had
        received. Break at an idle event, or keep the iterator: breaking
        while handling a notification leaves the rest of that batch in it.
        """
        with NotificationManager(self, timeout=timeout) as nm:
            for x in nm:
                if x is None:
                    yield None
                else:
                    yield from x[1]

    # The name an earlier revision of py-postgresql's documentation gives iternotifies().
    wait = iternotifies  # type: ignore[assignment]


def open(iri: str | None = None, prompt_title: object = None, **kw: Any) -> Connection:
    """Connect to the server the PQ IRI *iri* names, as ``postgresql.open()``.

    ``'pq://user:password@host:port/database?setting=value'``, or
    ``'host/database'``; keywords as py-postgresql's (``user``,
    ``database``, ``unix``, ``settings``, ...) override it, and pgcast's
    own (``reconnect`` (default False here), ``health_check_interval``,
    ``on_reconnect``, ...) are passed on. *prompt_title* is ignored, as in
    py-postgresql. Parameters neither gives come from ``PG*`` and
    ``~/.pgpass``.

    :raises ValueError: *iri* is not a PQ IRI, or starts with ``&`` (a
        connector, which pgcast does not have).
    :raises ConnectError: the server could not be reached or refused the login.
    """
    if iri is not None and iri.startswith("&"):
        raise ValueError(
            "open('&...') returns a py-postgresql connector, which pgcast does not "
            "have: call open() without '&' for each connection"
        )
    own = {k: kw.pop(k) for k in _PGCAST_KEYWORDS if k in kw}
    own.setdefault("reconnect", False)
    return connect_as(Connection, **libpq_params(iri, kw), **own)


#: :func:`pgcast.connect`'s own keywords, passed on untouched.
_PGCAST_KEYWORDS = (*RESILIENCE_KEYWORDS, "install_schema")
