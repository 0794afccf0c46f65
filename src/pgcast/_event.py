"""The values a listener receives: :class:`Event`, and ``None`` as an idle event."""

from __future__ import annotations

import json
from typing import Any, NamedTuple, Self

__all__ = ["DurableEvent", "Event"]


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


class DurableEvent(Event):
    """An event that went through pgcast's log: a durable message, or a
    payload too large for NOTIFY. It is an :class:`Event` in every way (a
    3-tuple: ``channel, payload, pid = event`` still works) and also carries
    :attr:`id`, its position in the log: pass it as ``since=`` to replay
    from there, or to :meth:`pgcast.PubSub.ack`. Code handling both kinds
    can ask ``getattr(event, "id", None)``.
    """

    # A tuple subclass cannot add slots, so ``id`` lives in the instance
    # dict, kept out of the tuple: plain Events stay as cheap as they were.
    id: int
    """The message's id in the log; ids grow in commit order on a channel."""

    def __new__(cls, channel: str, payload: str, pid: int, id: int) -> Self:
        self = tuple.__new__(cls, (channel, payload, pid))
        self.__dict__["id"] = id
        return self

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DurableEvent) and self.id != other.id:
            return False
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = Event.__hash__

    def __repr__(self) -> str:
        return (
            f"DurableEvent(channel={self.channel!r}, payload={self.payload!r}, "
            f"pid={self.pid!r}, id={self.id!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.channel, self.payload, self.pid, self.id))

    def _replace(self, **changes: Any) -> Self:
        fields = {"channel": self.channel, "payload": self.payload, "pid": self.pid,
                  "id": self.id, **changes}
        return type(self)(**fields)
