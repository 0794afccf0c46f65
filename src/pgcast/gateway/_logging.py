"""Log lines without secrets: tokens in URLs are redacted before any handler
writes them.

Browsers cannot set headers on an ``EventSource``, so ``?token=`` stays a
way to authenticate on ``/sse`` (and on ``/ws`` for old clients), and the
ASGI server's access log and its WebSocket ``[accepted]`` lines print the
path with its query string. :class:`RedactTokens` replaces the value of
every query parameter that the gateway reads as a token, however its name
is percent-encoded (``tok%65n=`` is ``token=`` to the gateway, so it must be
to the filter too), in the record's message and arguments.

:func:`log_config` is uvicorn's logging configuration with the filter on
each handler; ``pgcast serve`` and :func:`pgcast.gateway._serve.config` use
it (a ``log_config`` of your own replaces it: add the filter to it).
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any
from urllib.parse import unquote_plus

__all__ = ["TOKEN_PARAMETERS", "RedactTokens", "log_config", "redact"]

#: Query parameters whose values are secrets (compared after percent-decoding,
#: case-insensitively).
TOKEN_PARAMETERS = frozenset({"token", "access_token", "jwt", "auth", "authorization"})

REDACTED = "[redacted]"

# A query parameter: after ? or &, a name, =, a value up to the next & or
# whatever ends a URL inside a log line.
_PARAMETER = re.compile(r"([?&;])([^=&;\s\"'#]*)=([^&;\s\"'#]*)")


def _replace(match: re.Match[str]) -> str:
    name = unquote_plus(match.group(2)).strip().lower()
    if name in TOKEN_PARAMETERS:
        return f"{match.group(1)}{match.group(2)}={REDACTED}"
    return match.group(0)


def redact(text: str) -> str:
    """*text* with the value of every token parameter of a URL replaced."""
    if "=" not in text:
        return text
    return _PARAMETER.sub(_replace, text)


class RedactTokens(logging.Filter):
    """A logging filter that redacts token parameters; it never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        elif isinstance(args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in args.items()}
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's default logging configuration, with :class:`RedactTokens`
    on every handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": f"{__name__}.RedactTokens"}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_tokens")
    return config
