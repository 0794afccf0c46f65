"""Who may read and write which channels, and from which web origins.

The gateway asks an *authorizer* once per connection (WebSocket or SSE)::

    def authorizer(connection: HTTPConnection, token: str | None) -> Access: ...

(or an ``async def``). *connection* is the Starlette request or websocket, for
headers, cookies and the client address; *token* is found by
:func:`client_token`, in this order: an ``Authorization: Bearer`` header, the
WebSocket subprotocol ``pgcast.token.<token>`` (offered beside ``pgcast``), the
``token`` query parameter (for ``EventSource``, which can set neither headers
nor subprotocols; the gateway's log lines redact it), a cookie
(``pgcast_token`` unless configured otherwise). A WebSocket client may also
send no token in the handshake and authenticate with its first frame,
``{"type": "auth", "token": "..."}``. The authorizer returns an
:class:`Access`: two predicates on channel names, and optionally when the
access ends. To refuse the client it raises :class:`pgcast.AccessDenied`,
whose message the client sees (HTTP 403, or a close with code 4003).

Without an authorizer the gateway uses :func:`allow_list`: the same access for
everyone, subscribing to channels that match the ``allow`` globs and
publishing to those that match ``allow_publish`` (none by default).

Origins: a browser page on another site can open a WebSocket to the gateway
with the user's cookies, so :func:`origin_allowed` refuses any ``Origin`` that
is not the gateway's own unless it is configured; clients that send no
``Origin`` (not a browser) are not affected.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

__all__ = [
    "Access",
    "Authorizer",
    "allow_list",
    "bearer_token",
    "client_token",
    "globs_matcher",
    "metrics_refusal",
    "origin_allowed",
]


def _never(channel: str) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class Access:
    """What one client may do: predicates on exact channel names."""

    can_read: Callable[[str], bool] = _never
    """Whether the client may subscribe to the channel."""

    can_write: Callable[[str], bool] = _never
    """Whether the client may publish on the channel."""

    expires: float | None = None
    """When this access ends (Unix time, seconds), or None for never: the
    gateway closes the client then (code 4001) unless it sent a fresh token
    in an ``auth`` frame first."""

    def __post_init__(self) -> None:
        expires = self.expires
        if expires is None:
            return
        # A NaN expiry would fire at once and be sent as NaN, which JSON.parse
        # rejects; a string or a bool is a mistake made elsewhere.
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            raise TypeError(
                f"Access.expires must be a Unix time in seconds (a number) or None, "
                f"not {type(expires).__name__}"
            )
        if not math.isfinite(expires):
            raise ValueError(f"Access.expires must be a finite Unix time, not {expires}")

    @classmethod
    def globs(
        cls, read: Iterable[str] = (), write: Iterable[str] = (), expires: float | None = None
    ) -> Access:
        """Access by :mod:`fnmatch` globs, matched case-sensitively (channel
        names are exact): ``"orders.*"``, ``"user-[0-9]*"``, ``"*"``."""
        return cls(globs_matcher(read), globs_matcher(write), expires)


def globs_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A predicate: does a channel name match one of *patterns* (fnmatch
    globs, case-sensitive)?"""
    pats = tuple(dict.fromkeys(patterns))
    for p in pats:
        if not isinstance(p, str) or not p:
            raise ValueError(f"channel patterns must be non-empty strings, got {p!r}")
    if not pats:
        return _never
    if "*" in pats:
        return lambda channel: True
    exact = frozenset(p for p in pats if not any(ch in p for ch in "*?["))
    globs = tuple(p for p in pats if p not in exact)

    def match(channel: str) -> bool:
        return channel in exact or any(fnmatchcase(channel, g) for g in globs)

    return match


#: The authorizer hook: ``(connection, token) -> Access``, sync or async;
#: raises :class:`pgcast.AccessDenied` to refuse.
Authorizer: TypeAlias = "Callable[[HTTPConnection, str | None], Access | Awaitable[Access]]"


def allow_list(allow: Iterable[str] = (), allow_publish: Iterable[str] = ()) -> Authorizer:
    """The default authorizer: everyone may subscribe to channels matching
    *allow* and publish to channels matching *allow_publish*; the token is
    ignored."""
    access = Access.globs(allow, allow_publish)

    def authorize(connection: HTTPConnection, token: str | None) -> Access:
        return access

    return authorize


def bearer_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The client's token: ``?token=``, else ``Authorization: Bearer ...``."""
    token = query.get("token")
    if token:
        return token
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


#: The WebSocket subprotocol of the gateway's protocol; a client sending its
#: token as a subprotocol offers it too, and the gateway selects it.
SUBPROTOCOL = "pgcast"
#: The prefix of the subprotocol that carries a token: ``pgcast.token.<token>``.
TOKEN_SUBPROTOCOL = "pgcast.token."
#: The cookie read for a token unless configured otherwise.
TOKEN_COOKIE = "pgcast_token"


def client_token(connection: HTTPConnection, cookie: str | None = TOKEN_COOKIE) -> str | None:
    """The client's token, from (in this order) ``Authorization: Bearer``,
    a ``pgcast.token.<token>`` WebSocket subprotocol, the ``token`` query
    parameter, or the cookie named *cookie* (None: no cookie is read)."""
    auth = connection.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for offered in connection.scope.get("subprotocols") or ():
        if offered.startswith(TOKEN_SUBPROTOCOL) and len(offered) > len(TOKEN_SUBPROTOCOL):
            return str(offered[len(TOKEN_SUBPROTOCOL):])
    # A token the client put in the URL beats the cookie the browser adds by
    # itself: an ambient cookie (perhaps stale, perhaps set by a sibling
    # subdomain) must never override the one the page chose.
    token = connection.query_params.get("token")
    if token:
        return token
    if cookie and connection.cookies.get(cookie):
        return connection.cookies[cookie]
    return None


def origin_allowed(origin: str | None, host: str | None, allowed: frozenset[str] | None) -> bool:
    """Whether a request with header *origin* may connect.

    No ``Origin`` header: allowed (not a browser, which always sends one on
    WebSocket and cross-origin requests). *allowed* ``None`` means same
    origin only: the origin's host and port must be the request's ``Host``.
    Otherwise the origin must be in *allowed* (``scheme://host[:port]``, no
    trailing slash), or *allowed* contains ``"*"``.
    """
    if origin is None:
        return True
    if allowed is not None:
        return "*" in allowed or origin.rstrip("/") in allowed
    if not host:
        return False
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    default = 443 if parts.scheme == "https" else 80
    origin_host = parts.hostname.lower()
    if ":" in origin_host:
        origin_host = f"[{origin_host}]"
    want = f"{origin_host}:{port or default}"
    host = host.lower()
    has_port = "]:" in host if host.startswith("[") else ":" in host
    return (host if has_port else f"{host}:{default}") == want


def is_loopback(host: str | None) -> bool:
    """Whether *host* (a client address) is a loopback address."""
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def metrics_refusal(
    connection: HTTPConnection, token: str | None, public: bool
) -> tuple[int, str] | None:
    """Whether a request may read ``/metrics``: None if it may, else the
    HTTP status and the reason.

    With a *token*, a request must carry it (``Authorization: Bearer``),
    from any address; else with *public* anyone may; else only a client
    whose address (after a trusted proxy's forwarded headers) is a
    loopback address.
    """
    if token is not None:
        auth = connection.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        given = value.strip().encode() if scheme.lower() == "bearer" else b""
        if hmac.compare_digest(given, token.encode()):
            return None
        return 401, "/metrics needs the metrics token: Authorization: Bearer <token>"
    if public:
        return None
    client = connection.client
    if is_loopback(client.host if client is not None else None):
        return None
    return 403, ("/metrics is served to loopback clients only; set a metrics token "
                 "(metrics_token, --metrics-token-file, PGCAST_METRICS_TOKEN) for a "
                 "remote scraper, or metrics_public")
