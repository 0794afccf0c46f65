"""Payloads (:mod:`pgcast._payload`): what NOTIFY can carry, checked before sending.

The pure rules are tested exhaustively and by property; the limit itself is
checked against the server: what pgcast accepts, PostgreSQL delivers
unchanged, and what pgcast refuses for size, PostgreSQL refuses too.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgcast
from _eventwait import collect
from pgcast._payload import MAX_PAYLOAD_BYTES, encode_payload, payload_size, to_text

text_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
db_settings = settings(
    max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def test_limit_is_postgresql_s() -> None:
    assert MAX_PAYLOAD_BYTES == pgcast.MAX_PAYLOAD_BYTES == 8000


# -- conversion ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        ("", ""),
        (None, ""),
        ("shipped 42", "shipped 42"),
        ("ünïcödé ✓", "ünïcödé ✓"),
        ({"id": 42, "state": "shipped"}, '{"id":42,"state":"shipped"}'),
        ([1, "two", None, True], '[1,"two",null,true]'),
        ((1, 2), "[1,2]"),
        ({"é": "✓"}, '{"é":"✓"}'),  # compact and not ASCII-escaped: fewer bytes
        ({}, "{}"),
        ([], "[]"),
    ],
)
def test_payload_to_text(payload: pgcast.Payload, text: str) -> None:
    assert to_text(payload) == text
    assert encode_payload(payload) == text


@pytest.mark.parametrize("payload", [b"bytes", 42, 4.2, object(), {1, 2}])
def test_other_types_are_refused(payload: object) -> None:
    with pytest.raises(pgcast.PayloadError, match="must be a str, or a dict or list"):
        encode_payload(payload)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payload", [{"x": object()}, [math.nan], {"x": math.inf}, {(1, 2): "tuple key"}]
)
def test_unencodable_json_is_refused(payload: pgcast.Payload) -> None:
    # NaN and Infinity are not JSON: another consumer's JSON.parse would choke.
    with pytest.raises(pgcast.PayloadError, match="cannot be encoded as JSON"):
        encode_payload(payload)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(text_chars, max_size=20),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.text(text_chars, max_size=8), inner, max_size=4),
        max_leaves=20,
    )
)
def test_json_payloads_round_trip_through_event_json(value: object) -> None:
    payload = {"v": value}
    event = pgcast.Event("c", encode_payload(payload), 1)
    assert event.json() == payload


# -- the limit -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("a" * 7999, True),
        ("a" * 8000, False),
        ("a" * 100_000, False),
        ("é" * 3999 + "a", True),  # 7999 bytes
        ("é" * 4000, False),  # 8000 bytes, 4000 characters
        ("€" * 2666 + "a", True),  # 7999 bytes
        ("€" * 2666 + "é", False),  # 8000 bytes
        ("\N{GRINNING FACE}" * 1999 + "abc", True),  # 7999 bytes
        ("\N{GRINNING FACE}" * 2000, False),  # 8000 bytes
    ],
)
def test_limit_is_counted_in_utf8_bytes(text: str, ok: bool) -> None:
    size = len(text.encode())
    if ok:
        assert encode_payload(text) == text
        return
    with pytest.raises(pgcast.PayloadTooLargeError) as info:
        encode_payload(text)
    exc = info.value
    assert (exc.size, exc.limit) == (size, 8000)
    assert f"{size} bytes" in str(exc) and "8000" in str(exc)
    assert isinstance(exc, pgcast.PayloadError) and isinstance(exc, ValueError)


def test_json_payload_is_measured_as_sent() -> None:
    with pytest.raises(pgcast.PayloadTooLargeError, match="8008 bytes"):
        encode_payload({"k": "x" * 8000})  # {"k":"..."} adds 8 bytes


@pytest.mark.parametrize("payload", ["\x00", "a\x00b", "a" * 9000 + "\x00"])
def test_nul_is_refused(payload: pgcast.Payload) -> None:
    with pytest.raises(pgcast.PayloadError, match="NUL"):
        encode_payload(payload)


def test_nul_inside_json_is_escaped_not_refused() -> None:
    text = encode_payload({"k": "a\x00"})
    assert text == '{"k":"a\\u0000"}'
    assert pgcast.Event("c", text, 1).json() == {"k": "a\x00"}


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(pgcast.PayloadError, match="not valid Unicode"):
        encode_payload("a\ud800")


@given(st.text(text_chars, max_size=3000))
def test_accepted_iff_under_the_limit(text: str) -> None:
    size = payload_size(text)
    assert size == len(text.encode("utf-8"))
    if size < MAX_PAYLOAD_BYTES:
        assert encode_payload(text) == text
    else:
        with pytest.raises(pgcast.PayloadTooLargeError):
            encode_payload(text)


@given(st.text(text_chars, min_size=1, max_size=200), st.integers(1, 9000))
def test_custom_limit(text: str, limit: int) -> None:
    size = payload_size(text)
    if size < limit:
        assert encode_payload(text, limit) == text
    else:
        with pytest.raises(pgcast.PayloadTooLargeError) as info:
            encode_payload(text, limit)
        assert (info.value.size, info.value.limit) == (size, limit)


# -- against the server --------------------------------------------------------


@pytest.fixture(scope="module")
def db(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as connection:
        yield connection


@pytest.fixture(scope="module")
def listener(dsn: str) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as ps:
        ps.listen("payload_tests")
        yield ps


@db_settings
@given(st.text(text_chars, max_size=2000))
def test_any_accepted_payload_arrives_unchanged(
    listener: pgcast.PubSub, db: psycopg.Connection[tuple[object, ...]], text: str
) -> None:
    pgcast.notify(db, "payload_tests", text)
    [event] = collect(listener, 1)
    assert event.payload == text


@pytest.mark.parametrize("text", ["é" * 3999 + "a", "\N{GRINNING FACE}" * 1999 + "abc"])
def test_largest_payload_postgresql_accepts_is_accepted(
    listener: pgcast.PubSub, db: psycopg.Connection[tuple[object, ...]], text: str
) -> None:
    assert len(text.encode()) == 7999
    pgcast.notify(db, "payload_tests", text)
    [event] = collect(listener, 1)
    assert event.payload == text


@pytest.mark.parametrize("text", ["é" * 4000, "a" * 8000])
def test_postgresql_refuses_what_pgcast_refuses(
    db: psycopg.Connection[tuple[object, ...]], text: str
) -> None:
    # The check is not stricter than needed: the server refuses it too.
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="payload string too long"):
        db.execute("SELECT pg_notify('payload_tests', %s)", (text,))
    with pytest.raises(pgcast.PayloadTooLargeError):
        encode_payload(text)


def test_json_round_trip_through_the_server(
    listener: pgcast.PubSub, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    value = {"order": 42, "items": ["tea", "ünïcödé"], "paid": True, "note": None}
    pgcast.notify(db, "payload_tests", value)
    [event] = collect(listener, 1)
    assert event.json() == value
    assert json.loads(event.payload) == value


@pytest.mark.parametrize("kind", [list, dict])
def test_a_payload_nested_too_deeply_is_a_payload_error(kind: type) -> None:
    """Not a RecursionError from deep inside json: the error says what and the limit."""
    payload: Any = []
    for _ in range(sys.getrecursionlimit() + 100):
        payload = [payload] if kind is list else {"a": payload}
    with pytest.raises(pgcast.PayloadError, match="recursion limit"):
        encode_payload(payload)
