"""The thread of :meth:`pgcast.PubSub.run_in_thread`.

A :class:`Runner` runs :meth:`pgcast.PubSub.run_forever` until it is stopped
or the PubSub is closed; an exception that ends it is kept in
:attr:`Runner.exception` (and raised in the thread, so ``threading.excepthook``
sees it), never lost.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .._errors import ClosedError

if TYPE_CHECKING:
    from ._pubsub import PubSub

__all__ = ["Runner"]


class Runner(threading.Thread):
    """A thread delivering a PubSub's events to its handlers; see
    :meth:`PubSub.run_in_thread`."""

    def __init__(self, pubsub: PubSub, *, daemon: bool = True) -> None:
        super().__init__(name="pgcast-runner", daemon=daemon)
        self.pubsub = pubsub
        self._stop_event = threading.Event()
        self.exception: BaseException | None = None

    def run(self) -> None:
        try:
            self.pubsub.run_forever(self._stop_event)
        except ClosedError:
            pass
        except BaseException as exc:
            self.exception = exc
            raise

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop delivering and wait up to *timeout* seconds for the thread.

        :raises TimeoutError: a handler is still running after *timeout*.
        """
        self._stop_event.set()
        self.pubsub._wake()
        if threading.current_thread() is not self:
            self.join(timeout)
            if self.is_alive():
                raise TimeoutError(f"pgcast runner did not stop within {timeout} s")
