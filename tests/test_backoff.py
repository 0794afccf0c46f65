"""The reconnect schedule (pgcast._backoff) and the retry loop
(pgcast._reconnect.reconnect_plan): pure, so exhaustive and property-based."""

from __future__ import annotations

import math
import random
import re
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcast import Backoff, ConnectionLostError, ListenNotEffectiveError
from pgcast._reconnect import Attempt, Sleep, reconnect_plan


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def delays(policy: Backoff, n: int, rand: float = 0.999999, start: float = 0.0) -> list[float]:
    attempts = policy.attempts(start, lambda: rand)
    out = []
    for _ in range(n):
        d = attempts.next_delay(start)
        assert d is not None
        out.append(d)
    return out


# -- the policy ----------------------------------------------------------------


def test_defaults_are_bounded_and_unlimited_in_count() -> None:
    b = Backoff()
    assert (b.initial, b.maximum, b.multiplier) == (0.1, 10.0, 2.0)
    assert b.max_attempts is None and b.max_time is None and b.jitter


def test_first_attempt_is_immediate() -> None:
    assert Backoff().attempts(0.0, lambda: 0.99).next_delay(0.0) == 0.0


def test_caps_grow_exponentially_then_stay_at_maximum() -> None:
    b = Backoff(initial=0.5, maximum=4.0, multiplier=2.0)
    assert [b.cap(n) for n in range(7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_without_jitter_the_delay_is_the_cap() -> None:
    b = Backoff(initial=1.0, maximum=5.0, multiplier=3.0, jitter=False)
    assert delays(b, 5, rand=0.0) == [0.0, 1.0, 3.0, 5.0, 5.0]


def test_full_jitter_scales_the_cap_by_the_random_draw() -> None:
    b = Backoff(initial=1.0, maximum=8.0, multiplier=2.0)
    assert delays(b, 5, rand=0.25) == [0.0, 0.25, 0.5, 1.0, 2.0]
    assert delays(b, 3, rand=0.0) == [0.0, 0.0, 0.0]


def test_delay_is_the_series_delay_without_an_end() -> None:
    """Backoff.delay(n) is what a series gives for attempt n, whatever
    max_attempts says (Retry and the gateway use it directly)."""
    b = Backoff(initial=1, maximum=8, max_attempts=1)
    assert [b.delay(n, rand=lambda: 0.5) for n in range(6)] == [0, 0.5, 1, 2, 4, 4]
    assert Backoff(initial=1, jitter=False).delay(3) == 4
    series = b.attempts(0.0, rand=lambda: 0.5)
    assert series.next_delay(0.0) == b.delay(0) and series.next_delay(0.0) is None


def test_seeded_random_source_gives_a_reproducible_schedule() -> None:
    b = Backoff(initial=0.1, maximum=3.0)
    first = b.attempts(0.0, random.Random(42).random)
    second = b.attempts(0.0, random.Random(42).random)
    a = [first.next_delay(0.0) for _ in range(20)]
    assert a == [second.next_delay(0.0) for _ in range(20)]
    assert len(set(a)) > 10  # jittered, not constant


def test_max_attempts_ends_the_series() -> None:
    attempts = Backoff(max_attempts=3).attempts(0.0, lambda: 0.5)
    assert [attempts.next_delay(0.0) is not None for _ in range(5)] == [
        True, True, True, False, False,
    ]
    assert attempts.count == 3


def test_max_time_ends_the_series_and_shortens_the_last_delay() -> None:
    b = Backoff(initial=1.0, maximum=10.0, jitter=False, max_time=5.0)
    attempts = b.attempts(100.0, random.random)
    assert attempts.deadline == 105.0
    assert attempts.next_delay(100.0) == 0.0
    assert attempts.next_delay(100.0) == 1.0
    assert attempts.next_delay(101.0) == 2.0
    assert attempts.next_delay(103.5) == 1.5  # 4.0 shortened to reach the deadline
    assert attempts.next_delay(105.0) is None  # the deadline has come
    assert attempts.next_delay(106.0) is None


def test_max_time_zero_allows_exactly_one_immediate_attempt() -> None:
    attempts = Backoff(max_time=0).attempts(0.0)
    assert attempts.next_delay(0.0) == 0.0
    assert attempts.next_delay(0.0) is None


def test_huge_attempt_numbers_do_not_overflow() -> None:
    b = Backoff(initial=0.001, maximum=30.0, multiplier=10.0)
    assert b.cap(10_000) == 30.0
    assert Backoff(initial=0.0, maximum=1.0).cap(5000) == 0.0
    assert Backoff(initial=2.0, maximum=2.0, multiplier=1.0).cap(10**9) == 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": -1}, "initial must be >= 0"),
        ({"initial": 5, "maximum": 1}, "maximum (1 s) must be >= initial (5 s)"),
        ({"multiplier": 0.5}, "multiplier must be >= 1"),
        ({"max_attempts": 0}, "max_attempts must be an int >= 1"),
        ({"max_attempts": 2.5}, "max_attempts must be an int >= 1"),
        ({"max_attempts": True}, "max_attempts must be an int >= 1"),
        ({"max_time": -0.1}, "max_time must be a number >= 0"),
        ({"max_time": math.nan}, "max_time must be a number >= 0"),
        ({"initial": math.inf}, "initial must be finite"),
        ({"maximum": math.nan}, "maximum must be finite"),
    ],
)
def test_bad_settings_are_refused_clearly(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Backoff(**kwargs)


def test_non_numbers_are_refused() -> None:
    with pytest.raises(TypeError, match="initial must be a number"):
        Backoff(initial="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="multiplier must be a number"):
        Backoff(multiplier=True)


@given(
    initial=st.floats(0, 5),
    extra=st.floats(0, 60),
    multiplier=st.floats(1, 10),
    draws=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=40),
)
def test_every_delay_is_within_zero_and_its_cap(
    initial: float, extra: float, multiplier: float, draws: list[float]
) -> None:
    b = Backoff(initial=initial, maximum=initial + extra, multiplier=multiplier)
    it = iter(draws)
    attempts = b.attempts(0.0, lambda: next(it))
    for n in range(len(draws)):
        d = attempts.next_delay(0.0)
        assert d is not None
        assert 0.0 <= d <= b.cap(n) <= b.maximum
        if n:
            assert b.cap(n) >= b.cap(n - 1)  # caps never shrink


@given(
    max_time=st.floats(0, 100),
    steps=st.lists(st.floats(0, 20), max_size=50),
)
def test_no_attempt_is_granted_after_max_time(max_time: float, steps: list[float]) -> None:
    b = Backoff(initial=0.5, maximum=8.0, max_time=max_time)
    attempts = b.attempts(0.0, lambda: 0.7)
    now = 0.0
    for step in steps:
        d = attempts.next_delay(now)
        if d is None:
            assert now >= max_time
            break
        assert now + d <= max_time + 1e-9  # the attempt happens by the deadline
        now += d + step


# -- the retry loop ------------------------------------------------------------


def run_plan(
    outcomes: list[BaseException | None], policy: Backoff, clock: FakeClock,
    deadline: float | None = None,
) -> tuple[list[Sleep | Attempt], int]:
    """Drive reconnect_plan: each Attempt takes the next outcome (None: success)."""
    steps = reconnect_plan(policy, ConnectionLostError("lost"), deadline=deadline,
                           clock=clock, rand=lambda: 0.5)
    seen: list[Sleep | Attempt] = []
    failure: BaseException | None = None
    outcomes = list(outcomes)
    while True:
        try:
            step = steps.send(None) if failure is None else steps.throw(failure)
        except StopIteration as done:
            return seen, done.value
        failure = None
        seen.append(step)
        if isinstance(step, Sleep):
            clock.now += step.seconds
        else:
            failure = outcomes.pop(0)
            clock.now += 0.01


def test_plan_succeeds_at_once_without_sleeping() -> None:
    seen, attempts = run_plan([None], Backoff(), FakeClock())
    assert seen == [Attempt(1)]
    assert attempts == 1


def test_plan_retries_retryable_errors_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    refused = psycopg.OperationalError("connection refused")
    seen, attempts = run_plan([refused, refused, None], Backoff(initial=1.0), FakeClock())
    assert seen == [Attempt(1), Sleep(0.5), Attempt(2), Sleep(1.0), Attempt(3)]
    assert attempts == 3
    assert "reconnect attempt 1 failed: connection refused" in caplog.text


def test_plan_gives_up_after_max_attempts_naming_the_last_error() -> None:
    refused = psycopg.OperationalError("connection refused")
    with pytest.raises(ConnectionLostError, match=r"3 attempt.*last error: connection refused"):
        run_plan([refused] * 3, Backoff(max_attempts=3), FakeClock())


def test_plan_gives_up_at_the_callers_deadline() -> None:
    refused = psycopg.OperationalError("refused")
    clock = FakeClock(0.0)
    with pytest.raises(ConnectionLostError, match="could not reconnect"):
        run_plan([refused] * 100, Backoff(initial=1.0, jitter=False), clock, deadline=5.0)
    assert 5.0 <= clock.now <= 5.1


def test_plan_propagates_errors_that_retrying_cannot_fix() -> None:
    pooler = ListenNotEffectiveError("LISTEN did not take effect")
    with pytest.raises(ListenNotEffectiveError):
        run_plan([pooler], Backoff(), FakeClock())


def test_retry_log_says_the_first_failure_then_one_summary_per_period() -> None:
    from pgcast._reconnect import RetryLog, describe_attempts

    log = RetryLog(every=5.0)
    said = [(n, log.failed(n, now=n * 0.001)) for n in range(1, 2001)]  # 2 s of attempts
    assert [s for _, s in said if s is not None] == [(1, 1)]
    assert log.failed(2001, now=5.001) == (2, 2001)  # the held ones, summed up
    assert log.failed(2002, now=5.1) is None  # within 5 s of that summary
    assert describe_attempts(1, 1) == "attempt 1"
    assert describe_attempts(2, 2001) == "attempts 2-2001 (2000 of them; the last error)"
