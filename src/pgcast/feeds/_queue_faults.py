"""What the Worker does when the server refuses or ends a queue batch's
statements (a ``statement_timeout``, a ``lock_timeout``, an
``idle_in_transaction_session_timeout`` shorter than a handler): how long the
queue is held, and what the log and the error say. No I/O; the loop that
calls it is :mod:`pgcast.feeds._worker_async`.
"""

from __future__ import annotations

from ._worker_core import _QueueRoute, logger

__all__ = ["MIN_QUEUE_RETRY", "queue_connection_lost", "queue_refused"]

#: The shortest wait before a queue whose statement the server refused is
#: drained again, whatever its Retry policy says: never a hot loop.
MIN_QUEUE_RETRY = 0.1

#: SQLSTATEs of a server ending a session whose transaction stayed open too
#: long, and the setting that did it.
_TIMEOUT_SETTINGS = {
    "25P03": "idle_in_transaction_session_timeout",
    "25P04": "transaction_timeout",
    "57014": "statement_timeout",
}


def queue_refused(route: _QueueRoute, exc: BaseException, jobs: int, handled: bool,
                  now: float) -> None:
    """The server refused a statement of *route*'s batch on a connection that
    is still fine (a statement_timeout, a lock_timeout): the transaction was
    rolled back. Hold the queue for a backoff (its Retry policy's, at least
    ``MIN_QUEUE_RETRY``) and say so."""
    route.refused += 1
    delay = max(MIN_QUEUE_RETRY, route.retry.delay(route.refused))
    route.held_until = now + delay
    route.dirty = True
    logger.error(
        "pgcast worker: queue %r: the server refused the batch's statement (%s%s); "
        "%s rolled back into the queue%s, nothing lost; retrying in %.2f s",
        route.queue, _one_line(exc), _setting(exc), _jobs(jobs),
        ", their handler having run: it runs again" if handled else "", delay,
        extra={"handler": route.name, "attempt": route.refused})


def queue_connection_lost(route: _QueueRoute, exc: BaseException, jobs: int,
                          handled: bool, held_for: float | None) -> str:
    """What to say of a queue connection that ended under a batch: the
    message of the ConnectionLostError the session ends with."""
    held = "" if held_for is None else f" after {held_for:.1f} s in its transaction"
    advice = ""
    if getattr(exc, "sqlstate", None) in ("25P03", "25P04"):
        setting = _TIMEOUT_SETTINGS[exc.sqlstate]  # type: ignore[attr-defined]
        advice = (f"; make {setting} longer than the handler takes (for the worker's "
                  f"role, or in its DSN: options='-c {setting}=0')")
    return (
        f"the queue connection of {route.queue!r} ended{held} ({_one_line(exc)}"
        f"{_setting(exc)}): {_jobs(jobs)} rolled back into the queue"
        f"{', their handler having run: it runs again' if handled else ''}, nothing "
        f"lost{advice}"
    )


def _jobs(n: int) -> str:
    if n == 0:
        return "the claim was"  # before any job was taken
    return "1 job was" if n == 1 else f"{n} jobs were"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _setting(exc: BaseException) -> str:
    setting = _TIMEOUT_SETTINGS.get(getattr(exc, "sqlstate", None) or "")
    return f"; the server's {setting}" if setting else ""
