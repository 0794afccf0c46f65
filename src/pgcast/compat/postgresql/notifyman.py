"""py-postgresql's ``postgresql.notifyman``: the NotificationManager.

``from postgresql.notifyman import NotificationManager`` becomes
``from pgcast.compat.postgresql.notifyman import NotificationManager``.

It is :class:`pgcast.NotificationManager` itself, which has py-postgresql's
semantics: ``NotificationManager(*connections, timeout=None)`` iterates
``(connection, [(channel, payload, pid), ...])`` pairs and ``None`` idle
events; ``timeout=None`` never idles, ``0`` yields what is pending and ends
(the manager can be iterated again); ``settimeout()``/``gettimeout()``; the
``connections`` set may change at any time, even from another thread; a
connection that dies, raises or is closed moves to ``garbage`` after what it
had received is yielded, and the iteration ends when none is left; nothing is
held in the manager during an idle event. The connections are
:func:`pgcast.compat.postgresql.open`'s (or any :class:`pgcast.PubSub`).

Not carried over: the ``trash()``/``queue()`` methods py-postgresql lets a
subclass override, and its ``incoming`` attribute.
"""

from __future__ import annotations

from ...manager._manager import NotificationManager

__all__ = ["NotificationManager"]
