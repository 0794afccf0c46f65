"""Type stub: ``pgcast.worker`` is :mod:`pgcast.feeds.worker` (see pgcast/__init__.py)."""

from pgcast.feeds.worker import *  # noqa: F403
from pgcast.feeds.worker import __all__ as __all__
