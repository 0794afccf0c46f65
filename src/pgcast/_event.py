"""The values a listener receives: :class:`Event`, and ``None`` as an idle event."""

from __future__ import annotations

import json
from typing import Any, ClassVar, NamedTuple, Self

__all__ = ["DurableEvent", "Event", "Position", "UndecodableEvent"]


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


class Position(NamedTuple):
    """A position in pgcast's log: a message id and the *epoch* of the log it
    belongs to (see :mod:`pgcast.durable`). Pass it as ``since=`` to resume
    after that message: a position from another epoch (the log was reset
    since) is announced by a :class:`pgcast.Gap` instead of resuming
    silently from a wrong place. Store both parts (``str(position)`` gives
    ``"EPOCH:ID"``, :meth:`parse` reads it back)."""

    id: int
    """The id of the last message received (0: before the first)."""

    epoch: str | None = None
    """The log's epoch the id belongs to; ``None``: unknown (not checked)."""

    def __str__(self) -> str:
        return str(self.id) if self.epoch is None else f"{self.epoch}:{self.id}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """Read ``"EPOCH:ID"`` or ``"ID"`` (what ``str()`` gives).

        :raises ValueError: anything else.
        """
        epoch, _, digits = text.rpartition(":")
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
            raise ValueError(
                f"not a log position: {text!r} (expected EPOCH:ID or ID, ID a whole number)"
            )
        return cls(int(digits), epoch or None)


class _ExtendedEvent(Event):
    """An :class:`Event` with more immutable attributes, kept in the instance
    dict out of the tuple (a tuple subclass cannot add slots), so plain
    Events stay as cheap as they were. A subclass names them in
    :attr:`_extras` (in ``__new__``'s order); two of its events are equal
    when their tuples and their :attr:`_key` are."""

    _extras: ClassVar[tuple[str, ...]]
    _key: ClassVar[str]
    _shown: ClassVar[tuple[str, ...]]  # the extras its repr shows

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        key = self._key
        if isinstance(other, type(self)) and getattr(self, key) != getattr(other, key):
            return False
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = Event.__hash__

    def __repr__(self) -> str:
        shown = "".join(f", {name}={getattr(self, name)!r}" for name in self._shown)
        return (f"{type(self).__name__}(channel={self.channel!r}, payload={self.payload!r}, "
                f"pid={self.pid!r}{shown})")

    def __reduce__(self) -> tuple[Any, ...]:
        extras = tuple(getattr(self, name) for name in self._extras)
        return (type(self), (self.channel, self.payload, self.pid, *extras))

    def _replace(self, **changes: Any) -> Self:
        fields = {"channel": self.channel, "payload": self.payload, "pid": self.pid,
                  **{name: getattr(self, name) for name in self._extras}, **changes}
        return type(self)(**fields)


class DurableEvent(_ExtendedEvent):
    """An event that went through pgcast's log: a durable message, or a
    payload too large for NOTIFY. It is an :class:`Event` in every way (a
    3-tuple: ``channel, payload, pid = event`` still works) and also carries
    :attr:`id`, its position in the log: pass it as ``since=`` to replay
    from there, or to :meth:`pgcast.PubSub.ack`. Code handling both kinds
    can ask ``getattr(event, "id", None)``.
    """

    _extras = ("id", "epoch")
    _key = "id"
    _shown = ("id",)

    id: int
    """The message's id in the log; ids grow in commit order on a channel."""

    epoch: str | None
    """The epoch of the log the id belongs to (``None``: not known, as with
    a schema older than version 2)."""

    def __new__(
        cls, channel: str, payload: str, pid: int, id: int, epoch: str | None = None
    ) -> Self:
        self = tuple.__new__(cls, (channel, payload, pid))
        self.__dict__["id"] = id
        self.__dict__["epoch"] = epoch
        return self

    @property
    def position(self) -> Position:
        """Where this message is in the log: pass it as ``since=`` to resume
        after it, checked against the log's epoch."""
        return Position(self.id, self.epoch)


class UndecodableEvent(_ExtendedEvent):
    """A notification whose payload is not valid UTF-8, delivered all the same.

    PostgreSQL checks the text of a NOTIFY against the database encoding, and
    a database in ``SQL_ASCII`` checks nothing: a session with another
    ``client_encoding`` (``LATIN1``, or ``SQL_ASCII`` itself) can send bytes
    that are not UTF-8, such as ``NOTIFY c, 'caf\xe9'`` from a Latin-1
    client. pgcast listens to such a database in ``SQL_ASCII`` (the server
    passes the bytes on as they are; asked for UTF-8 it would end the
    listening session instead), decodes every payload as UTF-8, and hands one
    that is not valid as this event: nothing is dropped and the connection
    stays as it was. A warning is logged for each (channel, pid, the bad
    byte's offset).

    It is an :class:`Event` in every way, so code that does not look for it
    keeps working: :attr:`payload` is valid text (each byte that is not
    UTF-8 became U+FFFD, the replacement character), safe to print, log,
    encode as JSON or send on. The bytes as sent are in :attr:`raw`: decode
    them with the sender's encoding (``event.raw.decode("latin-1")``).
    """

    _extras = _shown = ("raw",)
    _key = "raw"

    raw: bytes
    """The payload exactly as PostgreSQL delivered it."""

    def __new__(cls, channel: str, payload: str, pid: int, raw: bytes) -> Self:
        self = tuple.__new__(cls, (channel, payload, pid))
        self.__dict__["raw"] = raw
        return self

    @classmethod
    def from_bytes(cls, channel: str, raw: bytes, pid: int) -> Self:
        """The event for *raw*, which is not valid UTF-8."""
        return cls(channel, raw.decode("utf-8", "replace"), pid, raw)
