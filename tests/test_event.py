"""The Event value (:mod:`pgcast._event`): immutable, tuple-like, ``json()``."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

import pgcast
from pgcast import Event


def test_fields_and_unpacking() -> None:
    event = Event("orders", "shipped 42", 1234)
    assert (event.channel, event.payload, event.pid) == ("orders", "shipped 42", 1234)
    channel, payload, pid = event  # as in py-postgresql
    assert (channel, payload, pid) == ("orders", "shipped 42", 1234)
    assert event == ("orders", "shipped 42", 1234)
    assert event[0] == "orders" and event[2] == 1234
    assert len(event) == 3
    assert Event._fields == ("channel", "payload", "pid")


def test_immutable() -> None:
    event = Event("a", "b", 1)
    with pytest.raises(AttributeError):
        event.payload = "c"  # type: ignore[misc]
    assert not dataclasses.is_dataclass(event)


def test_value_semantics() -> None:
    assert Event("a", "b", 1) == Event("a", "b", 1)
    assert Event("a", "b", 1) != Event("a", "b", 2)
    assert len({Event("a", "b", 1), Event("a", "b", 1), Event("A", "b", 1)}) == 2
    assert pickle.loads(pickle.dumps(Event("a", "b", 1))) == Event("a", "b", 1)
    assert repr(Event("a", "b", 1)) == "Event(channel='a', payload='b', pid=1)"


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        ('{"id":42}', {"id": 42}),
        ("[1,2]", [1, 2]),
        ('"s"', "s"),
        ("3", 3),
        ("null", None),
    ],
)
def test_json(payload: str, value: object) -> None:
    assert Event("c", payload, 1).json() == value


@pytest.mark.parametrize("payload", ["", "not json", "{"])
def test_json_of_non_json_raises_valueerror(payload: str) -> None:
    with pytest.raises(ValueError):
        Event("c", payload, 1).json()


def test_public_names() -> None:
    assert pgcast.Event is Event
    assert len(set(pgcast.__all__)) == len(pgcast.__all__)
    for name in pgcast.__all__:
        assert hasattr(pgcast, name), name
    for name in ("channel", "payload", "pid", "json"):
        assert getattr(Event, name).__doc__, name


def test_undecodable_event_keeps_the_bytes_and_is_an_event() -> None:
    raw = b"caf\xe9 \xff"
    e = pgcast.UndecodableEvent.from_bytes("c", raw, 7)
    assert isinstance(e, Event) and e.raw == raw
    assert tuple(e) == ("c", "caf\ufffd \ufffd", 7)  # valid text: printable, JSON-able
    e.payload.encode("utf-8")
    assert e.raw.decode("latin-1") == "café ÿ"
    assert e == pgcast.UndecodableEvent("c", "caf\ufffd \ufffd", 7, raw)
    # Other bytes with the same replacement are a different event.
    assert e != pgcast.UndecodableEvent.from_bytes("c", b"caf\xe8 \xfe", 7)
    assert hash(e) == hash(Event(*e))
    assert pickle.loads(pickle.dumps(e)) == e and pickle.loads(pickle.dumps(e)).raw == raw
    assert e._replace(pid=8).raw == raw and e._replace(pid=8).pid == 8
    assert "raw=b'caf\\xe9 \\xff'" in repr(e)
    with pytest.raises(AttributeError, match="immutable"):
        e.raw = b""  # type: ignore[misc]
    assert pgcast.UndecodableEvent.__doc__ and "SQL_ASCII" in pgcast.UndecodableEvent.__doc__
