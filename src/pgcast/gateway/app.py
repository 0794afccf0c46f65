"""The gateway as a Starlette application: :func:`create_app`.

Routes: ``/ws`` (:mod:`.websocket`), ``/sse`` (:mod:`.sse`), ``/healthz``,
``/metrics``, the browser client ``/pgcast.js`` and its types ``/pgcast.d.ts``
(files of ``static/``), and with ``demo_page=True`` the three-bar demo page at
``/``.

The database connection is opened by the app's lifespan when it runs
standalone (``pgcast serve``, ``uvicorn module:app``). Mounted inside another
application, whose server does not run a sub-app's lifespan, the gateway
connects at its first request instead; run ``app.router.lifespan_context(app)``
from the host's own lifespan to connect at start-up and close cleanly.
The app's :attr:`~pgcast.gateway.GatewayApp.gateway` (a
:class:`~pgcast.gateway.Gateway`) is the public handle for the host: publish
from its routes, ``async with app.gateway.running():`` in its lifespan. (The
driver, a :class:`~pgcast.gateway._hub.Hub`, is ``app.state.pgcast_gateway``.)
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from .._backoff import Backoff
from . import _metrics
from ._client import DEFAULT_PER_ADDRESS, GATEWAY_BACKOFF, Settings
from ._gateway import Gateway, GatewayApp
from ._hub import Hub
from ._ratelimit import RateLimits
from ._router import Overflow
from .auth import Authorizer, allow_list, metrics_refusal
from .sse import SSEEndpoint
from .websocket import WebSocketEndpoint

__all__ = ["create_app"]

STATIC_DIR = Path(__file__).parent / "static"


_DEFAULT_LIMITS = RateLimits()


def create_app(
    dsn: str = "",
    *,
    allow: Iterable[str] = (),
    allow_publish: Iterable[str] = (),
    authorizer: Authorizer | None = None,
    allowed_origins: Iterable[str] | None = None,
    allowed_hosts: Iterable[str] | None = None,
    max_clients: int = 10_000,
    max_subscriptions: int = 100,
    max_channels: int | None = 10_000,
    max_frame_bytes: int = 16 * 1024,
    queue_size: int = 1000,
    overflow: str = "disconnect",
    heartbeat: float = 15.0,
    database_timeout: float = 10.0,
    replay_wait: float = 10.0,
    close_timeout: float = 2.0,
    metrics_cache: float = 5.0,
    durable: Iterable[str] = (),
    demo_page: bool = False,
    demo_command: str | None = None,
    connect_kwargs: Mapping[str, Any] | None = None,
    token_cookie: str | None = "pgcast_token",
    auth_timeout: float = 10.0,
    rate_limits: RateLimits | None = _DEFAULT_LIMITS,
    max_clients_per_address: int | None = DEFAULT_PER_ADDRESS,
    max_channels_per_address: int | Literal["auto"] | None = "auto",
    reconnect_backoff: Backoff | None = None,
    metrics_token: str | None = None,
    metrics_public: bool = False,
) -> GatewayApp:
    """An ASGI app pushing PostgreSQL notifications to WebSocket and SSE clients.

    One LISTEN connection to *dsn* (empty: ``DATABASE_URL``, then libpq's
    ``PG*`` variables) serves every client of the process.

    :param allow: globs of the channels clients may subscribe to (default: none).
    :param allow_publish: globs of the channels clients may publish on (default: none).
    :param authorizer: ``(connection, token) -> Access`` (sync or async),
        instead of *allow* and *allow_publish*; see :mod:`pgcast.gateway.auth`.
    :param allowed_origins: the ``Origin`` values browsers may connect from,
        as ``scheme://host[:port]``, or ``["*"]`` for any; ``None`` (default)
        allows the gateway's own origin only.
    :param allowed_hosts: the ``Host`` header values (names, without the
        port; ``"*.example.com"`` for subdomains) requests may carry; any
        other gets 400 ``Invalid host header``, on every route. ``None``
        (default) allows any. Set it whenever browsers reach the gateway:
        the same-origin check alone does not stop DNS rebinding (a page of
        ``evil.example`` whose name is made to point at the gateway has the
        same origin as the ``Host`` it sends). ``pgcast serve`` sets it to
        the loopback names when it listens on a loopback address.
    :param max_clients: connected clients at once; more are refused (503).
    :param max_subscriptions: channels per client.
    :param max_channels: distinct channels of every client together, that is
        LISTENs on the gateway's connection (None: no limit). A subscribe
        that would add more is refused; PostgreSQL scans a connection's list
        of channels on each LISTEN and each notification, so one client
        (100 channels per connection, many connections) could otherwise slow
        the gateway down for everyone.
    :param max_channels_per_address: channels one client address (an IPv6
        /64) may create, that is subscribe to while no client has them, and
        that still have subscribers; default ``"auto"``, a quarter of
        *max_channels*; None for no cap. Without it one address (many
        connections of *max_subscriptions* new channels each) could take
        all of *max_channels*, and no one else could subscribe to a channel
        nobody had yet. Channels other clients have cost nothing.
    :param max_frame_bytes: the largest client frame accepted, in bytes. A
        bigger one gets an error frame; under ``pgcast serve`` (and
        :func:`pgcast.gateway.serve`) one over four times this closes the
        connection (1009) before it is read.
    :param queue_size: frames queued per client before *overflow* applies.
    :param overflow: ``"disconnect"`` (close code 4000) or ``"drop-oldest"``
        (the oldest frames go; the client gets a ``dropped`` notice and
        ``pgcast_gateway_dropped_total`` counts them).
    :param heartbeat: seconds between SSE heartbeat comments.
    :param database_timeout: how long a request waits for a lost database
        connection to come back before it gets an error.
    :param replay_wait: seconds a resume's query waits for its turn on the
        gateway's one replay connection; over it the resume fails with an
        error naming this setting, and nothing changed (subscribe again).
        Waiting queries go least served client first, so a short resume
        passes long ones.
    :param close_timeout: how long closing a client (or all, at shutdown) may take.
    :param metrics_cache: seconds the NOTIFY queue usage in ``/metrics`` is cached.
    :param durable: globs of durable channels (:mod:`pgcast.durable`): LISTENed
        durably, so the gateway misses none of their messages across its own
        reconnects, and resumable by clients from a log position (``since``
        in a subscribe frame, ``Last-Event-ID`` or ``?since=`` on SSE).
    :param demo_page: serve the three-bar demo page at ``/``.
    :param demo_command: the command the demo page shows for moving a bar.
    :param connect_kwargs: extra arguments for the database connection.
    :param token_cookie: the cookie a client's token is read from (None: no
        cookie is read; never read when *allowed_origins* allows ``"*"``, as
        any site's page could then use the user's cookie); see
        :func:`pgcast.gateway.auth.client_token` for every way a token may
        come, and the order.
    :param rate_limits: each client's rate limits (:class:`RateLimits`:
        publishes, payload bytes and other requests per second, and when a
        client over them is closed with 4029); None for none.
    :param max_clients_per_address: connections at once from one client
        address (WebSocket and SSE together; more get HTTP 429); an IPv6
        address counts as its /64. Default 1000: raise it (None: no cap)
        when more users than that share one address (a corporate or
        carrier-grade NAT). Behind a proxy, every client has the proxy's
        address unless the server trusts its forwarded headers (uvicorn's
        ``forwarded_allow_ips``): trust them, or the cap is the proxy's.
    :param auth_timeout: seconds a WebSocket client that gave no token in the
        handshake has to send ``{"type": "auth", "token": ...}`` first.
    :param metrics_token: a secret ``/metrics`` then requires, from any
        address, as ``Authorization: Bearer <token>`` (at least 16
        characters). Without it ``/metrics`` answers loopback clients only
        (after a trusted proxy's forwarded headers), unless *metrics_public*.
        It shows no channel names nor addresses, but the number of clients
        and channels, the traffic, refusals and the server process id.
        ``/healthz`` stays open to all (probes need it) and says up or
        down; the server process id only to those who may read ``/metrics``.
    :param metrics_public: serve ``/metrics`` to anyone (when no token).
    :param reconnect_backoff: how the lost database connection is retried (a
        :class:`pgcast.Backoff`; default: at once, then 0.1 s growing to 5 s
        with full jitter). The gateway never gives up its database: when a
        series with ``max_attempts`` or ``max_time`` ends, another starts
        after ``maximum`` seconds.
    """
    if authorizer is not None and (list(allow) or list(allow_publish)):
        raise ValueError("pass either an authorizer or allow/allow_publish globs, not both")
    if overflow not in tuple(Overflow):
        raise ValueError(
            f"overflow must be one of {', '.join(repr(str(o)) for o in Overflow)}, "
            f"not {overflow!r}"
        )
    hosts = _check_hosts(allowed_hosts)
    if metrics_token is not None and (not isinstance(metrics_token, str)
                                      or len(metrics_token) < 16
                                      or not metrics_token.isprintable()
                                      or metrics_token != metrics_token.strip()):
        raise ValueError("metrics_token must be a string of at least 16 printable "
                         "characters without surrounding spaces")
    _check_cookie_name(token_cookie)
    origins = None if allowed_origins is None else frozenset(
        o.rstrip("/") for o in allowed_origins
    )
    if origins is not None and "*" in origins:
        # Any site may connect: a cookie would be sent by the user's browser
        # to a page of any site (cross-site WebSocket hijacking), so no
        # cookie is read as a token.
        token_cookie = None
    settings = Settings(
        dsn=dsn,
        authorizer=authorizer or allow_list(allow, allow_publish),
        allowed_origins=origins,
        max_clients=max_clients,
        max_subscriptions=max_subscriptions,
        max_channels=max_channels,
        max_frame_bytes=max_frame_bytes,
        queue_size=queue_size,
        overflow=Overflow(overflow),
        heartbeat=heartbeat,
        database_timeout=database_timeout,
        replay_wait=replay_wait,
        close_timeout=close_timeout,
        metrics_cache=metrics_cache,
        durable=tuple(durable),
        connect_kwargs=dict(connect_kwargs or {}),
        token_cookie=token_cookie,
        auth_timeout=auth_timeout,
        rate_limits=rate_limits,
        max_clients_per_address=max_clients_per_address,
        max_channels_per_address=max_channels_per_address,
        reconnect_backoff=GATEWAY_BACKOFF if reconnect_backoff is None else reconnect_backoff,
    )
    hub = Hub(settings)
    gateway = Gateway(hub)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await hub.close()

    async def healthz(request: Request) -> Response:
        await gateway.start_quietly()
        if hub.database_up:
            body: dict[str, Any] = {"status": "ok", "database": "up"}
            if metrics_refusal(request, metrics_token, metrics_public) is None:
                body["backend_pid"] = hub.backend_pid  # to whoever may read /metrics
            return JSONResponse(body)
        return JSONResponse({"status": "unavailable", "database": "down"}, status_code=503)

    async def metrics(request: Request) -> Response:
        refusal = metrics_refusal(request, metrics_token, metrics_public)
        if refusal is not None:
            status, reason = refusal
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return PlainTextResponse(reason + "\n", status_code=status, headers=headers)
        await gateway.start_quietly()
        return PlainTextResponse(await hub.metrics(), media_type=_metrics.CONTENT_TYPE)

    routes: list[Any] = [
        WebSocketRoute("/ws", gateway.wrap_asgi(WebSocketEndpoint(hub))),
        Route("/sse", gateway.wrap_asgi(SSEEndpoint(hub))),
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        *_client_routes(),
    ]
    if demo_page:
        page = _demo_page(demo_command)

        async def index(request: Request) -> Response:
            return HTMLResponse(page)

        routes.append(Route("/", index))
        routes.append(Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"))
    middleware = []
    if hosts is not None:
        # Starlette's own check, before routing: every route, HTTP and WebSocket.
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=hosts,
                                     www_redirect=False))
    app = GatewayApp(routes=routes, lifespan=lifespan, middleware=middleware)
    app.gateway = gateway
    app.state.pgcast_gateway = hub
    return app


#: The browser client's files, served at ``/<name>``, and their content types.
CLIENT_FILES = {
    "pgcast.js": "text/javascript; charset=utf-8",
    "pgcast.d.ts": "application/typescript; charset=utf-8",
}


def _client_routes() -> list[Route]:
    """``/pgcast.js`` and ``/pgcast.d.ts``: read once, served as they are.

    Public files, so any origin may load them (a page of an allowed origin
    imports the module from the gateway: a module script needs CORS);
    ``no-cache`` makes browsers revalidate, so an upgraded gateway serves its
    own client.
    """
    routes = []
    for name, media_type in CLIENT_FILES.items():
        body = (STATIC_DIR / name).read_bytes()
        headers = {"Cache-Control": "no-cache", "Access-Control-Allow-Origin": "*",
                   "X-Content-Type-Options": "nosniff"}

        async def serve(request: Request, body: bytes = body, media_type: str = media_type,
                        headers: dict[str, str] = headers) -> Response:
            return Response(body, media_type=media_type, headers=headers)

        routes.append(Route(f"/{name}", serve, methods=["GET", "HEAD"]))
    return routes


def _check_hosts(allowed_hosts: Iterable[str] | None) -> list[str] | None:
    """The ``allowed_hosts`` patterns, checked, as Starlette compares them."""
    if allowed_hosts is None:
        return None
    if isinstance(allowed_hosts, str):
        raise TypeError("allowed_hosts must be a list of host names, not one string")
    hosts = []
    for entry in allowed_hosts:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"allowed_hosts entries must be non-empty strings, got {entry!r}")
        host = entry
        if host.count(":") > 1 and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address: the Host header brackets it
        elif host.count(":") == 1:
            raise ValueError(f"allowed_hosts entry {host!r}: give the name without the port")
        if "*" in host[1:] or (host.startswith("*") and host != "*"
                               and not host.startswith("*.")):
            raise ValueError(f"allowed_hosts entry {host!r}: wildcards must look like "
                             "'*.example.com' (or '*' for any)")
        hosts.append(host.lower())
    if not hosts:
        raise ValueError("allowed_hosts is empty: no request could reach the gateway "
                         "(pass None to allow any Host)")
    return hosts


#: A cookie name is an HTTP token (RFC 6265 section 4.1.1).
_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_cookie_name(name: object) -> None:
    # An empty or malformed name was silently never read.
    if name is not None and (not isinstance(name, str) or not _COOKIE_NAME.fullmatch(name)):
        raise ValueError(f"token_cookie must be a cookie name (letters, digits and "
                         f"!#$%&'*+-.^_`|~) or None for no cookie, not {name!r}")


def _demo_page(command: str | None) -> str:
    text = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    command = command or "psql -c \"NOTIFY data, 'green'\""
    return text.replace("{{PSQL_COMMAND}}", html.escape(command))
