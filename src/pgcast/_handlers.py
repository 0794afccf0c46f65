"""The callback interface of a PubSub (``subscribe()``, ``run()``): its
handlers per channel, and the delivery of an event to them. I/O-free, part of
:class:`pgcast._core.Core`; the drivers run what a coroutine function returns.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TypeAlias

from ._channels import check_channel
from ._checks import is_async_callable
from ._event import Event
from ._gap import Gap
from ._logfields import event_fields
from ._reconnect import Reconnected

__all__ = ["ExceptionHandler", "Handler", "Handlers"]

logger = logging.getLogger("pgcast")

#: A callback for :meth:`PubSub.subscribe`: a function or a coroutine function.
Handler: TypeAlias = Callable[[Event], object]
#: Called with the exception a handler raised and the event it was handling.
ExceptionHandler: TypeAlias = Callable[[BaseException, Event], None]


class Handlers:
    """A PubSub's handlers, and the delivery of events to them."""

    __slots__ = ("_async_handlers", "exception_handler", "handlers")

    def __init__(self) -> None:
        self.handlers: dict[str, list[Handler]] = {}
        self._async_handlers: set[Handler] = set()
        self.exception_handler: ExceptionHandler | None = None

    def add_handler(self, channel: str, handler: Handler) -> None:
        check_channel(channel)
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        if is_async_callable(handler):
            self._async_handlers.add(handler)
        self.handlers.setdefault(channel, []).append(handler)

    def remove_handlers(self, channel: str) -> None:
        check_channel(channel)
        self.handlers.pop(channel, None)

    def is_async(self, handler: Handler) -> bool:
        return handler in self._async_handlers

    def deliver(self, event: Event | Reconnected | Gap | None) -> Iterable[Awaitable[object]]:
        """Call the handlers of *event*'s channel in order (what ``run()``
        does with each event; markers and idle ``None`` go to none).

        A plain function is called here; what a coroutine function returns is
        yielded, for the driver to run to completion before the next handler
        is called, and to pass to :meth:`handler_failed` if it raises. A
        handler that raises goes to :meth:`handler_failed`; delivery goes on.
        """
        if event is None or isinstance(event, Reconnected | Gap):
            return ()  # markers went to on_reconnect and on_gap already
        handlers = self.handlers.get(event.channel)
        if not handlers:
            return ()
        if self._async_handlers:
            return self._deliver_mixed(event, handlers)
        # Only plain functions: no generator per event (the callbacks'
        # receive rate, benchmarks/bench_receive.py).
        for handler in handlers:
            try:
                handler(event)
            except Exception as exc:
                self.handler_failed(exc, event)
        return ()

    def _deliver_mixed(self, event: Event, handlers: list[Handler]) -> Iterator[Awaitable[object]]:
        async_handlers = self._async_handlers
        for handler in handlers:
            try:
                result = handler(event)
                if handler in async_handlers:
                    yield result  # type: ignore[misc]
            except Exception as exc:
                self.handler_failed(exc, event)

    def handler_failed(self, exc: BaseException, event: Event) -> None:
        """Report a handler's exception; never raises, so delivery goes on."""
        handler = self.exception_handler
        if handler is not None:
            try:
                handler(exc, event)
            except Exception:
                logger.exception("pgcast exception handler failed on %r", event,
                                 extra=event_fields(event))
            return
        logger.error("pgcast handler failed on %r", event, exc_info=exc,
                     extra=event_fields(event))
