"""Durable channels without I/O (:mod:`pgcast.durable._core`, :mod:`pgcast.durable._schema`).

Reference payloads, what needs the log, durations, prune arguments,
:class:`pgcast.DurableEvent`, and the replay/live switch-over as a model
checked by hypothesis over every interleaving of commits, notifications and
replay queries. Pure code: no flavour, no server. What runs against
PostgreSQL is in tests/test_aio_durable.py (both flavours), the CLI in
tests/test_durable_cli.py.
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pgcast
from pgcast.durable._core import (
    INLINE_LIMIT,
    REF_PREFIX,
    REPLAY_SQL,
    DurableState,
    Unfetched,
    needs_log,
    parse_ref,
    publish_many_query,
    publish_query,
    ref_payload,
)
from pgcast.durable._schema import (
    LATEST_VERSION,
    MIGRATIONS,
    parse_duration,
    prune_query,
)

text_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


def ids(events: list[Any]) -> list[int]:
    return [e.id for e in events]


# -- reference payloads (pure) --------------------------------------------------------------


@given(st.integers(0, 2**63 - 1), st.text(text_chars) | st.none())
def test_ref_payload_round_trips(id: int, payload: str | None) -> None:
    assert parse_ref(ref_payload(id, payload)) == (id, payload)


@pytest.mark.parametrize(
    "text",
    ["", "hello", "pgcast:12", "\x1epgcast:", "\x1epgcast:x", "\x1epgcast:12x",
     "\x1epgcast:" + "9" * 20, "\x1eother"],
)
def test_other_texts_are_not_references(text: str) -> None:
    assert parse_ref(text) is None


def test_reference_payloads_fit_in_notify() -> None:
    # The longest id and the longest inline payload still fit under 8000 bytes.
    longest = ref_payload(2**63 - 1, "x" * (INLINE_LIMIT - 1))
    assert len(longest.encode()) < pgcast.MAX_PAYLOAD_BYTES
    assert REF_PREFIX.startswith("\x1e")


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        ("a" * 7999, False),
        ("a" * 8000, True),
        ("é" * 3999 + "a", False),  # 7999 bytes
        ("é" * 4000, True),  # 8000 bytes, 4000 characters
        ("€" * 2666 + "a", False),  # 7999 bytes
        ("€" * 2666 + "é", True),  # 8000 bytes
        ("\N{GRINNING FACE}" * 1999 + "abc", False),  # 7999 bytes
        ("\N{GRINNING FACE}" * 2000, True),  # 8000 bytes
        ("\x1e", True),  # would look like a reference: through the log
        ("\x1epgcast:1:x", True),
        ("x\x1e", False),
    ],
)
def test_what_needs_the_log_is_counted_in_utf8_bytes(text: str, logged: bool) -> None:
    assert needs_log(text) is logged
    (_, params), via_log = publish_query("c", text, durable=False)
    assert via_log is logged
    assert params is not None and text in params


@given(st.text(text_chars, max_size=3000))
def test_needs_log_agrees_with_the_byte_size(text: str) -> None:
    expected = len(text.encode()) >= 8000 or text.startswith("\x1e")
    assert needs_log(text) is expected


def test_publish_queries() -> None:
    (sql_text, params), logged = publish_query("c", {"a": 1}, durable=True)
    assert logged and "pgcast.notify" in sql_text and params == ("c", '{"a":1}', True)
    (sql_text, params), logged = publish_query("c", "x", durable=False)
    assert not logged and "pg_notify" in sql_text
    planned = publish_many_query([("a", "1"), ("b", "2")], durable=False)
    assert planned is not None and not planned[1]
    planned = publish_many_query([("a", "1"), ("b", "x" * 9000)], durable=False)
    assert planned is not None and planned[1]  # one large message: all through the function
    assert publish_many_query([], durable=True) is None
    with pytest.raises(pgcast.PayloadError, match="NUL"):
        publish_query("c", "a\x00b", durable=True)
    with pytest.raises(pgcast.PayloadError, match="NUL"):
        publish_many_query([("c", "ok"), ("c", "\x00")], durable=True)
    with pytest.raises(pgcast.InvalidChannelError):
        publish_query("", "x", durable=True)
    for durable in (False, True):
        with pytest.raises(pgcast.PayloadError, match="not valid Unicode"):
            publish_query("c", "lone \ud800 surrogate", durable=durable)


# -- durations and retention arguments (pure) ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("45", 45), ("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800),
     ("2w", 1209600), ("1.5h", 5400), (" 7D ", 604800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "d", "7x", "-1d", "7 days", "1e3s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_prune_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="nothing to prune by"):
        prune_query(None, None)
    with pytest.raises(ValueError, match="negative"):
        prune_query(timedelta(days=-1))
    with pytest.raises(ValueError, match="keep_last"):
        prune_query(keep_last=-1)
    with pytest.raises(ValueError, match="keep_last"):
        prune_query(keep_last=True)
    with pytest.raises(pgcast.InvalidChannelError):
        prune_query(channel="")
    assert timedelta(days=7) == pgcast.DEFAULT_RETENTION


def test_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1].version == LATEST_VERSION


# -- DurableEvent --------------------------------------------------------------------------


def test_durable_event_is_an_event_with_an_id() -> None:
    e = pgcast.DurableEvent("c", '{"k":1}', 7, 42)
    channel, payload, pid = e  # still a 3-tuple
    assert (channel, payload, pid, e.id) == ("c", '{"k":1}', 7, 42)
    assert isinstance(e, pgcast.Event) and len(e) == 3 and e.json() == {"k": 1}
    assert getattr(e, "id", None) == 42
    assert getattr(pgcast.Event("c", "p", 1), "id", None) is None
    assert e == pgcast.Event("c", '{"k":1}', 7)
    assert e != pgcast.DurableEvent("c", '{"k":1}', 7, 43)
    assert hash(e) == hash(pgcast.Event("c", '{"k":1}', 7))
    assert repr(e) == "DurableEvent(channel='c', payload='{\"k\":1}', pid=7, id=42)"
    assert e._replace(payload="x").id == 42
    with pytest.raises(AttributeError):
        e.id = 3  # type: ignore[misc]
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(e)).id == 42
    assert copy.copy(e).id == 42


# -- the switch-over from replay to live, as a model (pure) ---------------------------------


class Model:
    """One channel's log and a DurableState listening to it.

    Ids commit in order (the advisory lock's guarantee); each commit after the
    LISTEN queues a notification, delivered later in commit order; a query
    sees the log as of its snapshot, taken some time after it was issued.
    """

    def __init__(self, committed: int, batch: int, since: int | None) -> None:
        self.log: list[int] = list(range(1, committed + 1))
        self.notes: deque[int] = deque()
        self.inbox: deque[Any] = deque()
        self.state = DurableState(self.inbox)
        self.state.version = 1  # the merge alone; gaps: tests/test_aio_gaps.py
        self.batch = batch
        self.since = since
        self.start = since
        self.snapshot: int | None = None
        self.subscribe()

    def subscribe(self) -> None:
        self.state.plan_subscribe(["c"], True, self.since, None)  # then LISTEN
        self.subscribing = True
        self.steps: Any = self.state.subscribe_steps(["c"], self.since, None, self.batch)
        self.query: Any = next(self.steps, None)

    def commit(self) -> None:
        self.log.append(len(self.log) + 1)
        self.notes.append(self.log[-1])

    def deliver(self) -> None:
        if self.notes:
            id = self.notes.popleft()
            self.state.admit("c", ref_payload(id, str(id)), 1)

    def snap(self) -> None:
        if self.query is not None and self.snapshot is None:
            self.snapshot = len(self.log)

    def answer(self) -> None:
        if self.query is None or self.snapshot is None:
            return
        sql_text, params = self.query
        visible = self.log[: self.snapshot]
        if sql_text == REPLAY_SQL:
            _, _, start, limit = params
            rows = [(i, 1, str(i)) for i in visible if i > start][:limit]
        else:  # the end of the log
            rows = [(max(visible, default=0),)]
            self.start = rows[0][0]
        self.snapshot = None
        try:
            self.query = self.steps.send(rows)
        except StopIteration:
            self.query = None
            self.subscribing = False

    def reconnect(self) -> None:
        # The connection breaks: undelivered notifications and the running
        # query are lost; the new connection LISTENs at once.
        self.notes.clear()
        if self.query is not None:
            self.steps.close()
            self.query = None
            self.snapshot = None
        self.state.reconnected()
        if self.subscribing:  # listen() failed: the application calls it again
            self.state.abandon(["c"])
            self.subscribe()

    def issue(self) -> None:
        if self.query is None and self.state.pending:
            self.steps = self.state.replay_steps(self.batch)
            self.query = next(self.steps, None)

    def finish(self) -> None:
        for _ in range(10_000):
            if self.query is not None:
                self.snap()
                self.answer()
            elif self.notes:
                self.deliver()
            elif self.state.pending:
                self.issue()
            else:
                return
        raise AssertionError("the model did not settle")


@settings(max_examples=1000)
@given(
    committed=st.integers(0, 12),
    batch=st.integers(1, 4),
    since=st.integers(0, 12) | st.none(),
    actions=st.lists(
        st.sampled_from(["commit", "deliver", "snap", "answer", "issue", "reconnect"]),
        max_size=60,
    ),
)
def test_switch_over_has_no_gap_and_no_duplicate(
    committed: int, batch: int, since: int | None, actions: list[str]
) -> None:
    if since is not None:
        since = min(since, committed)
    model = Model(committed, batch, since)
    for action in actions:
        getattr(model, action)()
    model.finish()
    # Without since, it starts at the end of the log as it was when looked at
    # (after the LISTEN); either way, everything after, once, in order.
    assert model.start is not None and model.start >= (committed if since is None else since)
    assert [e.id for e in model.inbox] == list(range(model.start + 1, len(model.log) + 1))
    assert not model.state.streams["c"].replaying


def test_replay_that_finds_a_seen_id_pruned_still_goes_live() -> None:
    inbox: deque[Any] = deque()
    state = DurableState(inbox)
    state.version = 1  # the merge alone (positional replay parameters)
    state.plan_subscribe(["c"], True, 0, None)
    state.admit("c", ref_payload(5, "five"), 1)  # dropped while replaying, seen 5
    steps = state.subscribe_steps(["c"], 0, None, batch=10)
    next(steps)
    with pytest.raises(StopIteration):
        steps.send([(3, 1, "three")])  # 5 was pruned before the query ran
    assert ids(list(inbox)) == [3]
    assert not state.pending
    state.admit("c", ref_payload(5, "five"), 1)  # a late duplicate: a hint to read
    state.admit("c", ref_payload(6, "six"), 1)
    assert ids(list(inbox)) == [3]  # references are read from the log, never taken
    assert state.pending
    steps = state.replay_steps(batch=10)
    assert next(steps)[1][1:3] == ("c", 3)
    with pytest.raises(StopIteration):
        steps.send([(6, 1, "six")])
    assert ids(list(inbox)) == [3, 6]
    assert not state.pending


def test_large_replayed_payloads_are_fetched_later() -> None:
    inbox: deque[Any] = deque()
    state = DurableState(inbox)
    state.version = 1  # rows without the gap header (tests/test_aio_gaps.py)
    state.plan_subscribe(["c"], True, 0, None)
    steps = state.subscribe_steps(["c"], 0, None)
    next(steps)
    with pytest.raises(StopIteration):
        steps.send([(1, 9, "small"), (2, 9, None)])
    assert type(inbox[1]) is Unfetched and inbox[1].id == 2
    fetch = DurableState.fetch_steps(inbox[1])
    next(fetch)
    with pytest.raises(StopIteration) as done:
        fetch.send([("big",)])
    assert done.value.value == pgcast.DurableEvent("c", "big", 9, 2)


def test_listen_arguments_are_checked() -> None:
    state = DurableState(deque())
    with pytest.raises(ValueError, match="need durable=True"):
        state.plan_subscribe(["c"], False, 3, None)
    with pytest.raises(ValueError, match="need durable=True"):
        state.plan_subscribe(["c"], False, None, "w")
    with pytest.raises(ValueError, match="since must be"):
        state.plan_subscribe(["c"], True, -1, None)
    with pytest.raises(ValueError, match="since must be"):
        state.plan_subscribe(["c"], True, True, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="consumer name"):
        state.plan_subscribe(["c"], True, None, "")
    with pytest.raises(TypeError, match="consumer must be a str"):
        state.plan_subscribe(["c"], True, None, 5)  # type: ignore[arg-type]


# -- running steps: pgcast.durable.drive and pgcast.aio.drive ------------------------


def _recovering_steps(cleanup: list[str]) -> Any:
    """Steps that handle a failed query by asking another."""
    try:
        try:
            yield ("bad", None)
        except ValueError as exc:
            rows = yield ("good", (str(exc),))
            return rows
        yield ("unreachable", None)
    finally:
        cleanup.append("done")


def _failing_steps(cleanup: list[str]) -> Any:
    try:
        yield ("bad", None)
    finally:
        cleanup.append("undone")


def _fetch(sql: str, params: Any) -> list[tuple[Any, ...]]:
    if sql == "bad":
        raise ValueError("no such table")
    return [tuple(params)]


async def _afetch(sql: str, params: Any) -> list[tuple[Any, ...]]:
    return _fetch(sql, params)


def test_drive_throws_what_fetch_raises_into_the_steps() -> None:
    """Both flavours: a failed query is the steps' to handle; one they do not
    handle leaves them through their finally blocks and reaches the caller."""
    import asyncio

    import pgcast.aio
    import pgcast.durable

    for run in (
        lambda steps: pgcast.durable.drive(steps, _fetch),
        lambda steps: asyncio.run(pgcast.aio.drive(steps, _afetch)),
    ):
        cleanup: list[str] = []
        assert run(_recovering_steps(cleanup)) == [("no such table",)]
        assert cleanup == ["done"]
        with pytest.raises(ValueError, match="no such table"):
            run(_failing_steps(cleanup))
        assert cleanup == ["done", "undone"]
