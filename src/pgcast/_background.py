"""A thread that runs until it is stopped, and keeps what ended it.

The base of :class:`pgcast.Runner` (``PubSub.run_in_thread()``) and
:class:`pgcast.WorkerThread` (``Worker.run_in_thread()``): an exception that
ends the thread is kept in :attr:`BackgroundThread.exception` (and raised in
the thread, so ``threading.excepthook`` sees it), never lost; ``stop()`` asks
the loop to end and waits for it within a timeout, or, called from the thread
itself (a handler), only asks.
"""

from __future__ import annotations

import threading

__all__ = ["BackgroundThread"]


class BackgroundThread(threading.Thread):
    """Runs :meth:`_body` until :meth:`_ask_to_stop` makes it return."""

    #: What ``stop()`` says it was waiting for, in its TimeoutError.
    _what = "pgcast thread"

    def __init__(self, *, name: str, daemon: bool | None) -> None:
        super().__init__(name=name, daemon=daemon)
        #: What ended the thread, if an exception did.
        self.exception: BaseException | None = None

    def _body(self) -> None:
        raise NotImplementedError

    def _ask_to_stop(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        """Run the loop; keep what it raised in :attr:`exception`."""
        try:
            self._body()
        except BaseException as exc:
            self.exception = exc
            raise

    def stop(self, timeout: float | None) -> None:
        """Ask the loop to end and wait up to *timeout* seconds for the thread
        (not when called from the thread itself: a handler may stop it).

        :raises TimeoutError: a handler is still running after *timeout*.
        """
        self._ask_to_stop()
        if threading.current_thread() is not self:
            self.join(timeout)
            if self.is_alive():
                raise TimeoutError(f"{self._what} did not stop within {timeout} s")
