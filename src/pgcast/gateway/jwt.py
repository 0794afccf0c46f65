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
import json
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

__all__ = ["HMAC_ALGORITHMS", "JWKS_REFETCH_INTERVAL", "PUBLIC_KEY_ALGORITHMS", "JWTAuthorizer"]

#: Seconds between two fetches of a JWKS URL for a kid it did not have.
JWKS_REFETCH_INTERVAL = 30.0

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
    :param jwks: a JWKS document: a file path, or an ``http(s)://`` URL
        fetched (and cached, refetched for an unknown ``kid``) by PyJWT.
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
        self._refetch_lock = threading.Lock()
        self._refetched = -math.inf
        self._jwk_set: _jwt.PyJWKSet | None = None
        if jwks is not None:
            if jwks.startswith(("http://", "https://")):
                self._jwks = _jwt.PyJWKClient(jwks, cache_keys=True, timeout=10)
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
            # PyJWKClient fetches with urllib: not on the event loop.
            key = await asyncio.to_thread(self._signing_key_from_url, token)
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

    def _signing_key_from_url(self, token: str) -> Any:
        # A kid the cached JWKS lacks makes PyJWT fetch it again: per token
        # in PyJWT before its cooldown, and after a failed fetch still (each
        # up to 10 s, in a thread, under the client's lock, which every
        # verification takes). At most one such fetch per JWKS_REFETCH_INTERVAL.
        client = self._jwks
        assert client is not None
        try:
            kid = _jwt.get_unverified_header(token).get("kid")
            for jwk in client.get_signing_keys():
                if jwk.key_id == kid:
                    return jwk.key
            with self._refetch_lock:
                now = time.monotonic()
                if now - self._refetched < JWKS_REFETCH_INTERVAL:
                    raise AccessDenied(f"invalid token: no key with kid {kid!r:.80} in the "
                                       f"JWKS (fetched again at most every "
                                       f"{JWKS_REFETCH_INTERVAL:g} s)")
                self._refetched = now
            return client.get_signing_key_from_jwt(token).key
        except _jwt.PyJWTError as exc:
            raise AccessDenied(f"invalid token: {exc}") from None

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
