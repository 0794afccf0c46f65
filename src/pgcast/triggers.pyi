"""Type stub: ``pgcast.triggers`` is :mod:`pgcast.feeds.triggers` (see pgcast/__init__.py)."""

from pgcast.feeds.triggers import *  # noqa: F403
from pgcast.feeds.triggers import __all__ as __all__
