"""The gateway's clients: who they are, what they may do, when they must go.

:class:`Settings` is the gateway's configuration; :class:`Client` one
connected client as the transports drive it; :class:`Clients` the part of
the :class:`~pgcast.gateway._hub.Hub` that admits, authorizes, rate-limits
and forgets clients (the hub adds the database side: subscriptions, the
LISTEN connection, the fan-out).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .._backoff import Backoff
from .._errors import AccessDenied, ProtocolError
from . import _metrics, _protocol
from ._protocol import Command, Frame, Publish, Ref
from ._ratelimit import CLOSE_RATE_LIMITED, ClientLimiter, RateLimits, TotalLimiter
from ._router import Outbox, Overflow, Router, Subscriber
from .auth import Access, Authorizer

if TYPE_CHECKING:
    from ._resume import Resume

__all__ = [
    "CLOSE_ACCESS_EXPIRED",
    "CLOSE_GOING_AWAY",
    "CLOSE_NOT_AUTHENTICATED",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TRY_AGAIN_LATER",
    "Client",
    "Clients",
    "Settings",
    "TooManyFromAddress",
    "address_key",
]


logger = logging.getLogger("pgcast.gateway")

#: WebSocket close codes the gateway uses.
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_SLOW_CONSUMER = 4000
#: The client's access expired (its token) and no fresh token came in time.
CLOSE_ACCESS_EXPIRED = 4001
#: The client did not authenticate (no ``auth`` frame first, or a refused token).
CLOSE_NOT_AUTHENTICATED = 4003

#: How the gateway's database connection is retried by default: at once,
#: then 0.1 s growing to 5 s, with full jitter, without end.
GATEWAY_BACKOFF = Backoff(initial=0.1, maximum=5.0)

#: Connections at once from one address (an IPv6 /64) by default: a few
#: per user for a few hundred users behind one NAT, and no single address
#: can take more than a fiftieth of ``pgcast serve``'s 50,000 clients.
DEFAULT_PER_ADDRESS = 1000


@dataclass(frozen=True)
class Settings:
    """The gateway's configuration; see :func:`pgcast.gateway.create_app`."""

    dsn: str = ""
    authorizer: Authorizer | None = None
    allowed_origins: frozenset[str] | None = None
    max_clients: int = 10_000
    max_subscriptions: int = 100
    max_channels: int | None = 10_000
    max_frame_bytes: int = _protocol.MAX_FRAME_BYTES
    queue_size: int = 1000
    overflow: Overflow = Overflow.DISCONNECT
    heartbeat: float = 15.0
    database_timeout: float = 10.0
    replay_wait: float = 10.0
    close_timeout: float = 2.0
    metrics_cache: float = 5.0
    durable: tuple[str, ...] = ()
    connect_kwargs: dict[str, Any] = field(default_factory=dict)
    token_cookie: str | None = "pgcast_token"
    auth_timeout: float = 10.0
    rate_limits: RateLimits | None = field(default_factory=RateLimits)
    max_clients_per_address: int | None = DEFAULT_PER_ADDRESS
    reconnect_backoff: Backoff = GATEWAY_BACKOFF
    #: New channels one address may have created and still hold: "auto" is
    #: a quarter of max_channels; None for no cap.
    max_channels_per_address: int | Literal["auto"] | None = "auto"

    @property
    def channels_per_address(self) -> int | None:
        """The cap on channels created from one address (None: none)."""
        value = self.max_channels_per_address
        if value == "auto":
            return None if self.max_channels is None else max(1, self.max_channels // 4)
        return value

    def __post_init__(self) -> None:
        if not isinstance(self.reconnect_backoff, Backoff):
            raise TypeError(f"reconnect_backoff must be a pgcast.Backoff, not "
                            f"{type(self.reconnect_backoff).__name__}")
        for name in ("max_clients_per_address", "max_channels", "max_channels_per_address"):
            value = getattr(self, name)
            if name == "max_channels_per_address" and value == "auto":
                continue
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        for name in ("max_clients", "max_subscriptions", "max_frame_bytes", "queue_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("heartbeat", "database_timeout", "close_timeout", "metrics_cache",
                     "auth_timeout", "replay_wait"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        object.__setattr__(self, "overflow", Overflow(self.overflow))


class TooManyFromAddress(AccessDenied):
    """A connection refused for ``max_clients_per_address`` (HTTP 429)."""


class TooManyChannelsFromAddress(ProtocolError):
    """A subscribe refused for ``max_channels_per_address`` (SSE: HTTP 429)."""


def address_of(connection: Any) -> str | None:
    """The address *connection* counts as for the per-address caps (None:
    not known)."""
    return _address(connection)


def _address(connection: Any) -> str | None:
    client = getattr(connection, "client", None)
    host = getattr(client, "host", None) if client is not None else None
    return address_key(host) if isinstance(host, str) else None


def address_key(host: str) -> str:
    """What ``max_clients_per_address`` counts *host* as: an IPv4 address
    as it is (an IPv4-mapped IPv6 one too), an IPv6 address as its /64 (one
    host is given a whole /64 and may use any address of it), anything else
    (a name, a Unix socket path) as it is."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Client:
    """One connected client, as the transports drive it."""

    __slots__ = ("_wake", "access", "address", "closing", "connection", "detached", "expiry",
                 "limiter", "replay_rows", "resume", "sub")

    def __init__(self, sub: Subscriber, access: Access, connection: Any = None) -> None:
        self.sub = sub
        self.access = access
        #: The Starlette request or websocket, for the authorizer.
        self.connection = connection
        #: Closes the client when its access expires (see :meth:`Hub.grant`).
        self.expiry: asyncio.TimerHandle | None = None
        #: Its rate limits, made at its first request (idle clients have none).
        self.limiter: ClientLimiter | None = None
        #: The client's address, counted against ``max_clients_per_address``.
        self.address = _address(connection)
        self._wake: asyncio.Event | None = None
        #: Resolved with ``(close code, reason)`` when the gateway drops the client.
        self.closing: asyncio.Future[tuple[int, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self.detached = False
        #: The durable channels it resumed from a position, if any.
        self.resume: Resume | None = None
        #: Rows read on the replay connection for it (at least one a query):
        #: its place when queries wait there (least served first, see
        #: :mod:`._turns`).
        self.replay_rows = 0

    @property
    def gone(self) -> bool:
        """Whether the client left or is being closed."""
        return self.detached or self.closing.done()

    @property
    def wake(self) -> asyncio.Event:
        """Set when the outbox has frames (or the client must go): what a
        transport's sender task waits on. Made when first asked for: a
        client whose frames go straight to its socket has no such task."""
        wake = self._wake
        if wake is None:
            wake = self._wake = asyncio.Event()
        return wake

    def poke(self) -> None:
        """Wake the sender task, if there is one (the outbox calls this)."""
        if self._wake is not None:
            self._wake.set()

    @property
    def outbox(self) -> Outbox:
        """The client's bounded queue of frames."""
        return self.sub.outbox

    def kick(self, code: int, reason: str) -> None:
        """Ask the client's transport to close with *code* and *reason*."""
        if not self.closing.done():
            self.closing.set_result((code, reason))
            # Every client at shutdown: not worth a line each.
            level = logging.DEBUG if code == CLOSE_GOING_AWAY else logging.INFO
            if logger.isEnabledFor(level):
                logger.log(level, "pgcast gateway: closing client %s (%d): %s",
                           self.label, code, reason,
                           extra={"client": self.label, "close_code": code,
                                  "transport": self.sub.transport,
                                  "channels": sorted(self.sub.channels)})
        self.poke()

    @property
    def label(self) -> str:
        """``host:port`` of the client as the server sees it (``?`` unknown)."""
        peer = getattr(self.connection, "client", None)
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        if host is None:
            return "?"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Clients:
    """The hub's clients: admission, access, rate limits, departure.

    A base of :class:`~pgcast.gateway._hub.Hub`, which sets the attributes
    below and provides :meth:`reply` and :meth:`unsubscribe`.
    """

    settings: Settings
    stats: _metrics.Stats
    router: Router
    _clients: dict[Subscriber, Client]
    _per_address: Counter[str]
    #: The channels each address created (no one had them) and that may
    #: still have subscribers: counted against max_channels_per_address.
    _created: dict[str, set[str]]
    _closing: bool
    _authorize: Authorizer
    _reap_wanted: asyncio.Event
    _total: TotalLimiter | None = None

    def reply(self, client: Client, frame: Frame) -> None:
        raise NotImplementedError

    async def unsubscribe(
        self, client: Client, channels: tuple[str, ...], ref: Ref = None
    ) -> None:
        raise NotImplementedError

    async def authorize(self, connection: Any, token: str | None) -> Access:
        """Run the authorizer. :raises AccessDenied: it refused the client."""
        result = self._authorize(connection, token)
        if isinstance(result, Awaitable):
            result = await result
        if not isinstance(result, Access):
            raise TypeError(
                f"the gateway's authorizer must return a pgcast.gateway.Access, "
                f"not {type(result).__name__}"
            )
        if result.expires is not None and result.expires <= time.time():
            raise AccessDenied("the token has expired")
        return result

    def check_room(self, connection: Any = None) -> None:
        """:raises AccessDenied: shutting down, or at ``max_clients``;
        :class:`TooManyFromAddress`: at ``max_clients_per_address`` for the
        address *connection* comes from."""
        if self._closing:
            raise AccessDenied("the gateway is shutting down")
        if len(self._clients) >= self.settings.max_clients:
            self.stats.rejected["capacity"] += 1
            raise AccessDenied(
                f"the gateway is full: {len(self._clients)} clients connected, "
                f"the limit is {self.settings.max_clients}"
            )
        cap = self.settings.max_clients_per_address
        address = _address(connection)
        if cap is not None and address is not None and self._per_address[address] >= cap:
            self.stats.rejected["per_address"] += 1
            raise TooManyFromAddress(
                f"too many connections from {address}: {self._per_address[address]} open, "
                f"the limit per address is {cap} (max_clients_per_address)"
            )

    def check_created(self, address: str | None, channels: Iterable[str]) -> None:
        """:raises TooManyChannelsFromAddress: subscribing to *channels* from
        *address* would create more channels (that no client has) than
        ``max_channels_per_address``: otherwise one address (many
        connections, each at ``max_subscriptions``) could take every one of
        ``max_channels``, and no one else could subscribe to a new channel."""
        self._created_from(address, channels)

    def claim_created(self, address: str | None, channels: Iterable[str]) -> None:
        """:meth:`check_created`, then count the new ones as created from
        *address*. Called under the hub's lock, with the LISTEN and the
        commit of the subscription (channels whose LISTEN then failed have
        no subscribers, and stop counting at the next check over the cap)."""
        new = self._created_from(address, channels)
        if new and address is not None:
            self._created.setdefault(address, set()).update(new)

    def _created_from(self, address: str | None, channels: Iterable[str]) -> list[str]:
        cap = self.settings.channels_per_address
        if cap is None or address is None:
            return []
        router = self.router
        new = [c for c in dict.fromkeys(channels) if not router.subscribers(c)]
        if not new:
            return new
        created = self._created.get(address)
        if created is None:
            created = set()
        if len(created) + len(new) > cap:
            # Channels no one has any more are not counted.
            created.intersection_update(router.channels())
            if not created:
                self._created.pop(address, None)
        if len(created) + len(new) > cap:
            self.stats.rejected["per_address"] += 1
            raise TooManyChannelsFromAddress(
                f"{len(new)} new channel(s) refused: {len(created)} channels created from "
                f"{address} have subscribers, the limit per address is {cap} "
                "(max_channels_per_address); channels other clients have cost nothing"
            )
        return new

    def attach(self, transport: str, access: Access, connection: Any = None) -> Client:
        """Register a new client. :raises AccessDenied: see :meth:`check_room`,
        or *access* has already expired."""
        self.check_room(connection)
        outbox = Outbox(self.settings.queue_size, self.settings.overflow)
        sub = Subscriber(outbox, transport)
        client = Client(sub, Access(), connection)
        outbox.wake = client.poke
        self.grant(client, access)
        self._clients[sub] = client
        if client.address is not None:
            self._per_address[client.address] += 1
        self.router.attach(sub)
        self.stats.connections[transport] += 1
        return client

    def grant(self, client: Client, access: Access) -> None:
        """Give *client* *access*, and close it when that access expires.

        :raises AccessDenied: *access* has already expired.
        """
        delay = None if access.expires is None else access.expires - time.time()
        if delay is not None and delay <= 0:
            raise AccessDenied("the token has expired")
        if client.expiry is not None:
            client.expiry.cancel()
            client.expiry = None
        client.access = access
        if delay is not None:
            client.expiry = asyncio.get_running_loop().call_later(
                delay, self._expired, client
            )

    def _expired(self, client: Client) -> None:
        client.expiry = None
        self.stats.disconnects["expired"] += 1
        client.kick(CLOSE_ACCESS_EXPIRED,
                    "access expired: send a fresh token in an auth frame before it expires")

    async def authenticate(self, client: Client, token: str, ref: Ref = None) -> None:
        """A fresh token for *client*: its access is replaced; subscriptions
        the new access does not allow are ended (``unsubscribed``).

        :raises ProtocolError: the authorizer refused the token; the
            client's access is unchanged.
        """
        try:
            access = await self.authorize(client.connection, token)
        except AccessDenied as exc:
            self.stats.rejected["auth"] += 1
            raise ProtocolError(f"token refused: {exc or 'access denied'}") from None
        self.grant(client, access)
        lost = tuple(c for c in client.sub.channels if not access.can_read(c))
        if lost:
            await self.unsubscribe(client, lost)
        self.reply(client, _protocol.authenticated(ref, access.expires))

    def detach(self, client: Client) -> None:
        """Forget a client that went away; its channels may be UNLISTENed."""
        if client.detached:
            return
        client.detached = True
        if client.expiry is not None:
            client.expiry.cancel()
            client.expiry = None
        if self._clients.pop(client.sub, None) is not None and client.address is not None:
            self._per_address[client.address] -= 1
            if self._per_address[client.address] <= 0:
                del self._per_address[client.address]
        had = bool(client.sub.channels)
        self.router.detach(client.sub)
        if had:
            self._reap_wanted.set()

    def clients_by_transport(self) -> Counter[str]:
        """How many clients are connected, per transport."""
        return Counter(sub.transport for sub in self._clients)

    # -- requests ----------------------------------------------------------

    def limit(self, client: Client, command: Command | None) -> None:
        """Count *command* (None: a frame that did not parse) against the
        client's rate limits.

        :raises ProtocolError: over a limit (the message says which and when
            to retry); a client refused too often is also closed (4029).
        """
        limits = self.settings.rate_limits
        if limits is None:
            return
        limiter = client.limiter
        if limiter is None:
            limiter = client.limiter = ClientLimiter(limits)
        if isinstance(command, Publish):
            kind = "publish"
            why = limiter.check_publish(len(command.payload.encode()))
            if why is None:
                total = self._total
                if total is None:
                    total = self._total = TotalLimiter(limits)
                why = total.check_publish()
                if why is not None:
                    # Not this client's doing: no refusal counted against it.
                    self.stats.rate_limited["total_publish"] += 1
                    raise ProtocolError(why)
        else:
            kind = "request"
            why = limiter.check_request()
        if why is None:
            return
        self.stats.rate_limited[kind] += 1
        if limiter.refused() and not client.closing.done():
            self.stats.disconnects["rate_limited"] += 1
            client.kick(CLOSE_RATE_LIMITED,
                        f"rate limited: {limits.max_refusals} requests over the limit "
                        f"within {limits.refusal_window:g} s")
        raise ProtocolError(why)


def deny_all(connection: Any, token: str | None) -> Access:
    return Access()


def not_allowed(verb: str, channels: list[str]) -> str:
    names = ", ".join(repr(c) for c in channels[:5])
    more = f" and {len(channels) - 5} more" if len(channels) > 5 else ""
    return f"not allowed to {verb} {names}{more}: not in this gateway's allow-list"
