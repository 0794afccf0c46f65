"""Channel names (:mod:`pgcast._channels`): exact strings, always quoted.

The pure rules are tested exhaustively and by property; two properties are
checked against the server itself: every valid name round-trips through
LISTEN / pg_notify exactly, and a quoted name is always one identifier that
the server reads back unchanged (quoting never lets a name escape into SQL).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgcast
from pgcast._channels import (
    MAX_CHANNEL_BYTES,
    check_channel,
    check_channels,
    listen_sql,
    quote_ident,
    unlisten_sql,
)

# Any text PostgreSQL can hold in an identifier: no NUL, no lone surrogates.
valid_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
valid_names = st.text(valid_chars, min_size=1, max_size=MAX_CHANNEL_BYTES).filter(
    lambda s: len(s.encode()) <= MAX_CHANNEL_BYTES
)
#: 22 characters, 66 bytes in UTF-8: short to the eye, too long for PostgreSQL.
NAME_22_CHARS_66_BYTES = "チャンネル" * 4 + "名前"
db_settings = settings(
    max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# -- validation --------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "orders",
        "Prices",
        "with space",
        'x"; DROP TABLE users; --',
        "Ω",
        "a" * 63,
        "é" * 31 + "a",  # 63 bytes
        "\N{GRINNING FACE}" * 15 + "abc",  # 63 bytes
        "'quote'",
        "semi;colon",
        "\t\n",
    ],
)
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert check_channel(name) is name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("a\x00b", "NUL"),
        ("\x00", "NUL"),
        ("a" * 64, "64 bytes"),
        ("é" * 32, "64 bytes"),
        (NAME_22_CHARS_66_BYTES, "66 bytes"),
        ("\ud800", "not valid Unicode"),
    ],
)
def test_invalid_names_raise_valueerror_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(pgcast.InvalidChannelError, match=reason) as info:
        check_channel(name)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, pgcast.PgcastError)


def test_long_name_error_names_the_limit() -> None:
    name = NAME_22_CHARS_66_BYTES
    assert len(name) == 22 and len(name.encode()) == 66
    with pytest.raises(ValueError, match=r"66 bytes in UTF-8; PostgreSQL keeps at most 63"):
        check_channel(name)


@pytest.mark.parametrize("name", [None, 1, b"bytes", ["a"]])
def test_non_strings_are_refused(name: object) -> None:
    with pytest.raises(pgcast.InvalidChannelError, match="must be a str"):
        check_channel(name)


def test_check_channels_validates_all_before_returning() -> None:
    assert check_channels(["a", "B"]) == ["a", "B"]
    with pytest.raises(pgcast.InvalidChannelError):
        check_channels(["a", "", "b"])


@given(valid_names)
def test_every_valid_name_is_accepted(name: str) -> None:
    assert check_channel(name) == name


@given(
    st.one_of(
        st.text(valid_chars, min_size=MAX_CHANNEL_BYTES + 1, max_size=200),
        # Three or four bytes per character: over the limit at 22 characters.
        st.text(
            st.characters(min_codepoint=0x800, exclude_categories=["Cs"]),
            min_size=22,
            max_size=40,
        ),
    )
)
def test_every_long_name_is_refused(name: str) -> None:
    with pytest.raises(pgcast.InvalidChannelError, match=f"{len(name.encode())} bytes"):
        check_channel(name)


@given(st.text(), st.text())
def test_every_name_with_nul_is_refused(head: str, tail: str) -> None:
    with pytest.raises(pgcast.InvalidChannelError):
        check_channel(head + "\x00" + tail)


# -- quoting -----------------------------------------------------------------


def test_quote_ident_examples() -> None:
    assert quote_ident("orders") == '"orders"'
    assert quote_ident("Prices") == '"Prices"'
    assert quote_ident('a"b') == '"a""b"'
    assert quote_ident('x"; DROP TABLE users; --') == '"x""; DROP TABLE users; --"'


QUOTED = re.compile(r'"(?:[^"]|"")*"', re.DOTALL)


@given(st.text())
def test_quoting_never_lets_a_name_escape(name: str) -> None:
    quoted = quote_ident(name)
    # One quoted identifier and nothing else: every inner quote is doubled.
    assert QUOTED.fullmatch(quoted)
    assert quoted[1:-1].replace('""', '"') == name


def test_listen_and_unlisten_sql() -> None:
    assert listen_sql(["a", 'b"c']) == b'LISTEN "a";LISTEN "b""c";'
    assert unlisten_sql(["a", "B"]) == b'UNLISTEN "a";UNLISTEN "B";'
    assert unlisten_sql(None) == b"UNLISTEN *"
    assert listen_sql(["é"]) == 'LISTEN "é";'.encode()


# -- against the server ------------------------------------------------------


@pytest.fixture(scope="module")
def db(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as connection:
        yield connection


@pytest.fixture(scope="module")
def listener(dsn: str) -> Iterator[pgcast.PubSub]:
    with pgcast.connect(dsn) as ps:
        yield ps


@db_settings
@given(valid_names)
def test_quoted_name_is_one_identifier_on_the_server(
    db: psycopg.Connection[tuple[object, ...]], name: str
) -> None:
    cur = db.execute(f"SELECT 1 AS {quote_ident(name)}".encode())
    assert cur.description is not None
    assert [c.name for c in cur.description] == [name]


@db_settings
@given(st.lists(valid_names, min_size=1, max_size=5, unique=True))
def test_listen_sql_listens_to_exactly_those_names(
    db: psycopg.Connection[tuple[object, ...]], names: list[str]
) -> None:
    try:
        db.execute(listen_sql(names))
        rows = db.execute("SELECT pg_listening_channels()").fetchall()
        assert {r[0] for r in rows} == set(names)
        db.execute(unlisten_sql(names[:1]))
        rows = db.execute("SELECT pg_listening_channels()").fetchall()
        assert {r[0] for r in rows} == set(names[1:])
    finally:
        db.execute(unlisten_sql(None))


@db_settings
@given(valid_names)
def test_any_valid_name_round_trips_through_listen_and_pg_notify(
    listener: pgcast.PubSub, db: psycopg.Connection[tuple[object, ...]], name: str
) -> None:
    listener.listen(name)
    try:
        db.execute("SELECT pg_notify(%s, 'x')", (name,))
        event = next(iter(listener.wait(timeout=10)))  # None: 10 s idle
        assert isinstance(event, pgcast.Event), f"no event within 10 s on {name!r}"
        assert event.channel == name
        assert event.payload == "x"
    finally:
        listener.unlisten(name)
