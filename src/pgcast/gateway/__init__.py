"""pgcast's web gateway: PostgreSQL notifications to browsers over WebSocket and SSE.

::

    from pgcast.gateway import create_app

    app = create_app("postgresql://localhost/app", allow=["orders.*"])

:func:`create_app` returns a Starlette (ASGI) application to run with uvicorn
(``pgcast serve`` does) or mount inside FastAPI or Starlette; its ``gateway``
attribute (a :class:`Gateway`) publishes from the host's own routes and
starts and stops the gateway from the host's lifespan. One LISTEN
connection per process serves every client: LISTEN on a channel's first
subscriber, UNLISTEN after its last. The protocol is in
:mod:`pgcast.gateway._protocol` and the README; access control in
:mod:`pgcast.gateway.auth`.

Under ``pgcast serve`` or :func:`serve` each notification's frame is
written straight to every subscriber's socket (:mod:`._wsdirect`); another
uvicorn gets the same with ``ws=pgcast.gateway.WebSocketProtocol``, and any
other ASGI server runs the generic path (a task and an ASGI ``send`` per
client and frame: several times slower at thousands of clients).

Needs the ``gateway`` extra (``pip install 'pgcast[gateway]'``).
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "pgcast.gateway needs Starlette and uvicorn: pip install 'pgcast[gateway]'",
        name=exc.name,  # the pgcast command names the extra from it
    ) from exc

from ._gateway import Gateway, GatewayApp
from ._ratelimit import RateLimits
from ._router import Overflow
from ._serve import serve
from ._wsdirect import DirectProtocol as WebSocketProtocol
from .app import create_app
from .auth import Access, Authorizer, allow_list

__all__ = [
    "Access",
    "Authorizer",
    "Gateway",
    "GatewayApp",
    "Overflow",
    "RateLimits",
    "WebSocketProtocol",
    "allow_list",
    "create_app",
    "serve",
]
