"""``with`` and ``async with`` for objects that have a ``close()``.

Every pgcast object that holds a resource is closed by its ``close()`` (sync)
or ``await close()`` (asyncio), and is its own context manager: the block
yields the object itself and closes it on the way out, whatever happened in
it (exceptions propagate). :class:`Closing` and :class:`AsyncClosing` write
that protocol once for every such class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

__all__ = ["AsyncClosing", "Closing"]


class Closing(ABC):
    """``with obj:`` yields *obj* and calls ``obj.close()`` at the end."""

    @abstractmethod
    def close(self) -> None:
        """Release what the object holds."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClosing(ABC):
    """``async with obj:`` yields *obj* and awaits ``obj.close()`` at the end."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the object holds."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
