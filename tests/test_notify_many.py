"""pgcast._notify_many: the array literals and the fast batch check, pure and
against PostgreSQL's own array parser."""

from __future__ import annotations

from typing import NamedTuple

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgcast
from pgcast._notify_many import (
    NOTIFY_MANY_ONE_CHANNEL_SQL,
    NOTIFY_MANY_SQL,
    message_pairs,
    notify_many_params,
    plain_messages,
    text_array,
)
from pgcast._payload import MAX_PAYLOAD_BYTES

# Any text PostgreSQL can hold: no NUL, no lone surrogates.
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@pytest.mark.parametrize(
    "items",
    [
        [],
        [""],
        ["NULL", "null"],
        ["a,b", "{x}", " spaced ", "\t\n"],
        ['q"uote', "back\\slash", '\\"', '"', "\\", "'"],
        ["é ü 日本 🎉"],
    ],
)
def test_text_array_is_parsed_back_exactly(
    conn: psycopg.Connection[tuple[object, ...]], items: list[str]
) -> None:
    row = conn.execute("SELECT %s::text[]", (text_array(items),)).fetchone()
    assert row == (items,)


@given(items=st.lists(texts, max_size=20))
def test_text_array_round_trips_any_text(dsn: str, items: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT %s::text[]", (text_array(items),)).fetchone()
    assert row == (items,)


def test_one_channel_sends_one_array() -> None:
    assert notify_many_params(["c", "c"], ["1", "2"]) == (
        NOTIFY_MANY_ONE_CHANNEL_SQL,
        ("c", '{"1","2"}'),
    )
    assert notify_many_params(["c", "d"], ["1", "2"]) == (
        NOTIFY_MANY_SQL,
        ('{"c","d"}', '{"1","2"}'),
    )


class _Pair(NamedTuple):
    channel: str
    payload: str


def test_message_pairs_checks_every_shape_on_the_fast_path_too() -> None:
    # A list of tuples is checked with C-level loops; anything else one by one.
    batch = [("c", str(i)) for i in range(10)]
    pairs = message_pairs(batch)
    assert pairs == batch and pairs is not batch  # a copy: the caller may change theirs
    assert message_pairs([]) == []
    assert message_pairs([["c", "1"], ("d", "2"), _Pair("e", "3")]) == [
        ("c", "1"), ("d", "2"), ("e", "3")
    ]
    assert message_pairs(iter(batch)) == batch
    for bad, shape in [
        (("c", "x", "y"), "a tuple of 3"),
        (("c",), "a tuple of 1"),
        ("ab", "a str"),  # two characters are not a pair
        (["c", "x", "y"], "a list of 3"),
    ]:
        expected = rf"message 5 must be a \(channel, payload\) pair, not {shape}"
        with pytest.raises(TypeError, match=expected):
            message_pairs([*batch[:5], bad, *batch[5:]])


def test_a_bad_shape_among_many_sends_nothing(dsn: str, unique_channel: str) -> None:
    with pgcast.connect(dsn) as ps:
        ps.listen(unique_channel)
        batch = [(unique_channel, str(i)) for i in range(100)]
        with pytest.raises(TypeError, match="message 100 must be"):
            ps.notify_many([*batch, (unique_channel, "x", "y")])
        ps.notify(unique_channel, "after")  # nothing of the bad batch came before it
        event = next(iter(ps.wait(5.0)))
        assert event is not None and (event.channel, event.payload) == (unique_channel, "after")


def test_plain_messages_takes_only_what_needs_no_care() -> None:
    assert plain_messages([("c", "1"), ("d", "")]) == (["c", "d"], ["1", ""])
    for payloads in (
        [{"k": 1}],  # JSON
        ["é"],  # not ASCII: len() is not the size
        ["x" * 8000],  # over the limit (the log may take it)
        ["ok", "\x1eref"],  # looks like a durable reference
        ["nul\x00"],  # refused later, by the careful path
        [None],
    ):
        assert plain_messages([("c", p) for p in payloads]) is None, payloads
    with pytest.raises(pgcast.InvalidChannelError, match="empty"):
        plain_messages([("c", "1"), ("", "2")])
    with pytest.raises(pgcast.InvalidChannelError, match="must be a str"):
        plain_messages([(["unhashable"], "1")])  # type: ignore[list-item]
    # The shortcuts: a \x1e inside, large payloads each under the limit,
    # a bad channel after many of one channel, an unhashable one not first.
    assert plain_messages([("c", "a\x1eb"), ("c", "\x1f")]) == (["c", "c"], ["a\x1eb", "\x1f"])
    under = ["x" * (MAX_PAYLOAD_BYTES - 1), "y" * (MAX_PAYLOAD_BYTES - 1)]
    assert plain_messages([("c", p) for p in under]) == (["c", "c"], under)
    assert plain_messages([("c", "1"), ("c", "x" * MAX_PAYLOAD_BYTES)]) is None
    with pytest.raises(pgcast.InvalidChannelError, match="empty"):
        plain_messages([("c", "1"), ("c", "2"), ("", "3")])
    with pytest.raises(pgcast.InvalidChannelError, match="must be a str"):
        plain_messages([("c", "1"), (["unhashable"], "2")])  # type: ignore[list-item]


def test_notify_many_delivers_awkward_payloads_in_order(dsn: str, unique_channel: str) -> None:
    other = unique_channel + "_b"
    awkward = ["", "NULL", "a,b", "{x}", 'q"uote', "back\\slash", '\\"', "é 日本", "x" * 7999]
    messages = [(unique_channel, p) for p in awkward]
    mixed = [(other if i % 2 else unique_channel, p) for i, p in enumerate(awkward)]
    with pgcast.connect(dsn) as listener, pgcast.connect(dsn) as sender:
        listener.listen(unique_channel, other)
        sender.notify_many(messages)
        sender.notify_many(mixed)
        got = []
        for event in listener.wait(5.0):
            if event is None:
                break
            got.append((event.channel, event.payload))
            if len(got) == len(messages) + len(mixed):
                break
    assert got == messages + mixed
