"""Type stub: ``pgcast.queue`` is :mod:`pgcast.feeds.queue` (see pgcast/__init__.py)."""

from pgcast.feeds.queue import *  # noqa: F403
from pgcast.feeds.queue import __all__ as __all__
