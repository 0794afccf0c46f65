"""An authorizer that verifies JSON Web Tokens (PyJWT), for the gateway.

::

    from pgcast.gateway import create_app
    from pgcast.gateway.jwt import JWTAuthorizer

    app = create_app(dsn, authorizer=JWTAuthorizer(key=SECRET, audience="pgcast"))

A token is accepted when its signature verifies with the configured key (a
shared secret for HS256/384/512, a PEM public key for RS*/PS*/ES*/EdDSA, or
the key of a JWKS document, from a file or an ``https://`` URL, chosen by the
token's ``kid``), its algorithm is one of *algorithms* (never ``none``; a
shared-secret algorithm is never allowed with a public key, so a public key
cannot be used as an HMAC secret), it has not expired (``exp``, required by
default), and ``aud``/``iss`` match when configured. Its claims then say what
the client may do: by default

.. code-block:: json

    {"sub": "alice", "exp": 1767225600,
     "channels": {"read": ["user.alice.*", "news"], "publish": ["chat"]}}

(globs, as :meth:`pgcast.gateway.Access.globs`; *read_claim* and
*publish_claim* name other claims, dotted for nesting). The access ends at
``exp``: the gateway closes the client then (code 4001) unless it sent a
fresh token in an ``{"type": "auth", "token": ...}`` frame.

``pgcast serve --jwt-key/--jwt-key-file/--jwt-jwks/--jwt-audience`` turns
it on from the command line. Requires the ``jwt`` extra (``pyjwt[crypto]``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import AccessDenied
from .auth import Access

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

try:
    import jwt as _jwt
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "pgcast.gateway.jwt needs PyJWT: pip install 'pgcast[jwt]'"
    ) from exc

__all__ = [
    "HMAC_ALGORITHMS", "JWKS_LIFESPAN", "JWKS_REFETCH_INTERVAL", "JWKS_RETRY_PAUSE",
    "JWKS_TIMEOUT", "PUBLIC_KEY_ALGORITHMS", "JWTAuthorizer",
]

logger = logging.getLogger("pgcast.gateway")

#: Seconds between two fetches of a JWKS URL for a kid it did not have.
JWKS_REFETCH_INTERVAL = 30.0
#: Seconds a fetched JWKS is fresh; after that it is fetched again in the
#: background, its keys still serving meanwhile (and for as long as the
#: identity provider does not answer).
JWKS_LIFESPAN = 300.0
#: Seconds after a failed JWKS fetch before another is tried.
JWKS_RETRY_PAUSE = 5.0
#: The HTTP timeout of a JWKS fetch, and the longest a verification waits for
#: one (only a token whose kid has no cached key waits).
JWKS_TIMEOUT = 5.0

#: Algorithms that sign with a shared secret.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
#: Algorithms that sign with a private key and verify with a public one.
PUBLIC_KEY_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
)


class JWTAuthorizer:
    """The gateway's authorizer for JWTs; see the module docstring.

    :param key: an HMAC secret (``str`` or ``bytes``) or a PEM public key.
    :param jwks: a JWKS document: a file path, or an ``http(s)://`` URL.
        A URL is fetched in a background thread, never while a verification
        waits on it unless the token's ``kid`` has no cached key: fetched
        again when *jwks_lifespan* has passed (the keys it had keep serving
        until a fetch succeeds, so an identity provider that is down or slow
        delays no one whose key is known), and for an unknown ``kid`` at
        most every :data:`JWKS_REFETCH_INTERVAL` seconds.
    :param jwks_timeout: the HTTP timeout of a JWKS fetch, and the longest a
        token with an unknown ``kid`` waits for one.
    :param jwks_lifespan: seconds a fetched JWKS is fresh.
    :param algorithms: the accepted ``alg`` values; default HS256 for a
        secret, RS256 and ES256 for a public key or a JWKS. Shared-secret and
        public-key algorithms cannot be mixed.
    :param audience: the required ``aud`` (None: a token with an ``aud`` is
        refused, as PyJWT does).
    :param issuer: the required ``iss``.
    :param require: claims a token must have (default ``exp``).
    :param leeway: seconds of clock skew allowed on ``exp``/``nbf``/``iat``.
    :param read_claim: the claim listing the channel globs the client may
        subscribe to (dotted for nested claims).
    :param publish_claim: the claim listing the globs it may publish on.
    """

    def __init__(
        self,
        *,
        key: str | bytes | None = None,
        jwks: str | None = None,
        algorithms: Sequence[str] | None = None,
        audience: str | Iterable[str] | None = None,
        issuer: str | None = None,
        require: Sequence[str] = ("exp",),
        leeway: float = 0.0,
        read_claim: str = "channels.read",
        publish_claim: str = "channels.publish",
        jwks_timeout: float = JWKS_TIMEOUT,
        jwks_lifespan: float = JWKS_LIFESPAN,
    ) -> None:
        if (key is None) == (jwks is None):
            raise ValueError("JWTAuthorizer needs exactly one of key= or jwks=")
        public = jwks is not None or _is_public_key(key)
        if algorithms is None:
            algorithms = ("RS256", "ES256") if public else ("HS256",)
        algorithms = tuple(algorithms)
        if not algorithms:
            raise ValueError("algorithms is empty: no token could be accepted")
        for alg in algorithms:
            if alg not in HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS:
                raise ValueError(
                    f"algorithm {alg!r} is not accepted; use one of "
                    f"{', '.join(HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS)}"
                )
            if public and alg in HMAC_ALGORITHMS:
                raise ValueError(
                    f"{alg} signs with a shared secret, but the key is a public key or a "
                    "JWKS: allowing it would let anyone sign tokens with the public key"
                )
            if not public and alg not in HMAC_ALGORITHMS:
                raise ValueError(f"{alg} needs a public key (PEM) or a JWKS, not a secret")
        if isinstance(key, str) and not public and len(key.encode()) < 32:
            raise ValueError(
                f"the HMAC secret is {len(key.encode())} bytes; use at least 32 random bytes"
            )
        self.algorithms = algorithms
        self.audience = audience if audience is None or isinstance(audience, str) \
            else list(audience)
        self.issuer = issuer
        self.require = tuple(require)
        self.leeway = leeway
        self.read_claim = read_claim
        self.publish_claim = publish_claim
        self._key: Any = key
        self._jwks: _jwt.PyJWKClient | None = None
        self._jwk_set: _jwt.PyJWKSet | None = None
        # A JWKS URL: the keys of the last fetch that succeeded, by kid, and
        # the one fetch under way. _state_lock guards these and is never
        # held across I/O.
        self._state_lock = threading.Lock()
        self._url_keys: dict[str, Any] = {}
        self._fetched_at = -math.inf      # the last fetch that succeeded
        self._attempted_at = -math.inf    # the last fetch started
        self._refetched = -math.inf       # the last fetch for an unknown kid
        self._last_error: str | None = None
        self._fetch: concurrent.futures.Future[None] | None = None
        for name, value in (("jwks_timeout", jwks_timeout), ("jwks_lifespan", jwks_lifespan)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        self.jwks_timeout = jwks_timeout
        self.jwks_lifespan = jwks_lifespan
        if jwks is not None:
            if jwks.startswith(("http://", "https://")):
                self._jwks = _jwt.PyJWKClient(jwks, cache_jwk_set=False, timeout=jwks_timeout)
            else:
                try:
                    self._jwk_set = _jwt.PyJWKSet.from_json(Path(jwks).read_text())
                except (OSError, ValueError, _jwt.PyJWTError) as exc:
                    raise ValueError(f"cannot read the JWKS document {jwks}: {exc}") from None

    async def __call__(self, connection: HTTPConnection | None, token: str | None) -> Access:
        """Verify *token*; the :class:`Access` its claims give, ending at ``exp``.

        :raises pgcast.AccessDenied: no token, or one that does not verify,
            saying why.
        """
        if not token:
            raise AccessDenied("a token is required (a JWT)")
        key = self._key
        if self._jwks is not None:
            key = await self._signing_key_from_url(token)
        elif self._jwk_set is not None:
            key = self._signing_key_from_set(token)
        try:
            claims = _jwt.decode(
                token, key, algorithms=list(self.algorithms), audience=self.audience,
                issuer=self.issuer, leeway=self.leeway,
                options={"require": list(self.require)},
            )
        except _jwt.ExpiredSignatureError:
            raise AccessDenied("the token has expired") from None
        except _jwt.PyJWTError as exc:
            raise AccessDenied(f"invalid token: {exc}") from None
        return Access.globs(
            read=_globs(claims, self.read_claim),
            write=_globs(claims, self.publish_claim),
            expires=_expiry(claims.get("exp"), self.leeway),
        )

    async def _signing_key_from_url(self, token: str) -> Any:
        # The key comes from the cached set; a fetch (urllib, blocking) runs
        # in its own thread, one at a time, and is awaited only by a token
        # whose kid the cache lacks, for at most jwks_timeout. PyJWKClient's
        # own cache and lock are not used: under them every verification
        # waited for a fetch (the full HTTP timeout when the identity
        # provider hung) and, the cache expired, was refused.
        try:
            kid = _jwt.get_unverified_header(token).get("kid")
        except _jwt.PyJWTError as exc:
            raise AccessDenied(f"invalid token: {exc}") from None
        if not isinstance(kid, str):
            raise AccessDenied("invalid token: its header has no kid, which a JWKS needs")
        now = time.monotonic()
        with self._state_lock:
            key = self._url_keys.get(kid)
            if key is not None:
                if now - self._fetched_at >= self.jwks_lifespan:
                    self._start_fetch(now, JWKS_RETRY_PAUSE)
                return key
            if self._fetched_at == -math.inf:
                fetch = self._start_fetch(now, JWKS_RETRY_PAUSE)
            else:
                fetch = self._start_fetch(now, JWKS_REFETCH_INTERVAL, unknown_kid=True)
        if fetch is not None:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fetch)),
                                       self.jwks_timeout)
            with self._state_lock:
                key = self._url_keys.get(kid)
            if key is not None:
                return key
        with self._state_lock:
            error, fetching = self._last_error, self._fetch is not None
        why = (f"; the JWKS is being fetched (timeout {self.jwks_timeout:g} s)" if fetching
               else f"; the last fetch of the JWKS failed: {error}" if error else "")
        raise AccessDenied(f"invalid token: no key with kid {kid!r:.80} in the JWKS{why} "
                           f"(fetched again for an unknown kid at most every "
                           f"{JWKS_REFETCH_INTERVAL:g} s)")

    def _start_fetch(self, now: float, pause: float, unknown_kid: bool = False
                     ) -> concurrent.futures.Future[None] | None:
        """The fetch under way, or a new one if the last started *pause*
        seconds ago or more (None if neither). Called under _state_lock."""
        if self._fetch is not None:
            return self._fetch
        # After a fetch that succeeded, a stale set is fetched again at once;
        # after one that failed, not before *pause*.
        since = self._refetched if unknown_kid else (
            self._attempted_at if self._last_error is not None else -math.inf)
        if now - since < pause:
            return None
        self._attempted_at = now
        if unknown_kid:
            self._refetched = now
        fetch: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._fetch = fetch
        threading.Thread(target=self._fetch_keys, args=(fetch,), daemon=True,
                         name="pgcast-jwks-fetch").start()
        return fetch

    def _fetch_keys(self, fetch: concurrent.futures.Future[None]) -> None:
        client = self._jwks
        assert client is not None
        keys: dict[str, Any] | None = None
        error: str | None = None
        try:
            jwk_set = _jwt.PyJWKSet.from_dict(client.fetch_data())
            keys = {jwk.key_id: jwk.key for jwk in jwk_set.keys
                    if jwk.key_id and jwk.public_key_use in ("sig", None)}
            if not keys:
                error = "the JWKS has no signing keys (with a kid)"
                keys = None
        except Exception as exc:
            error = str(exc)[:200] or type(exc).__name__
        with self._state_lock:
            if keys is not None:
                self._url_keys = keys
                self._fetched_at = time.monotonic()
                self._last_error = None
            else:
                self._last_error = error
            self._fetch = None
            cached = len(self._url_keys)
        if keys is None:
            logger.warning("fetching the JWKS from %s failed: %s; the %d key(s) fetched "
                           "before still serve", client.uri, error, cached)
        fetch.set_result(None)

    def _signing_key_from_set(self, token: str) -> Any:
        assert self._jwk_set is not None
        try:
            kid = _jwt.get_unverified_header(token).get("kid")
        except _jwt.PyJWTError as exc:
            raise AccessDenied(f"invalid token: {exc}") from None
        keys = [k for k in self._jwk_set.keys if kid is None or k.key_id == kid]
        if not keys:
            raise AccessDenied(f"invalid token: no key with kid {kid!r} in the JWKS")
        return keys[0].key


def _expiry(exp: Any, leeway: float) -> float | None:
    """When the access of a token with this (verified) ``exp`` ends.

    PyJWT reads ``exp`` as ``int(exp)``, so it accepts ``"1767225600"`` as
    a string: the access must end then too (it was never ending).
    """
    if exp is None:
        return None
    try:
        value = float(exp) if isinstance(exp, int | float) else float(int(exp))
    except (TypeError, ValueError, OverflowError):
        raise AccessDenied(f"invalid token: exp must be a number, not {exp!r:.40}") from None
    if not math.isfinite(value):
        raise AccessDenied("invalid token: exp must be a finite number")
    return value + leeway


def _is_public_key(key: str | bytes | None) -> bool:
    text = key.decode("latin-1") if isinstance(key, bytes) else (key or "")
    return "-----BEGIN" in text or text.startswith("ssh-")


def _globs(claims: Mapping[str, Any], path: str) -> list[str]:
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AccessDenied(f"claim {path!r} must be a list of channel globs, not "
                           f"{json.dumps(value)[:60]}")
    return value
