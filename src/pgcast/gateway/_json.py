"""Strict JSON for the gateway's client frames, pure: what browsers and
PostgreSQL accept and nothing else (:func:`loads`), and how a refused value
is named in an error. Used by :mod:`pgcast.gateway._protocol`, which
re-exports :func:`loads`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .._errors import ProtocolError

__all__ = ["loads"]

#: A JSON escape of a UTF-16 surrogate: only then can decoding make a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (JSON.parse rejects it)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a JSON number (it reads as {value})")
    return value


def loads(text: str) -> Any:
    """``json.loads`` with what browsers and PostgreSQL accept and nothing else.

    ``NaN``/``Infinity`` and numbers that overflow to infinity are refused (a
    browser's ``JSON.parse`` rejects them, so they must never be echoed or
    broadcast), and so is a lone surrogate escape such as ``"\\ud800"``: it
    decodes to a string no UTF-8 encoder accepts, so echoing it would fail
    half-way through a send instead of here. Surrogate *pairs* are fine.

    :raises ValueError: naming what was refused.
    """
    obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    if _SURROGATE_ESCAPE.search(text) is not None:
        _check_unicode(obj)
    return obj


def _check_unicode(value: object) -> None:
    # Bounded: json.loads already refused what nests past the recursion limit.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"a string holds a lone surrogate escape ({json.dumps(value[:20])}): "
                "not valid Unicode"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


def _utf8_size(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ProtocolError("frame is not valid Unicode") from None


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # never echo what cannot be sent
            text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
