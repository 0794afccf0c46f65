"""The structured fields (``extra=``) of pgcast's log records, built in one place.

A handler that formats records as JSON (or a log pipeline that indexes them)
finds the same names on every record of a kind: ``channel`` and ``pid`` (the
sender's backend) on a record about an event; ``pid`` (the session's backend)
and ``channels`` (sorted) on a record about a connection lost or restored.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._event import Event

__all__ = ["connection_fields", "event_fields"]


def event_fields(event: Event) -> dict[str, object]:
    """The fields of a record about *event*: ``channel`` and ``pid``."""
    return {"channel": event.channel, "pid": event.pid}


def connection_fields(pid: int | None, channels: Iterable[str]) -> dict[str, object]:
    """The fields of a record about a connection: ``pid`` and ``channels``."""
    return {"pid": pid, "channels": sorted(channels)}
