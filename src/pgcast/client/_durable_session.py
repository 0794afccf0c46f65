# Generated from src/pgcast/client/_durable_session_async.py by tools/async_to_sync.py: do not edit.
# Edit the source, then run `python tools/async_to_sync.py`.
# ruff: noqa: E501
"""Durable channels on a PubSub's connection: the log's queries run as
commands, the replay after a listen or a reconnect, payloads fetched from the
log. The logic is :mod:`pgcast.durable._core`'s (steps that yield queries,
see :data:`pgcast.durable._schema.Steps`); here they are run.

Written for asyncio (``_durable_session_async.py``); the sync twin is
generated from it by ``tools/async_to_sync.py``.
"""

from __future__ import annotations

import logging
from typing import TypeVar

from .._errors import ConnectionLostError, DatabaseError, PgcastError
from .._event import DurableEvent
from .._flavour import resolve
from .._gap import Gap
from ..durable import _core as _durable_core
from ..durable import schema_error
from ..durable._core import Unfetched
from ..durable._run import drive
from ..durable._schema import LATEST_VERSION, Query, Rows, Steps, check_steps, install_steps
from ._session import Session

__all__ = ["DurableSession", "query_steps"]

T = TypeVar("T")

logger = logging.getLogger("pgcast")


def query_steps(query: Query) -> Steps[Rows]:
    rows = yield query
    return rows


class DurableSession(Session):
    """A session that runs durable steps (see the module docstring)."""

    def _durable(self, steps: Steps[T]) -> T:
        """Run *steps* (queries as a generator, see
        :data:`pgcast.durable._schema.Steps`) as commands, the ``pgcast``
        schema checked first (installed if missing only when the PubSub was
        opened with ``install_schema=True``)."""
        core = self._core
        durable = core.durable
        if not durable.schema_ready:
            try:
                if self._install_schema:  # asked for: connect(install_schema=True)
                    with self.transaction():
                        drive(install_steps(), self._fetch)
                    durable.version = LATEST_VERSION
                else:  # no DDL unless asked: check only (an older one is used)
                    durable.version = drive(check_steps(), self._fetch)
            except PgcastError as exc:
                raise schema_error(exc) from exc
            durable.schema_ready = True
        before = len(core.inbox)
        try:
            result = drive(steps, self._fetch)
        finally:
            if durable.gaps:
                self._gaps_found()
        if len(core.inbox) > before:
            self._wake()  # another thread or task may be iterating
        return result

    def _gaps_found(self) -> None:
        """Pass the gaps a replay put in the inbox to ``on_gap``."""
        durable = self._core.durable
        gaps, durable.gaps = (durable.gaps, [])
        callback = self._res.on_gap
        for gap in gaps:
            logger.warning(
                "pgcast: durable channel %r resumed from %d with a gap (%s): messages after it are no longer in the log (oldest still there: %s)",
                gap.channel,
                gap.since,
                gap.reason,
                gap.oldest,
            )
            if callback is not None:
                try:
                    resolve(callback(gap))
                except Exception:
                    logger.exception("pgcast: on_gap failed on %r", gap)

    def _replay(self) -> bool:
        """Read one replay batch if a durable channel is catching up."""
        durable = self._core.durable
        if not durable.pending:
            return False
        self._durable(durable.replay_steps())
        return True

    def _after_reconnect(self) -> None:
        # A reconnect hook: every channel is LISTENed again; what was missed
        # meanwhile is read now (a few batches at most), so that it comes
        # before the marker (Core.new_connection set the replay going).
        for _ in range(_durable_core.BATCHES_BEFORE_MARKER):
            if not self._replay():
                break

    def _fetch_payload(self, event: Unfetched) -> DurableEvent | Gap | None:
        """The event with its payload read from the log (a :class:`Gap` or
        None: pruned meanwhile); a lost connection is restored and the read
        tried again.

        On a channel not listened to durably, a log that cannot be read (no
        ``pgcast`` schema, no privilege) skips the event with a warning:
        anyone who may NOTIFY can send a reference payload, and one such
        NOTIFY ended the iteration for every channel (the gateway's LISTEN
        loop reconnected, and its clients missed what came meanwhile)."""
        while True:  # ends: _recover gives up or the read succeeds
            generation = self._generation
            try:
                result: DurableEvent | Gap | None = self._durable(
                    self._core.durable.fetch_or_gap_steps(event)
                )
                return result
            except ConnectionLostError as exc:
                self._check_open(lost_ok=True)
                self._recover(exc, generation)
            except DatabaseError as exc:
                if event.channel in self._core.durable.streams:
                    raise
                logger.warning(
                    "pgcast: message %d on %r names the log, which cannot be read (%s); skipped (a reference payload not sent by pgcast?)",
                    event.id,
                    event.channel,
                    exc,
                )
                return None
