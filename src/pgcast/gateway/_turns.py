"""Whose replay query runs next on the gateway's one replay connection.

Every resume reads the log through the hub's one query connection (see
:class:`~pgcast.gateway._database.QueryConnection`), one query at a time.
Served first come, first served, a client resuming one channel waited, at
each of its few queries, behind one query of every other client resuming:
200 clients each resuming 50 channels of a long log delayed one honest
resume of 100 messages by 3.6 s, 1,000 of them by 34 s.

So the waiting queries are served *least served client first*: each
client counts the rows its replay queries read (:attr:`Served.replay_rows`,
at least one a query), and the waiting query of the client with the lowest
count goes next (ties: first come). A resume of a few messages therefore passes the long ones,
which still share the connection evenly between them; no client can keep a
short one waiting by resuming more.

A query waits for its turn at most ``replay_wait`` seconds; then it fails
with :class:`ReplayBusy` naming that setting, and the hub undoes the
subscription as for any failed replay (nothing changes, nothing is lost:
the client subscribes again later from the same position).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator
from typing import Protocol

from .._errors import PgcastError

__all__ = ["ReplayBusy", "Served", "Turns"]


class ReplayBusy(PgcastError):
    """A replay query got no turn on the replay connection within ``replay_wait``."""


class Served(Protocol):
    """Whom a replay query is for: the rows its replay queries read so far."""

    replay_rows: int


class Turns:
    """One holder at a time; the waiter of the least served client next."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @property
    def waiting(self) -> int:
        """Queries waiting for their turn (some may have given up already)."""
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def turn(self, who: Served | None, wait: float) -> AsyncIterator[None]:
        """Hold the connection (the caller adds the rows read to *who*).

        :raises ReplayBusy: no turn within *wait* seconds.
        """
        if self._busy or self._waiting:
            await self._queue(0 if who is None else who.replay_rows, wait)
        else:
            self._busy = True
        try:
            yield
        finally:
            self._next()

    async def _queue(self, served: int, wait: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (served, next(self._arrival), future))
        try:
            async with asyncio.timeout(wait):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                self._next()  # handed the turn as it gave up: pass it on
            else:
                future.cancel()  # skipped by _next
            if isinstance(exc, TimeoutError):
                raise ReplayBusy(
                    f"the replay connection is busy with other resumes: no turn within "
                    f"{wait:g} s (replay_wait, pgcast serve --replay-wait)"
                ) from None
            raise

    def _next(self) -> None:
        """Hand the connection to the next waiter still waiting, else free it."""
        while self._waiting:
            future = heapq.heappop(self._waiting)[2]
            if not future.done():
                future.set_result(None)
                return
        self._busy = False
