"""The values a listener receives: :class:`Event`, and ``None`` as an idle event."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

__all__ = ["Event"]


class Event(NamedTuple):
    """One notification, as PostgreSQL delivered it.

    Immutable and tuple-like, so ``channel, payload, pid = event`` works as in
    py-postgresql, and events compare and hash by value.
    """

    channel: str
    """The exact name of the channel the notification was sent on."""

    payload: str
    """The text sent with the notification; ``''`` when none was given."""

    pid: int
    """The server process id of the session that sent it (compare with
    :attr:`pgcast.PubSub.backend_pid` to recognise your own)."""

    def json(self) -> Any:
        """Decode the payload as JSON (as sent for a dict or list payload).

        :raises ValueError: the payload is not valid JSON.
        """
        return json.loads(self.payload)
