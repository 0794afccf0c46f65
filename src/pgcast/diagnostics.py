"""Self-diagnosis: is this server session fit for LISTEN/NOTIFY?

Three things silently break a listener, and are checked here:

* a connection pooler in transaction or statement mode (PgBouncer
  ``pool_mode=transaction``): ``LISTEN`` succeeds on whatever server session
  runs it, which is then handed to someone else. Checked after every LISTEN
  with ``pg_listening_channels()`` in a *separate* statement (in the same
  statement it would run on the same session and prove nothing):
  :func:`check_listening` raises :class:`~pgcast.ListenNotEffectiveError`.
  That check alone is blind when the pool hands the same server session
  back (PgBouncer reuses the last one released: one client on an idle pool
  always passes), so ``pgcast doctor`` also asks a *second* connection
  (:data:`SHARED_SQL`, :func:`check_not_shared`): a session that lists
  another client's LISTEN is shared between clients. The PubSubs do the
  same, once per connection, when they find a pooler in between (the pid
  :data:`BACKEND_PID_SQL` returns differs from the one given at login):
  :func:`check_pinned`;
* a hot standby (``pg_is_in_recovery()``), where LISTEN and NOTIFY cannot run:
  :func:`check_recovery` raises :class:`~pgcast.HotStandbyError`;
* a full notification queue (``pg_notification_queue_usage()``): a listener
  that stopped reading makes every NOTIFY fail once the queue is full;
* durable channels' named consumers that lost messages or fall behind the
  retention (``pgcast consumers`` lists them: :func:`pgcast.durable.consumers`).

The decisions are pure functions of the rows the server returned, so the sync
and the asyncio PubSub run the same SQL (:data:`VERIFY_SQL`,
:data:`QUEUE_USAGE_SQL`) and the same checks. :func:`run_checks` is the
report behind ``pgcast doctor``: it never raises for a failed check, it
returns every :class:`Check` with its verdict and the server's notify-related
settings.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import psycopg

from ._channels import quote_ident
from ._core import connect_args
from ._errors import HotStandbyError, ListenNotEffectiveError, PgcastError
from ._health import PROBE_PREFIX

__all__ = [
    "BACKEND_PID_SQL",
    "QUEUE_USAGE_SQL",
    "SETTINGS",
    "SHARED_SQL",
    "VERIFY_NEW_SQL",
    "VERIFY_SQL",
    "Check",
    "Report",
    "check_listen",
    "check_listening",
    "check_not_shared",
    "check_pinned",
    "check_recovery",
    "check_session",
    "queue_usage",
    "run_checks",
    "unverified_pool",
]

#: One round trip after LISTEN: is the server a standby, what does this
#: session listen to.
VERIFY_SQL = "SELECT pg_is_in_recovery(), array(SELECT pg_listening_channels())::text[]"
#: After a LISTEN: is the server a standby, which of the channels given (those
#: just LISTENed, and the probe's) this session lists, and how many it lists in
#: all, in one pass over ``pg_listening_channels()``. Its answer has the size
#: of the LISTEN, where :data:`VERIFY_SQL`'s has the size of everything
#: listened to (10,000 channels LISTENed one at a time took 17 s with it,
#: reading that array again each time; see :func:`check_listen`).
VERIFY_NEW_SQL = (
    "SELECT pg_is_in_recovery(), array_agg(c) FILTER (WHERE c = ANY(%s::text[])),"
    " count(*) FROM pg_listening_channels() c"
)
#: The server process of this session; behind a pooler it differs from the
#: pid the login answered with (PgBouncer makes that one up).
BACKEND_PID_SQL = "SELECT pg_backend_pid()"
#: Run on a second connection: what its server session listens to.
SHARED_SQL = "SELECT array(SELECT pg_listening_channels())::text[]"
#: The fraction of the notification queue in use, 0.0 to 1.0.
QUEUE_USAGE_SQL = "SELECT pg_notification_queue_usage()"

#: The server settings ``pgcast doctor`` prints (those a server lacks are
#: reported as absent: ``max_notify_queue_pages`` exists from PostgreSQL 17).
SETTINGS = (
    "server_version",
    "max_notify_queue_pages",
    "max_connections",
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
)
SETTINGS_SQL = "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s) ORDER BY name"

#: Queue usage above which ``pgcast doctor`` warns.
QUEUE_WARN = 0.5

_POOLER_HINT = (
    "this usually means a connection pooler in transaction or statement mode "
    "(PgBouncer pool_mode=transaction) sits between pgcast and PostgreSQL, and "
    "ran the LISTEN on a server session that was then given to another client. "
    "Listeners need a direct connection or a session-mode pool"
)
_NOT_PINNED = (
    "LISTEN through a connection pooler does not hold unless it pins one server "
    "session: use a session-mode pool or connect directly"
)


def _shown(channels: Iterable[str]) -> frozenset[str]:
    """The channels a user named: the health check's private one left out."""
    return frozenset(c for c in channels if not c.startswith(PROBE_PREFIX))


def _names(channels: frozenset[str]) -> str:
    names = ", ".join(repr(c) for c in sorted(channels)[:5])
    more = f" and {len(channels) - 5} more" if len(channels) > 5 else ""
    return names + more


def check_recovery(in_recovery: bool) -> None:
    """Raise :class:`HotStandbyError` if the server is in recovery."""
    if in_recovery:
        raise HotStandbyError(
            "the server is a hot standby (pg_is_in_recovery() is true): LISTEN and "
            "NOTIFY only work on the primary; connect to the primary, for example "
            "with target_session_attrs=read-write in the DSN"
        )


def check_listening(expected: Iterable[str], listening: Iterable[str]) -> None:
    """Raise :class:`ListenNotEffectiveError` unless every *expected* channel
    is among those the server session reports (*listening*)."""
    missing = frozenset(expected) - frozenset(listening)
    if missing:
        shown = _shown(missing)
        names = _names(shown) if shown else "the health check's channel"
        raise ListenNotEffectiveError(
            f"LISTEN did not take effect: pg_listening_channels() on this session does "
            f"not list {names}; {_POOLER_HINT}",
            shown,
        )


def check_not_shared(channels: Iterable[str], listening_elsewhere: Iterable[str]) -> None:
    """Raise :class:`ListenNotEffectiveError` if another client's server
    session (its :data:`SHARED_SQL` row: *listening_elsewhere*) lists any of
    the *channels* this client LISTENed to: server sessions are shared."""
    shared = frozenset(channels) & frozenset(listening_elsewhere)
    if shared:
        names = ", ".join(repr(c) for c in sorted(shared)[:5])
        raise ListenNotEffectiveError(
            f"LISTEN is not this connection's own: another connection's server session "
            f"lists {names}, which this one listened to; {_POOLER_HINT}",
            shared,
        )


def check_pinned(channels: Iterable[str], listening_elsewhere: Iterable[str]) -> None:
    """Behind a pooler: raise :class:`ListenNotEffectiveError` if a second
    connection's server session (its :data:`SHARED_SQL` row:
    *listening_elsewhere*) lists any of the *channels* this connection
    LISTENed to, i.e. the pool hands server sessions from client to client.

    A pool that pins one server session per client (session mode) gives the
    second connection another session, which lists none of them.
    """
    shared = frozenset(channels) & frozenset(listening_elsewhere)
    if shared:
        shown = _shown(shared)
        names = _names(shown) if shown else "this connection's channels"
        raise ListenNotEffectiveError(
            f"{_NOT_PINNED}. This connection goes through a pooler (PostgreSQL's "
            f"backend pid is not the one given at login), and a second connection's "
            f"server session lists {names}, which this one listened to: the pool hands "
            "server sessions from client to client (PgBouncer pool_mode=transaction or "
            "statement), and drops the notifications of a session no client holds",
            shown,
        )


def unverified_pool(channels: Iterable[str], error: BaseException) -> ListenNotEffectiveError:
    """The error when the second connection of :func:`check_pinned` failed:
    whether the pool pins server sessions is unknown, so LISTEN is not trusted."""
    return ListenNotEffectiveError(
        f"{_NOT_PINNED}. This connection goes through a pooler (PostgreSQL's backend "
        f"pid is not the one given at login), and whether the pool pins its server "
        f"session could not be checked: a second connection failed: {error}",
        _shown(channels),
    )


def check_session(expected: Iterable[str], row: Sequence[Any] | None) -> None:
    """Check the row :data:`VERIFY_SQL` returned against the *expected* channels."""
    if row is None:
        raise ListenNotEffectiveError(f"{VERIFY_SQL!r} returned no row; {_POOLER_HINT}")
    in_recovery, listening = row
    check_recovery(bool(in_recovery))
    check_listening(expected, listening or ())


def check_listen(checked: Sequence[str], total: int, row: Sequence[Any] | None) -> bool:
    """Check the row :data:`VERIFY_NEW_SQL` returned for *checked*: raise as
    :func:`check_session` does for a standby or a channel of *checked* not
    listed. Return False when the session lists fewer than *total* channels in
    all: some listened to before are missing (:func:`check_shortfall` names
    them)."""
    if row is None:
        raise ListenNotEffectiveError(f"{VERIFY_NEW_SQL!r} returned no row; {_POOLER_HINT}")
    in_recovery, listed, count = row
    check_recovery(bool(in_recovery))
    check_listening(checked, listed or ())
    return int(count) >= total


def check_shortfall(expected: Iterable[str], row: Sequence[Any] | None) -> NoReturn:
    """After :func:`check_listen` returned False: raise, naming what the row
    :data:`VERIFY_SQL` returned lacks of *expected*, or (when it lacks nothing:
    the two statements ran on different server sessions) the pooler."""
    check_session(expected, row)
    raise ListenNotEffectiveError(
        f"LISTEN did not take effect: the server session that answered listed fewer "
        f"channels than this connection listens to; {_POOLER_HINT}"
    )


def queue_usage(conn: psycopg.Connection[Any]) -> float:
    """``pg_notification_queue_usage()`` on *conn*: 0.0 (empty) to 1.0 (full)."""
    row = conn.execute(QUEUE_USAGE_SQL).fetchone()
    return float(row[0]) if row else 0.0


# -- pgcast doctor -------------------------------------------------------------

Verdict = Literal["ok", "warn", "fail"]


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the doctor's report."""

    name: str
    """What was checked."""
    verdict: Verdict
    """``ok``, ``warn`` (works, but look at it) or ``fail``."""
    detail: str
    """What was found, or what is wrong and what to do."""


@dataclass(slots=True)
class Report:
    """Everything ``pgcast doctor`` found."""

    checks: list[Check] = field(default_factory=list)
    """The checks, in the order they ran."""
    settings: dict[str, str | None] = field(default_factory=dict)
    """Each of :data:`SETTINGS`, with its unit; ``None`` when the server lacks it."""

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return all(c.verdict != "fail" for c in self.checks)


def _setting_text(setting: str, unit: str | None) -> str:
    return f"{setting} {unit}".rstrip() if unit and unit not in ("", None) else setting


def run_checks(
    conninfo: str, *, timeout: float = 5.0, health_check_interval: float = 30.0
) -> Report:
    """Connect to *conninfo* and run every check; never raises for a failure.

    *timeout* bounds the notification round trip; *health_check_interval* is
    the one the listeners use, compared with ``idle_session_timeout``.
    """
    report = Report()
    add = report.checks.append
    dsn, options = connect_args(conninfo, {})
    options["connect_timeout"] = max(1, round(timeout))
    started = time.perf_counter()
    try:
        conn = psycopg.Connection.connect(dsn, **options)
    except psycopg.Error as exc:
        add(Check("connect", "fail", f"cannot connect: {_one_line(exc)}"))
        return report
    with conn:
        info = conn.info
        elapsed = (time.perf_counter() - started) * 1000
        where = info.host if info.host.startswith("/") else f"{info.host}:{info.port}"
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        # A pooler answers the login itself, with a made-up backend pid.
        via = "" if pid == info.backend_pid else (
            f"; through a connection pooler or proxy (the connection was given backend "
            f"pid {info.backend_pid})")
        add(Check("connect", "ok", f"{where} database {info.dbname!r} as {info.user!r}, "
                  f"backend pid {pid} ({elapsed:.1f} ms){via}"))
        rows = conn.execute(SETTINGS_SQL, (list(SETTINGS),)).fetchall()
        found = {name: _setting_text(setting, unit) for name, setting, unit in rows}
        report.settings = {name: found.get(name) for name in SETTINGS}

        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        try:
            check_recovery(bool(row and row[0]))
            add(Check("primary", "ok", "pg_is_in_recovery() is false"))
            standby = False
        except HotStandbyError as exc:
            add(Check("primary", "fail", str(exc)))
            standby = True

        channel = f"pgcast.doctor.{uuid.uuid4().hex[:12]}"
        if standby:
            add(Check("listen", "fail", "skipped: a standby cannot LISTEN"))
        else:
            _check_listen(conn, lambda: psycopg.Connection.connect(dsn, **options),
                          channel, timeout, add)

        usage = float(conn.execute(QUEUE_USAGE_SQL).fetchone()[0])  # type: ignore[index]
        if usage >= QUEUE_WARN:
            add(Check("queue usage", "warn", f"{usage:.1%} of the notification queue is in use: "
                      "a listener is not reading; once full, every NOTIFY fails"))
        else:
            add(Check("queue usage", "ok", f"{usage:.2%} of the notification queue in use"))

        _check_consumers(conn, add)

        idle = _seconds(report.settings.get("idle_session_timeout"))
        if idle and health_check_interval and idle <= health_check_interval:
            add(Check("idle_session_timeout", "warn",
                      f"{idle:g} s ends idle sessions sooner than the {health_check_interval:g} s "
                      "health check keeps listeners busy: listeners will be reconnected often"))
    return report


def _check_consumers(conn: psycopg.Connection[Any], add: Callable[[Check], None]) -> None:
    """The named consumers' lag (``pgcast consumers``), when the pgcast
    schema is installed: a warning for any that lost messages or holds
    messages older than the default retention."""
    from .durable import consumers  # only the doctor needs it

    exists = conn.execute("SELECT to_regclass('pgcast.consumers') IS NOT NULL").fetchone()
    if not (exists and exists[0]):
        return
    try:
        lags = consumers(conn)
    except PgcastError as exc:
        add(Check("consumers", "warn", f"could not read pgcast.consumers: {exc}"))
        return
    if not lags:
        add(Check("consumers", "ok", "no named consumers"))
        return
    worst = max(lags, key=lambda lag: lag.behind)
    summary = (f"{len(lags)} named consumer(s); furthest behind: {worst.name!r} on "
               f"{worst.channel!r} by {worst.behind} message(s)")
    lost = [f"{lag.name!r} on {lag.channel!r}" for lag in lags if lag.status == "lost"]
    holding = [f"{lag.name!r} on {lag.channel!r}" for lag in lags if lag.status == "holding"]
    problems = []
    if lost:
        problems.append(f"lost unacknowledged messages (a gap on resume): {', '.join(lost[:5])}")
    if holding:
        problems.append("behind by more than the retention (prune keeps the log for them): "
                        + ", ".join(holding[:5]))
    if problems:
        add(Check("consumers", "warn", f"{summary}; " + "; ".join(problems)
                  + " (`pgcast consumers` lists them all)"))
    else:
        add(Check("consumers", "ok", summary))


def _check_listen(
    conn: psycopg.Connection[Any],
    connect_other: Callable[[], psycopg.Connection[Any]],
    channel: str,
    timeout: float,
    add: Any,
) -> None:
    try:
        conn.execute(f"LISTEN {quote_ident(channel)}")
        row = conn.execute(VERIFY_SQL).fetchone()
        check_session([channel], row)
    except ListenNotEffectiveError as exc:
        add(Check("listen", "fail", str(exc)))
        return
    except psycopg.Error as exc:
        add(Check("listen", "fail", f"LISTEN failed: {_one_line(exc)}"))
        return
    # A second connection asks whether its server session lists this one's
    # LISTEN (then a pooler shares sessions), and sends the NOTIFY, as a
    # listener's come from others: a session's own NOTIFY reaches it even
    # through a transaction-mode pooler, proving nothing.
    other: psycopg.Connection[Any] | None = None
    sender, source = conn, "this connection"
    try:
        other = sender = connect_other()
        source = "another connection"
    except psycopg.Error as exc:
        source += f" (a second one could not be opened: {_one_line(exc)})"
    try:
        if other is not None:
            row = other.execute(SHARED_SQL).fetchone()
            check_not_shared([channel], row[0] if row and row[0] else ())
        add(Check("listen", "ok", "pg_listening_channels() confirms LISTEN took effect"))
        started = time.perf_counter()
        sender.execute("SELECT pg_notify(%s, 'doctor')", (channel,))
        got = any(n.channel == channel for n in conn.notifies(timeout=timeout, stop_after=1))
        elapsed = (time.perf_counter() - started) * 1000
        if got:
            add(Check("round trip", "ok", f"a NOTIFY from {source} came back in {elapsed:.1f} ms"))
        else:
            add(Check("round trip", "fail", f"a NOTIFY from {source} did not come back "
                      f"within {timeout:g} s"))
    except ListenNotEffectiveError as exc:
        add(Check("listen", "fail", str(exc)))
    finally:
        if other is not None:
            other.close()
        conn.execute(f"UNLISTEN {quote_ident(channel)}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _seconds(text: str | None) -> float:
    """``idle_session_timeout`` as pg_settings shows it (``'0 ms'``, ``'60000 ms'``)."""
    if not text:
        return 0.0
    value, _, unit = text.partition(" ")
    try:
        number = float(value)
    except ValueError:
        return 0.0
    scale = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}.get(unit, 1.0)
    return number * scale
