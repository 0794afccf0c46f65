"""When to probe a listening connection, and when to call it dead.

Pure: the driver passes the time in. A connection that the network dropped
without a FIN or RST (a NAT that forgot it, a cable pulled, a proxy that
stopped forwarding) looks idle, not broken: no read ever fails. So a listener
sends a round-trip probe, a ``NOTIFY`` on its own private channel
(:func:`probe_channel`), after every *interval* seconds in which it heard
nothing from the server, and counts the connection as dead when the probe
has no answer *interval* seconds later. Anything the server sends counts as
hearing from it (a notification, a query result), so a busy listener never
probes.

The worst case: the last word from the server at ``t``, the probe at
``t + interval``, death declared at ``t + 2 * interval``: a silently dropped
connection is noticed within about two intervals.

TCP keepalives (:func:`keepalive_options`) catch the same failure one layer
down, for the time the PubSub is not iterated and no probe is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["HealthCheck", "check_interval", "keepalive_options", "probe_channel"]

#: The prefix of probe channels; a user listening to such a name would see
#: another PubSub's probes, so pgcast never delivers them.
PROBE_PREFIX = "pgcast.probe."


def probe_channel(backend_pid: int) -> str:
    """The private channel the session *backend_pid* probes itself on."""
    return f"{PROBE_PREFIX}{backend_pid}"


def probe_sql(channel: str) -> bytes:
    """The probe statement (simple protocol, so it can be sent without waiting)."""
    return ('NOTIFY "' + channel.replace('"', '""') + '"').encode()


def check_interval(value: float | None) -> float:
    """Validate a ``health_check_interval``: seconds > 0, or 0/None for off."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"health_check_interval must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"health_check_interval must be >= 0 seconds (0 turns it off), got {value}"
        )
    return float(value)


def keepalive_options(interval: float) -> dict[str, int]:
    """libpq's TCP keepalive options matching a health check *interval*.

    The kernel starts probing after *interval* seconds of silence (30 when
    the health check is off), then every third of that, and drops the
    connection after 3 unanswered probes. With the health check on, data
    sent but not acknowledged for two intervals also drops it
    (``tcp_user_timeout``), so a command sent into a dead network fails
    instead of hanging for the kernel's default quarter of an hour. libpq
    ignores these on Unix sockets.
    """
    idle = max(1, round(interval)) if interval > 0 else 30
    options = {
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": max(1, idle // 3),
        "keepalives_count": 3,
    }
    if interval > 0:
        options["tcp_user_timeout"] = max(1000, round(2 * interval * 1000))
    return options


@dataclass(slots=True)
class HealthCheck:
    """The probe schedule of one connection.

    Call :meth:`heard` whenever the server sent something, :meth:`probe_sent`
    after sending a probe; ask :meth:`should_probe`, :meth:`is_dead` and
    :meth:`next_check` before and after each wait. An *interval* of 0 turns
    the check off: it never probes and never declares death.
    """

    interval: float
    last_heard: float
    probe_sent_at: float | None = None

    @property
    def enabled(self) -> bool:
        """Whether probes are sent at all."""
        return self.interval > 0

    def reset(self, now: float) -> None:
        """Start afresh on a new connection."""
        self.last_heard = now
        self.probe_sent_at = None

    def heard(self, now: float) -> None:
        """The server sent something: the connection is alive."""
        self.last_heard = max(self.last_heard, now)
        self.probe_sent_at = None

    def should_probe(self, now: float) -> bool:
        """A probe is due: *interval* of silence and none outstanding."""
        return (
            self.interval > 0
            and self.probe_sent_at is None
            and now >= self.last_heard + self.interval
        )

    def probe_sent(self, now: float) -> None:
        """A probe went out at *now*."""
        self.probe_sent_at = now

    def is_dead(self, now: float) -> bool:
        """The outstanding probe got no answer within *interval*."""
        return (
            self.interval > 0
            and self.probe_sent_at is not None
            and now >= self.probe_sent_at + self.interval
        )

    def deadline(self) -> float | None:
        """When the outstanding probe expires, or None if none is."""
        if self.interval <= 0 or self.probe_sent_at is None:
            return None
        return self.probe_sent_at + self.interval

    def due(self) -> float | None:
        """When a probe falls due or the outstanding one expires, on the
        clock the times were given in (``None``: never). It moves only
        later as the server is heard from and probes are sent, so a
        supervisor of many connections may keep it in a heap and look again
        only when the time it noted comes."""
        if self.interval <= 0:
            return None
        if self.probe_sent_at is not None:
            return self.probe_sent_at + self.interval
        return self.last_heard + self.interval

    def next_check(self, now: float) -> float | None:
        """Seconds until a probe is due or the outstanding one expires
        (``None``: never; the driver may wait as long as it likes)."""
        due = self.due()
        return None if due is None else max(0.0, due - now)

    def silence(self, now: float) -> float:
        """Seconds since the server was last heard from."""
        return max(0.0, now - self.last_heard)
