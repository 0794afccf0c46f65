"""The thread of :meth:`pgcast.PubSub.run_in_thread`.

A :class:`Runner` runs :meth:`pgcast.PubSub.run_forever` until it is stopped
or the PubSub is closed; an exception that ends it is kept in
:attr:`Runner.exception` (and raised in the thread, so ``threading.excepthook``
sees it), never lost.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

from .._background import BackgroundThread
from .._errors import ClosedError

if TYPE_CHECKING:
    from ._pubsub import PubSub

__all__ = ["Runner"]


class Runner(BackgroundThread):
    """A thread delivering a PubSub's events to its handlers; see
    :meth:`PubSub.run_in_thread`."""

    _what = "pgcast runner"

    def __init__(self, pubsub: PubSub, *, daemon: bool = True) -> None:
        super().__init__(name="pgcast-runner", daemon=daemon)
        self.pubsub = pubsub
        self._stop_event = threading.Event()

    def _body(self) -> None:
        with contextlib.suppress(ClosedError):  # closed: delivery is over
            self.pubsub.run_forever(self._stop_event)

    def _ask_to_stop(self) -> None:
        self._stop_event.set()
        self.pubsub._wake()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop delivering and wait up to *timeout* seconds for the thread.

        :raises TimeoutError: a handler is still running after *timeout*.
        """
        super().stop(timeout)
