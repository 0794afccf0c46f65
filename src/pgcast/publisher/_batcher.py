"""The I/O-free core of :class:`pgcast.Publisher`: queue, batches, deadlines.

A Publisher gathers notifications from many threads (or tasks) and sends them
in few transactions. Everything it decides without a socket is here, once, for
the sync and the asyncio drivers in :mod:`pgcast.publisher`:

* :meth:`Batcher.add` files a checked message into the open :class:`Batch`
  (opening one when there is none or the last is full) and counts it against
  ``max_pending``; the driver first asks :meth:`Batcher.has_room` and applies
  the policy for a full buffer (wait, then raise).
* :meth:`Batcher.due_in` says how long the sender may still wait before the
  head batch must go: a batch goes ``interval`` seconds after its first
  message arrived, at once when it is full, when a flush covers it, or when the
  publisher is closing.
* :meth:`Batcher.wait_time` tells the sender whether to send now, wait, or
  end (closing, nothing left).
* :meth:`Batcher.take` hands the head batch to the sender, which sends it in
  one transaction and reports it with :meth:`Batcher.outcome` and
  :meth:`Batcher.finish`; failures
  are kept for the next :meth:`Batcher.take_failure` (``flush()`` and
  ``close()``).

Batches leave in the order they were opened and carry their messages in
publishing order, so one thread's notifications arrive in the order it
published them. The Batcher is not thread safe: drivers call it under their
own lock (or from one event loop).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

from .._channels import check_channel
from .._errors import ConnectionLostError, PublishError
from .._payload import Payload, encode_payload

__all__ = ["Batch", "Batcher", "check_message"]

H = TypeVar("H")


def check_message(channel: str, payload: Payload) -> tuple[str, str]:
    """Validate one notification for the queue: the checked channel and text.

    :raises InvalidChannelError: a channel PostgreSQL would mangle.
    :raises PayloadError: a payload NOTIFY cannot carry (too large, NUL...).
    """
    return check_channel(channel), encode_payload(payload)


class Batch(Generic[H]):
    """The notifications that go out in one transaction, and its driver's handle."""

    __slots__ = ("channels", "handle", "opened", "payloads", "seq")

    def __init__(self, seq: int, opened: float, handle: H) -> None:
        #: Position among all batches of the Publisher, from 1, in sending order.
        self.seq = seq
        #: When the first message arrived (the Batcher's clock).
        self.opened = opened
        #: The driver's future, resolved when the transaction committed or failed.
        self.handle = handle
        self.channels: list[str] = []
        self.payloads: list[str] = []

    def __len__(self) -> int:
        return len(self.channels)

    def messages(self) -> list[tuple[str, str]]:
        """``(channel, payload)`` pairs in publishing order."""
        return list(zip(self.channels, self.payloads, strict=True))


class Batcher(Generic[H]):
    """The queue of a Publisher; see the module docstring."""

    __slots__ = (
        "_failures",
        "_flush_upto",
        "_new_handle",
        "_opened",
        "_queue",
        "closing",
        "completed",
        "interval",
        "max_batch",
        "max_pending",
        "pending",
    )

    def __init__(
        self,
        new_handle: Callable[[], H],
        *,
        interval: float,
        max_batch: int,
        max_pending: int,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval >= 0:
            raise ValueError(f"interval must be a number of seconds >= 0, got {interval!r}")
        for name, value in (("max_batch", max_batch), ("max_pending", max_pending)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.interval = float(interval)
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._new_handle = new_handle
        self._queue: deque[Batch[H]] = deque()
        self._opened = 0  # batches opened so far: the seq of the newest
        #: Batches whose transaction finished (committed or failed), in order.
        self.completed = 0
        #: Messages queued and not yet taken by the sender.
        self.pending = 0
        #: True once close() began: no new messages, everything left goes now.
        self.closing = False
        self._flush_upto = 0
        self._failures: list[_Failure] = []

    # -- the publishing side ------------------------------------------------

    def has_room(self) -> bool:
        """Whether one more message fits under ``max_pending``."""
        return self.pending < self.max_pending

    def add(self, channel: str, payload: str, now: float) -> tuple[Batch[H], bool]:
        """Queue a checked message; return its batch and whether to wake the sender.

        The caller checked :meth:`has_room` and that the publisher is open.
        The sender needs waking when the message opened a batch (it has a new
        deadline) or filled one (it is due now).
        """
        queue = self._queue
        if queue and len(queue[-1].channels) < self.max_batch:
            batch = queue[-1]
            opened = False
        else:
            self._opened += 1
            batch = Batch(self._opened, now, self._new_handle())
            queue.append(batch)
            opened = True
        batch.channels.append(channel)
        batch.payloads.append(payload)
        self.pending += 1
        return batch, opened or len(batch.channels) >= self.max_batch

    def flush_mark(self) -> int:
        """Make every batch queued now due at once; return the seq to wait for.

        The flush is over when :attr:`completed` reaches the returned value.
        """
        self._flush_upto = self._opened
        return self._opened

    # -- the sending side -----------------------------------------------------

    def due_in(self, now: float) -> float | None:
        """Seconds before the head batch must be sent (0: now); None: queue empty."""
        if not self._queue:
            return None
        head = self._queue[0]
        if (
            self.closing
            or head.seq <= self._flush_upto
            or len(head.channels) >= self.max_batch
        ):
            return 0.0
        return max(0.0, head.opened + self.interval - now)

    def wait_time(self, now: float, idle: float) -> float | None:
        """How long the sender waits before the next batch: 0 when one must go
        now, *idle* when the queue is empty, None when it is empty and the
        publisher is closing (the sender ends)."""
        due = self.due_in(now)
        if due is None:
            return None if self.closing else idle
        return due

    def take(self) -> Batch[H]:
        """Remove the head batch for sending; no message joins it any more."""
        batch = self._queue.popleft()
        self.pending -= len(batch.channels)
        return batch

    def outcome(self, batch: Batch[H], cause: BaseException | None) -> PublishError | None:
        """Record the outcome of *batch*'s transaction (*cause*: why it failed).

        Returns the :class:`PublishError` to fail its handle with (kept for
        :meth:`take_failure` too), or None when it committed. The driver
        resolves the handle, then calls :meth:`finish`, so a flush that sees
        the batch finished also sees its handle resolved.
        """
        if cause is None:
            return None
        unknown = isinstance(cause, ConnectionLostError)
        if unknown:
            # Lost in flight: the commit may have happened, its answer lost.
            fate = ("whether it committed is unknown (the connection was lost before "
                    "the server answered): its notifications may or may not have been "
                    "sent, and are not sent again")
        else:
            fate = "none of its notifications was sent"
        error = PublishError(
            f"a Publisher transaction of {len(batch)} notifications failed and {fate}: "
            f"{cause}",
            batch.messages(),
        )
        error.__cause__ = cause
        self._failures.append(_Failure(batch.seq, error, unknown))
        return error

    def finish(self, batch: Batch[H]) -> None:
        """Mark *batch* finished: flushes waiting for it may return."""
        # Batches failed while an earlier one is in flight finish first.
        self.completed = max(self.completed, batch.seq)

    def fail_queued(self, cause: BaseException) -> list[tuple[Batch[H], PublishError]]:
        """Fail every queued batch (the sender cannot go on); return them for
        the driver to resolve their handles and :meth:`finish`."""
        failed = []
        while self._queue:
            batch = self.take()
            error = self.outcome(batch, cause)
            assert error is not None
            failed.append((batch, error))
        return failed

    def take_failure(self) -> PublishError | None:
        """The failures since the last call, as one error (None if there were none).

        Its :attr:`~PublishError.messages` are those of every failed
        transaction, in the order they were published (a batch stuck in
        flight fails after those queued behind it, when close() gives up);
        its message counts the notifications not sent and those whose
        transaction's outcome is unknown; its cause is the first failure's.
        """
        failures, self._failures = sorted(self._failures, key=lambda f: f.seq), []
        if not failures:
            return None
        if len(failures) == 1:
            return failures[0].error
        messages = [m for f in failures for m in f.error.messages]
        unknown = sum(len(f.error.messages) for f in failures if f.unknown)
        fates = []
        if unknown:
            fates.append(f"{unknown} may or may not have been sent (their connection was "
                         f"lost before the server answered; not sent again)")
        if len(messages) - unknown:
            fates.append(f"{len(messages) - unknown} were not sent")
        error = PublishError(
            f"{len(failures)} Publisher transactions failed; of their {len(messages)} "
            f"notifications, {' and '.join(fates)}. The first failure: {failures[0].error}",
            messages,
        )
        error.__cause__ = failures[0].error.__cause__
        return error


class _Failure(NamedTuple):
    """A failed batch, kept for :meth:`Batcher.take_failure`."""

    seq: int
    error: PublishError
    #: Whether its transaction may have committed (lost in flight).
    unknown: bool
