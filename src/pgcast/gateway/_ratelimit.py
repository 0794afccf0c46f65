"""Per-client rate limits: token buckets, and when to give up on a client.

A public gateway serves clients it does not trust. One allowed to publish
could otherwise send thousands of NOTIFYs a second (cutting off every slow
subscriber of the channel), and one that subscribes and unsubscribes in a loop
keeps the shared LISTEN connection busy. Each client gets, when it first makes
a request (an idle client allocates nothing):

* a bucket of *publishes* (default 100 a second, bursts of 200),
* a bucket of *payload bytes* published (default 1 MB a second, bursts of 2 MB),
* a bucket of *requests* of every other kind (subscribe, unsubscribe, ping,
  auth, and frames that fail to parse; default 50 a second, bursts of 100).

and the gateway as a whole a bucket of publishes of all its clients together
(default 1000 a second, bursts of 2000, per process): each client under its
own limit, thousands of them could otherwise together flood NOTIFY, whose
queue PostgreSQL shares across the whole database.

A request over its limit is refused with an error frame naming the limit and
when to retry (a publish refused was not sent); nothing else happens to it.
A client refused ``max_refusals`` times within ``refusal_window`` seconds
(for its own limits) is disconnected with close code
:data:`CLOSE_RATE_LIMITED` (4029), and counted in ``/metrics``.

Pure: the clock is passed in, so the arithmetic is tested without sleeping.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CLOSE_RATE_LIMITED", "ClientLimiter", "RateLimits", "TokenBucket", "TotalLimiter"]

#: The close code of a client that kept exceeding its rate limits.
CLOSE_RATE_LIMITED = 4029


class TokenBucket:
    """*rate* tokens a second, at most *burst* saved up; starts full."""

    __slots__ = ("_at", "_clock", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self, n: float = 1.0) -> float:
        """Take *n* tokens: 0.0 if they were there, else the seconds to wait
        until they will be (nothing is taken then). More than *burst* at once
        never fits: ``inf``."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if n <= self._tokens:
            self._tokens -= n
            return 0.0
        if n > self.burst:
            return math.inf
        return (n - self._tokens) / self.rate


@dataclass(frozen=True)
class RateLimits:
    """The gateway's per-client limits; ``create_app(rate_limits=...)``.

    Any rate may be ``None`` for no limit on that kind.
    """

    publishes_per_second: float | None = 100.0
    publish_burst: int = 200
    publish_bytes_per_second: float | None = 1_000_000.0
    publish_bytes_burst: int = 2_000_000
    requests_per_second: float | None = 50.0
    request_burst: int = 100
    max_refusals: int = 50
    refusal_window: float = 10.0
    total_publishes_per_second: float | None = 1000.0
    """Publishes a second of all clients together (per gateway process)."""
    total_publish_burst: int = 2000

    def __post_init__(self) -> None:
        for name in ("publishes_per_second", "publish_bytes_per_second", "requests_per_second",
                     "total_publishes_per_second"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, int | float) or not value > 0 or not math.isfinite(value)):
                raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")
        for name in ("publish_burst", "publish_bytes_burst", "request_burst", "max_refusals",
                     "total_publish_burst"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.refusal_window > 0 or not math.isfinite(self.refusal_window):
            raise ValueError(f"refusal_window must be seconds > 0, got {self.refusal_window!r}")
        if self.publish_bytes_per_second is not None and self.publish_bytes_burst < 8000:
            raise ValueError("publish_bytes_burst must hold one largest payload (8000 bytes)")


class ClientLimiter:
    """One client's buckets and recent refusals."""

    __slots__ = ("_bytes", "_clock", "_limits", "_publishes", "_refusals", "_requests")

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._publishes = _bucket(limits.publishes_per_second, limits.publish_burst, clock)
        self._bytes = _bucket(limits.publish_bytes_per_second, limits.publish_bytes_burst, clock)
        self._requests = _bucket(limits.requests_per_second, limits.request_burst, clock)
        #: Made at the first refusal (most clients never have one).
        self._refusals: deque[float] | None = None

    def check_publish(self, size: int) -> str | None:
        """None if a publish of *size* payload bytes may go now, else why not."""
        limits = self._limits
        if self._publishes is not None:
            wait = self._publishes.take()
            if wait:
                return (f"rate limit: at most {limits.publishes_per_second:g} publishes a "
                        f"second (bursts of {limits.publish_burst}); retry in {wait:.2f} s")
        if self._bytes is not None:
            wait = self._bytes.take(size)
            if wait:
                return (f"rate limit: at most {limits.publish_bytes_per_second:g} payload "
                        f"bytes a second (bursts of {limits.publish_bytes_burst}); "
                        f"retry in {wait:.2f} s")
        return None

    def check_request(self) -> str | None:
        """None if a request (not a publish) may go now, else why not."""
        if self._requests is None:
            return None
        wait = self._requests.take()
        if not wait:
            return None
        limits = self._limits
        return (f"rate limit: at most {limits.requests_per_second:g} requests a second "
                f"(bursts of {limits.request_burst}); retry in {wait:.2f} s")

    def refused(self) -> bool:
        """Count a refusal; True when the client has now been refused too
        often (``max_refusals`` within ``refusal_window``) and must go."""
        now = self._clock()
        window = self._refusals
        if window is None:
            window = self._refusals = deque()
        window.append(now)
        while window and window[0] <= now - self._limits.refusal_window:
            window.popleft()
        return len(window) >= self._limits.max_refusals


class TotalLimiter:
    """The gateway's bucket of publishes of all its clients together."""

    __slots__ = ("_limits", "_publishes")

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._publishes = _bucket(limits.total_publishes_per_second,
                                  limits.total_publish_burst, clock)

    def check_publish(self) -> str | None:
        """None if one more publish may go now, else why not."""
        if self._publishes is None:
            return None
        wait = self._publishes.take()
        if not wait:
            return None
        limits = self._limits
        return (f"rate limit: this gateway sends at most {limits.total_publishes_per_second:g} "
                f"publishes a second from all its clients together (bursts of "
                f"{limits.total_publish_burst}; total_publishes_per_second): not sent; "
                f"retry in {wait:.3f} s")


def _bucket(
    rate: float | None, burst: int, clock: Callable[[], float]
) -> TokenBucket | None:
    return None if rate is None else TokenBucket(rate, burst, clock)
