"""The one retry schedule: exponential backoff with full jitter, bounded.

Every retry in pgcast follows it, each configurable where it is created: a
PubSub's reconnect (``connect(reconnect_backoff=...)``), the gateway's
(``create_app(reconnect_backoff=...)``), a Worker's (``Worker(...,
reconnect_backoff=...)``) and a Worker's handler retries (``Retry(backoff=...)``).

Pure: no sleeping and no clock of its own. :class:`Backoff` is the policy a
user configures; :meth:`Backoff.attempts` starts one series of attempts and
returns an :class:`Attempts`, which a driver asks for the delay before each
attempt, passing the current time, until it says to give up (``None``).

The delay before attempt *n* (counting from 0) is:

* 0 for the first attempt: a connection killed by ``pg_terminate_backend``
  comes back at once;
* then "full jitter" (AWS architecture blog, "Exponential Backoff And
  Jitter"): a uniform draw in ``[0, min(maximum, initial * multiplier**(n-1))]``,
  so a crowd of listeners cut off together does not reconnect in lock step.

A series ends after ``max_attempts`` attempts or once ``max_time`` seconds
have passed since it started; the last delay is shortened so the final
attempt still happens at the deadline. Given the same random source, the
schedule is the same, so tests are deterministic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Attempts", "Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """How a lost connection is retried: exponential backoff with full jitter.

    :param initial: the cap of the delay before the second attempt, seconds.
    :param maximum: the largest cap any delay can have, seconds.
    :param multiplier: how much the cap grows per attempt (>= 1).
    :param max_attempts: give up after this many attempts (``None``: no limit).
    :param max_time: give up this many seconds after the series started
        (``None``: no limit).
    :param jitter: draw each delay uniformly below its cap (the default); with
        ``False`` the delay is the cap itself.
    """

    initial: float = 0.1
    maximum: float = 10.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    max_time: float | None = None
    jitter: bool = True

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Backoff.{name} must be a number, not {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"Backoff.{name} must be finite, got {value}")
        if self.initial < 0:
            raise ValueError(f"Backoff.initial must be >= 0 seconds, got {self.initial}")
        if self.maximum < self.initial:
            raise ValueError(
                f"Backoff.maximum ({self.maximum} s) must be >= initial ({self.initial} s)"
            )
        if self.multiplier < 1:
            raise ValueError(f"Backoff.multiplier must be >= 1, got {self.multiplier}")
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise ValueError(
                f"Backoff.max_attempts must be an int >= 1 or None, got {self.max_attempts!r}"
            )
        if self.max_time is not None and (
            isinstance(self.max_time, bool)
            or not isinstance(self.max_time, int | float)
            or not self.max_time >= 0
        ):
            raise ValueError(
                f"Backoff.max_time must be a number >= 0 or None, got {self.max_time!r}"
            )

    def cap(self, attempt: int) -> float:
        """The largest delay before attempt number *attempt* (0-based)."""
        if attempt <= 0:
            return 0.0
        if self.initial == 0:
            return 0.0
        if self.multiplier == 1:
            return min(self.maximum, self.initial)
        # Compare exponents rather than computing a power that may overflow.
        exponent = attempt - 1
        if exponent >= math.log(self.maximum / self.initial, self.multiplier):
            return self.maximum
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The delay before attempt number *attempt* (0-based): a draw below
        :meth:`cap`, or the cap itself without jitter. Ignores
        ``max_attempts`` and ``max_time`` (see :meth:`attempts` for a series
        that ends)."""
        cap = self.cap(attempt)
        return cap * rand() if self.jitter else cap

    def attempts(
        self, started: float, rand: Callable[[], float] = random.random
    ) -> Attempts:
        """Start a series of attempts at time *started* (any monotonic clock).

        *rand* returns floats in ``[0, 1)``; pass ``random.Random(seed).random``
        for a reproducible schedule.
        """
        return Attempts(self, started, rand)


@dataclass(slots=True)
class Attempts:
    """One series of reconnect attempts; see :meth:`Backoff.attempts`."""

    policy: Backoff
    started: float
    rand: Callable[[], float] = field(repr=False)
    #: How many attempts were granted so far.
    count: int = 0

    @property
    def deadline(self) -> float | None:
        """The time after which no attempt is granted, or None."""
        if self.policy.max_time is None:
            return None
        return self.started + self.policy.max_time

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next attempt, or None: give up.

        Each call grants one attempt; call it once per attempt, at the time
        the previous one failed.
        """
        policy = self.policy
        if policy.max_attempts is not None and self.count >= policy.max_attempts:
            return None
        delay = policy.delay(self.count, self.rand)
        deadline = self.deadline
        if deadline is not None:
            remaining = deadline - now
            if remaining < 0 or (remaining == 0 and self.count > 0):
                return None
            delay = min(delay, remaining)
        self.count += 1
        return max(0.0, delay)
