"""What a table change feed is and what its events say: :class:`Feed` (one
feed, as :func:`~pgcast.feeds.triggers.watch_table` installed it) and
:class:`Change` (one event decoded). Plain values, no I/O; the events' JSON
is described in :mod:`pgcast.feeds.triggers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from .._event import Event

__all__ = ["Change", "Feed"]


class Feed(NamedTuple):
    """One change feed: a table, the channel its changes go to, and how."""

    schema: str
    """The table's schema, as stored (not quoted)."""
    table: str
    """The table's name, as stored (not quoted)."""
    channel: str
    """The channel the events are sent on."""
    per: Literal["row", "statement"]
    """One event per changed row, or one (or a few) per statement."""
    operations: tuple[str, ...]
    """The operations announced, among :data:`OPERATIONS`."""
    key: tuple[str, ...] | None
    """The key columns, or None for a table with no usable key."""
    columns: tuple[str, ...] | None
    """The columns sent in ``row`` and ``old``; None for all."""


@dataclass(frozen=True, slots=True)
class Change:
    """A change event decoded: what :func:`watch_table`'s triggers send.

    :meth:`keys` gives the changed keys in both modes, so a handler needs not
    care which mode the feed uses.
    """

    op: str
    """``INSERT``, ``UPDATE``, ``DELETE`` or ``TRUNCATE``."""
    schema: str
    """The table's schema."""
    table: str
    """The table's name."""
    txid: int
    """The id of the transaction that made the change."""
    key: dict[str, Any] | None = None
    """Row mode: the changed row's key (None: the table has no key, or too big)."""
    row: dict[str, Any] | None = None
    """Row mode: the new row (the deleted one for DELETE); None when truncated."""
    old: dict[str, Any] | None = None
    """Row mode, UPDATE: the old values of the changed columns."""
    statement_keys: list[dict[str, Any]] | None = None
    """Statement mode: this part's keys (None: no key, too many, or TRUNCATE)."""
    count: int | None = None
    """Statement mode: the number of rows the statement changed."""
    part: int = 1
    """Statement mode: which of the statement's notifications this is, from 1."""
    parts: int = 1
    """Statement mode: how many notifications the statement sent."""
    truncated: bool = False
    """Too big for NOTIFY: ``row``/``old`` (or the keys) were left out."""

    @classmethod
    def from_event(cls, event: Event) -> Change:
        """Decode *event*'s payload.

        :raises ValueError: the payload is not a change event.
        """
        try:
            data = event.json()
            return cls(
                op=data["op"],
                schema=data["schema"],
                table=data["table"],
                txid=int(data["txid"]),
                key=data.get("key"),
                row=data.get("row"),
                old=data.get("old"),
                statement_keys=data.get("keys"),
                count=data.get("count"),
                part=data.get("part", 1),
                parts=data.get("parts", 1),
                truncated=bool(data.get("truncated", False)),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(
                f"not a pgcast change event on {event.channel!r}: {event.payload[:80]!r}"
            ) from exc

    def keys(self) -> list[dict[str, Any]] | None:
        """The keys this event names; None when it names none (no key,
        truncated statement, TRUNCATE), meaning "assume anything changed"."""
        if self.statement_keys is not None:
            return self.statement_keys
        if self.key is not None:
            return [self.key]
        return None
