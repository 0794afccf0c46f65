"""The gateway's pure parts: protocol frames, SSE framing, router, auth, metrics.

No server, no database: every rule is checked directly, and the frame parser
is fed arbitrary input by hypothesis (it must answer with ProtocolError,
never crash).
"""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgcast
from pgcast import MAX_PAYLOAD_BYTES, ProtocolError
from pgcast.gateway import _metrics, _protocol
from pgcast.gateway._protocol import Ping, Publish, Subscribe, Unsubscribe, parse_frame
from pgcast.gateway._router import CONTROL_SLACK, Outbox, Overflow, Router, Subscriber
from pgcast.gateway.auth import Access, allow_list, bearer_token, origin_allowed

# -- client frames -------------------------------------------------------------


def test_parse_each_command() -> None:
    assert parse_frame('{"type":"subscribe","channels":["a","b","a"]}') == Subscribe(("a", "b"))
    assert parse_frame('{"type":"unsubscribe","channels":["a"],"ref":7}') == Unsubscribe(
        ("a",), 7
    )
    assert parse_frame('{"type":"publish","channel":"a","payload":"hi"}') == Publish("a", "hi")
    assert parse_frame('{"type":"ping","ref":"x"}') == Ping("x")
    assert parse_frame(b'{"type":"ping"}') == Ping()


def test_publish_payload_json_values_are_sent_as_json_text() -> None:
    cmd = parse_frame('{"type":"publish","channel":"a","payload":{"k":[1,2]}}')
    assert cmd == Publish("a", '{"k":[1,2]}')
    assert parse_frame('{"type":"publish","channel":"a"}') == Publish("a", "")


def test_singular_channel_is_accepted_for_subscribe() -> None:
    assert parse_frame('{"type":"subscribe","channel":"a"}') == Subscribe(("a",))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (None, "empty frame"),
        ("", "not valid JSON"),
        ("nonsense", "not valid JSON"),
        ("[1,2]", "not an array"),
        ('"subscribe"', "not a string"),
        ("{}", 'no "type" field'),
        ('{"type":"shout"}', 'unknown frame type "shout"'),
        ('{"type":7}', "unknown frame type 7"),
        ('{"type":"subscribe"}', 'needs "channels"'),
        ('{"type":"subscribe","channels":"a"}', "must be a list"),
        ('{"type":"subscribe","channels":[]}', "is empty"),
        ('{"type":"subscribe","channels":[1]}', "must be a str"),
        ('{"type":"subscribe","channels":[""]}', "empty"),
        ('{"type":"subscribe","channels":["' + "x" * 64 + '"]}', "at most 63"),
        ('{"type":"publish"}', 'needs "channel"'),
        ('{"type":"publish","channel":"a","payload":"' + "x" * 8000 + '"}', "under 8000"),
        ('{"type":"publish","channel":"a","payload":"a\\u0000b"}', "NUL"),
        ('{"type":"ping","ref":true}', '"ref" must be'),
        ('{"type":"ping","ref":[1]}', '"ref" must be'),
        ('{"type":"ping","ref":"' + "r" * 65 + '"}', "the limit is 64"),
        (b"\xff\xfe", "not UTF-8"),
        ("[" * 100_000, "frame is 100000 bytes"),
        # A lone surrogate escape would fail when echoed (issue 12 item 10),
        # wherever it stands: ref, channel, payload, a key, a nested value.
        ('{"type":"ping","ref":"\\ud800"}', "lone surrogate"),
        ('{"type":"ping","ref":"a\\uDFFFb"}', "lone surrogate"),
        ('{"type":"subscribe","channels":["\\udc00"]}', "lone surrogate"),
        ('{"type":"publish","channel":"a","payload":"x\\ud83d"}', "lone surrogate"),
        ('{"type":"publish","channel":"a","payload":{"\\ud800":1}}', "lone surrogate"),
        ('{"type":"publish","channel":"a","payload":[[["\\udbff"]]]}', "lone surrogate"),
        # NaN and the infinities: JSON.parse rejects them in the browser.
        ('{"type":"publish","channel":"a","payload":NaN}', "NaN is not JSON"),
        ('{"type":"publish","channel":"a","payload":[-Infinity]}', "-Infinity is not JSON"),
        ('{"type":"publish","channel":"a","payload":{"x":Infinity}}', "Infinity is not JSON"),
        ('{"type":"publish","channel":"a","payload":1e400}', "out of range"),
        ('{"type":"ping","ref":1,"extra":-1e999}', "out of range"),
    ],
)
def test_bad_frames_are_protocol_errors_that_say_why(
    frame: str | bytes | None, message: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_frame(frame, max_bytes=16 * 1024 if frame != "[" * 100_000 else 1000)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_frame_size_limit_counts_utf8_bytes() -> None:
    frame = json.dumps({"type": "publish", "channel": "a", "payload": "é" * 600},
                       ensure_ascii=False)
    assert len(frame) < 1000 < len(frame.encode())
    with pytest.raises(ProtocolError, match=r"frame is \d+ bytes; the limit is 1000 bytes"):
        parse_frame(frame, max_bytes=1000)
    parse_frame(frame, max_bytes=2000)


def test_surrogate_pairs_and_big_finite_numbers_are_fine() -> None:
    cmd = parse_frame('{"type":"publish","channel":"a","payload":["\\ud83d\\ude00", 1e300]}')
    assert isinstance(cmd, Publish)
    assert json.loads(cmd.payload) == ["\U0001F600", 1e300]
    assert parse_frame('{"type":"ping","ref":"\\ud83d\\ude00"}') == Ping("\U0001F600")


def test_errors_never_echo_an_unsendable_string() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_frame('{"type":"shout\\ud800"}')
    str(info.value).encode("utf-8")  # the error frame itself must be sendable


def test_deeply_nested_json_is_an_error_not_a_crash() -> None:
    with pytest.raises(ProtocolError):
        parse_frame("[" * 50_000 + "]" * 50_000, max_bytes=1_000_000)


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_parse_frame_never_raises_anything_but_protocol_error(data: str | bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_frame(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(["type", "channels", "channel", "payload", "ref"]),
                       json_values | st.sampled_from(["subscribe", "publish", "ping"])))
def test_any_json_object_is_parsed_or_refused(obj: dict[str, object]) -> None:
    try:
        parse_frame(json.dumps(obj))
    except ProtocolError as exc:
        assert str(exc)


# -- server frames and SSE -----------------------------------------------------


def test_server_frames_are_compact_json() -> None:
    assert json.loads(_protocol.subscribed(["a"], 3).text) == {
        "type": "subscribed", "channels": ["a"], "ref": 3,
    }
    msg = _protocol.message("a", "é", 42)
    assert msg.is_message and msg.id is None
    assert json.loads(msg.text) == {"type": "message", "channel": "a", "payload": "é", "pid": 42}
    durable = _protocol.message("a", "p", 1, event_id=17)
    assert durable.id == "17" and json.loads(durable.text)["id"] == 17
    # Bytes that are not UTF-8: valid text, and the bytes in base64.
    bad = _protocol.event_message(pgcast.UndecodableEvent.from_bytes("a", b"\xe9t\xe9", 5))
    assert json.loads(bad.ws[2:].decode()) == {
        "type": "message", "channel": "a", "payload": "\ufffdt\ufffd", "pid": 5, "raw": "6XTp",
    }
    assert _protocol.event_message(pgcast.Event("a", "é", 42)).text == msg.text
    assert json.loads(_protocol.error("no", "r").text) == {
        "type": "error", "message": "no", "ref": "r",
    }
    assert json.loads(_protocol.notice("dropped", "m", count=2).text) == {
        "type": "notice", "event": "dropped", "message": "m", "count": 2,
    }
    assert json.loads(_protocol.pong().text) == {"type": "pong"}


def test_sse_event_framing() -> None:
    assert _protocol.sse_event('{"a":1}') == 'data: {"a":1}\n\n'
    assert _protocol.sse_event("x", event_id="5", retry_ms=100) == "id: 5\nretry: 100\ndata: x\n\n"
    # A newline in the data cannot end the event early.
    assert _protocol.sse_event("a\nb\r\nc\rd") == "data: a\ndata: b\ndata: c\ndata: d\n\n"
    assert _protocol.sse_comment("hi") == ": hi\n\n"
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        _protocol.sse_event("x", event_id="1\n2")


@given(st.text(max_size=100))
def test_sse_event_round_trips_through_a_parser(data: str) -> None:
    wire = _protocol.sse_event(data)
    assert wire.endswith("\n\n")
    lines = wire[:-2].split("\n")
    assert all(line.startswith("data: ") for line in lines)
    normal = data.replace("\r\n", "\n").replace("\r", "\n")
    assert "\n".join(line[len("data: "):] for line in lines) == normal


# -- outbox and router ---------------------------------------------------------


def frame(n: int) -> _protocol.Frame:
    return _protocol.message("c", str(n), 1)


def test_outbox_disconnect_policy_marks_overflow_once() -> None:
    wakes = []
    box = Outbox(2, Overflow.DISCONNECT, lambda: wakes.append(1))
    assert box.put(frame(1)) and box.put(frame(2))
    assert wakes == [1]  # woken on empty -> non-empty only
    assert not box.put(frame(3))
    assert box.overflowed and wakes == [1, 1]
    assert not box.put(frame(4))
    assert wakes == [1, 1]
    assert [f.text for f in box.take()] == [frame(1).text, frame(2).text]
    assert len(box) == 0


def test_outbox_drop_oldest_counts_drops() -> None:
    box = Outbox(3, "drop-oldest")  # type: ignore[arg-type]
    for n in range(10):
        assert box.put(frame(n))
    assert not box.overflowed
    assert [json.loads(f.text)["payload"] for f in box.take()] == ["7", "8", "9"]
    assert box.dropped == 7
    assert box.take_unreported() == 7
    assert box.take_unreported() == 0


def test_outbox_control_frames_pass_a_full_queue_up_to_the_slack() -> None:
    box = Outbox(2, Overflow.DROP_OLDEST)
    box.put(frame(1))
    box.put(frame(2))
    for _ in range(CONTROL_SLACK):
        assert box.put_control(_protocol.pong())
    assert not box.overflowed
    # A client sending requests without reading replies goes, whatever the policy.
    assert not box.put_control(_protocol.pong())
    assert box.overflowed


def test_outbox_rejects_a_useless_size() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Outbox(0)


def sub() -> Subscriber:
    return Subscriber(Outbox(10))


def test_router_listens_on_first_subscriber_and_unlistens_after_last() -> None:
    router = Router()
    a, b = sub(), sub()
    router.attach(a)
    router.attach(b)
    listening: set[str] = set()
    assert router.missing(listening, ["x", "y"]) == ["x", "y"]
    assert router.subscribe(a, ["x", "y"]) == ["x", "y"]
    listening |= {"x", "y"}
    assert router.missing(listening, ["x"]) == []
    assert router.subscribe(b, ["x"]) == ["x"]
    assert router.subscriptions == 3
    assert router.unsubscribe(a, ["x", "nope"]) == ["x"]
    assert router.orphans(listening) == []  # b still wants x
    router.detach(b)
    assert router.orphans(listening) == ["x"]
    assert router.channels() == {"y"}
    router.detach(a)
    assert sorted(router.orphans(listening)) == ["x", "y"]
    assert router.subscriptions == 0 and not router.clients


def test_router_subscription_limit_is_all_or_nothing() -> None:
    router = Router(max_subscriptions=3)
    a = sub()
    router.subscribe(a, ["1", "2"])
    with pytest.raises(ProtocolError, match=r"would make 4 subscriptions; the limit .* is 3"):
        router.subscribe(a, ["2", "3", "4"])
    assert a.channels == {"1", "2"}
    router.subscribe(a, ["1", "3"])  # only one is new
    assert a.channels == {"1", "2", "3"}


def test_router_publish_reaches_subscribers_only_and_reports_overflow() -> None:
    router = Router()
    fast, slow, other = Subscriber(Outbox(10)), Subscriber(Outbox(1)), sub()
    for s in (fast, slow, other):
        router.attach(s)
    router.subscribe(fast, ["c"])
    router.subscribe(slow, ["c"])
    router.subscribe(other, ["d"])
    assert router.publish("c", frame(1)) == (2, [])
    queued, over = router.publish("c", frame(2))
    assert queued == 1 and over == [slow]
    assert len(fast.outbox) == 2 and len(other.outbox) == 0
    assert router.publish("nobody", frame(3)) == (0, [])


def test_router_broadcast_reaches_every_client() -> None:
    router = Router()
    clients = [sub() for _ in range(3)]
    for c in clients:
        router.attach(c)
    router.subscribe(clients[0], ["x"])
    assert router.broadcast(_protocol.notice("reconnected", "m")) == []
    assert all(len(c.outbox) == 1 for c in clients)


# -- auth ----------------------------------------------------------------------


def test_access_globs_are_exact_and_case_sensitive() -> None:
    access = Access.globs(read=["orders.*", "news"], write=["chat-[0-9]"])
    assert access.can_read("orders.eu") and access.can_read("news")
    assert not access.can_read("Orders.eu") and not access.can_read("newsroom")
    assert access.can_write("chat-7") and not access.can_write("chat-77")
    assert not access.can_write("news")
    assert Access.globs(read=["*"]).can_read("anything at all")
    nothing = Access()
    assert not nothing.can_read("a") and not nothing.can_write("a")
    with pytest.raises(ValueError, match="non-empty"):
        Access.globs(read=[""])


def test_allow_list_ignores_the_token() -> None:
    authorize = allow_list(["a*"], [])
    access = authorize(None, "whatever")  # type: ignore[arg-type]
    assert isinstance(access, Access)
    assert access.can_read("ab") and not access.can_write("ab")


def test_bearer_token_from_query_or_header() -> None:
    assert bearer_token({}, {"token": "q"}) == "q"
    assert bearer_token({"authorization": "Bearer  h "}, {}) == "h"
    assert bearer_token({"authorization": "bearer h"}, {"token": "q"}) == "q"
    assert bearer_token({"authorization": "Basic xyz"}, {}) is None
    assert bearer_token({"authorization": "Bearer"}, {}) is None


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "h:8000", None, True),  # not a browser
        ("http://h:8000", "h:8000", None, True),
        ("http://H:8000", "h:8000", None, True),
        ("http://h", "h", None, True),
        ("https://h", "h:443", None, True),
        ("http://h:8000", "h:8001", None, False),
        ("http://evil.example", "h:8000", None, False),
        ("null", "h:8000", None, False),
        ("http://[::1]:8000", "[::1]:8000", None, True),
        ("http://h:8000", None, None, False),
        ("http://evil.example", "h", frozenset({"*"}), True),
        ("http://app.example", "h", frozenset({"http://app.example"}), True),
        ("http://app.example/", "h", frozenset({"http://app.example"}), True),
        ("http://h", "h", frozenset({"http://app.example"}), False),
    ],
)
def test_origin_check(origin: str | None, host: str | None, allowed: frozenset[str] | None,
                      ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok


# -- metrics -------------------------------------------------------------------


def test_metrics_text_format() -> None:
    stats = _metrics.Stats(messages_in=3, messages_out=5)
    stats.disconnects["slow_consumer"] += 1
    text = _metrics.render(_metrics.families(
        stats, clients={"websocket": 2}, subscriptions=4, channels=1, database_up=True,
        backend_pid=99, queue_usage=0.25,
    ))
    lines = text.splitlines()
    assert "# TYPE pgcast_gateway_clients gauge" in lines
    assert 'pgcast_gateway_clients{transport="websocket"} 2' in lines
    assert 'pgcast_gateway_clients{transport="sse"} 0' in lines
    assert 'pgcast_gateway_disconnects_total{reason="slow_consumer"} 1' in lines
    assert "pgcast_gateway_messages_out_total 5" in lines
    assert "pgcast_gateway_notify_queue_usage 0.25" in lines
    assert "pgcast_gateway_backend_pid 99" in lines
    assert text.endswith("\n")
    # Every sample line is NAME[{labels}] VALUE, after a HELP and a TYPE line.
    for line in lines:
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("pgcast_gateway_")
    down = _metrics.render(_metrics.families(
        _metrics.Stats(), clients={}, subscriptions=0, channels=0, database_up=False,
        backend_pid=None, queue_usage=None,
    ))
    assert "pgcast_gateway_database_up 0" in down
    assert "backend_pid" not in down and "notify_queue_usage" not in down


def test_max_payload_matches_the_protocol_limit() -> None:
    ok = "x" * (MAX_PAYLOAD_BYTES - 1)
    assert parse_frame(json.dumps({"type": "publish", "channel": "a", "payload": ok})) == Publish(
        "a", ok
    )


def test_since_positions() -> None:
    from pgcast.gateway._protocol import parse_since, sse_position

    assert parse_frame('{"type":"subscribe","channels":["a"],"since":5}') == Subscribe(
        ("a",), None, 5
    )
    assert parse_frame('{"type":"subscribe","channels":["a","b"],"since":{"b":2}}').since == {
        "b": 2
    }
    assert parse_since(None) is None
    assert parse_since("7") == 7
    assert parse_since('{"a": 1, "b": 0}') == {"a": 1, "b": 0}
    for bad in ("-1", "x", "1.5", '{"a": "1"}', "true", "[1]", "NaN", "Infinity",
                '{"a": NaN}', '{"a": -Infinity}', "1e999", '{"\\ud800": 1}'):
        with pytest.raises(ProtocolError, match="since"):
            parse_since(bad)
    with pytest.raises(ProtocolError, match="not being subscribed to"):
        parse_frame('{"type":"subscribe","channels":["a"],"since":{"b":2}}')
    position = sse_position({"a": 3, "weird,name\n": 4})
    assert "\n" not in position and json.loads(position) == {"a": 3, "weird,name\n": 4}
    assert parse_since(position) == {"a": 3, "weird,name\n": 4}


def test_a_failed_hub_job_whose_caller_left_is_not_logged_as_never_retrieved() -> None:
    """A statement of the hub runs in a task of its own (_shielded) so a
    client that leaves cannot cancel it; its failure then belongs to nobody.
    asyncio logged "Task exception was never retrieved" for every such one:
    under a flood of clients that leave, a flood of tracebacks."""
    import asyncio
    import gc

    from pgcast.gateway._client import Settings
    from pgcast.gateway._hub import Hub

    reported: list[dict[str, object]] = []

    async def fails_later() -> None:
        await asyncio.sleep(0.05)
        raise pgcast.DatabaseError("the replay query failed")

    async def body() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        hub = Hub(Settings(dsn="host=127.0.0.1 port=1"))
        caller = asyncio.create_task(hub._shielded(fails_later()))
        await asyncio.sleep(0.01)
        caller.cancel()  # the client left
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        async with asyncio.timeout(5):
            while hub._jobs:
                await asyncio.sleep(0.01)
        gc.collect()  # a task's "never retrieved" is reported when it is freed

    asyncio.run(body())
    gc.collect()
    assert not [c for c in reported if "never retrieved" in str(c.get("message"))], reported
