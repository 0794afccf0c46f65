"""The sync PubSub: one PostgreSQL connection that listens and notifies.

:func:`connect` opens a :class:`PubSub`; :func:`notify` sends through an
application's own psycopg connection, inside its transaction. The code is in
:mod:`pgcast.client._pubsub` and :mod:`pgcast.client._session`, generated from their
asyncio sources (``_pubsub_async.py``, ``_session_async.py``) by
``tools/async_to_sync.py``; :mod:`pgcast.aio` is the asyncio flavour.
"""

from __future__ import annotations

from ._open import connect, notify
from ._pubsub import PubSub, ReconnectHook
from ._runner import Runner

__all__ = ["PubSub", "ReconnectHook", "Runner", "connect", "notify"]
