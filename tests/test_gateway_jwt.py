"""The built-in JWT authorizer (issue 12 item 13): what it accepts, the
attacks it refuses, and the gateway closing a client when its token expires
unless a fresh one comes. Loopback only (the JWKS URL is served here)."""

# ruff: noqa: F811  (the gateway fixture is imported, then requested by name)
from __future__ import annotations

import asyncio
import base64
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pgcast import AccessDenied
from pgcast.gateway.jwt import JWTAuthorizer
from test_gateway_serve_ops import _CODES, serve
from test_gateway_server import (
    TIMEOUT,
    Gateway,
    gateway,  # noqa: F401  (the fixture)
    recv,
    request,
    run,
    subscribe,
    ws_connect,
)

SECRET = "a-test-secret-of-at-least-32-bytes!!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _pem(key: Any) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def token(key: Any = SECRET, alg: str = "HS256", ttl: float = 60, **claims: Any) -> str:
    body: dict[str, Any] = {"sub": "alice",
                            "channels": {"read": ["news", "user.alice.*"], "publish": ["chat"]}}
    if ttl is not None:
        body["exp"] = int(time.time() + ttl)
    body.update(claims)
    headers = {"kid": claims.pop("_kid")} if "_kid" in claims else None
    body.pop("_kid", None)
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def check(authorizer: JWTAuthorizer, tok: str | None) -> Any:
    return asyncio.run(authorizer(None, tok))


def test_a_valid_token_gives_its_claims_as_access_until_exp() -> None:
    access = check(JWTAuthorizer(key=SECRET), token())
    assert access.can_read("news") and access.can_read("user.alice.inbox")
    assert not access.can_read("user.bob.inbox") and not access.can_read("chat")
    assert access.can_write("chat") and not access.can_write("news")
    assert time.time() + 50 < access.expires <= time.time() + 61
    rs = check(JWTAuthorizer(key=_pem(RSA_KEY)), token(RSA_KEY, "RS256"))
    assert rs.can_read("news")
    es = check(JWTAuthorizer(key=_pem(EC_KEY)), token(EC_KEY, "ES256"))
    assert es.can_write("chat")
    other = JWTAuthorizer(key=SECRET, read_claim="scope.sub", publish_claim="pub")
    access = check(other, token(scope={"sub": "only"}, pub="one"))
    assert access.can_read("only") and not access.can_read("news") and access.can_write("one")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: None, "a token is required"),
        (lambda: token(ttl=-5), "the token has expired"),
        (lambda: token(key="another-secret-of-at-least-32-bytes!"), "Signature verification"),
        (lambda: token(ttl=None), 'missing the "exp" claim'),
        (lambda: token(aud="someone-else"), "Invalid audience"),
        # alg=none: an unsigned token with any claims.
        (lambda: jwt.encode({"exp": int(time.time() + 60), "channels": {"read": ["*"]}},
                            None, algorithm="none"), "alg"),
        (lambda: "not.a.jwt", "invalid token"),
        (lambda: token() + "x", "invalid token"),
        (lambda: token(channels={"read": "*x", "publish": [3]}), "must be a list of channel"),
    ],
)
def test_bad_tokens_are_refused_saying_why(make: Callable[[], str | None], message: str) -> None:
    with pytest.raises(AccessDenied, match=message):
        check(JWTAuthorizer(key=SECRET), make())


def test_audience_and_issuer() -> None:
    authorizer = JWTAuthorizer(key=SECRET, audience="pgcast", issuer="https://id.example")
    check(authorizer, token(aud="pgcast", iss="https://id.example"))
    with pytest.raises(AccessDenied, match='missing the "aud" claim'):
        check(authorizer, token(iss="https://id.example"))
    with pytest.raises(AccessDenied, match="Audience doesn't match"):
        check(authorizer, token(aud="other", iss="https://id.example"))
    with pytest.raises(AccessDenied, match=r"issuer|iss"):
        check(authorizer, token(aud="pgcast", iss="https://evil.example"))


def test_a_public_key_can_never_be_used_as_an_hmac_secret() -> None:
    """The HS/RS confusion attack: sign HS256 with the server's *public* key."""
    pem = _pem(RSA_KEY)
    authorizer = JWTAuthorizer(key=pem)
    forged = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(json.dumps(
        {"exp": int(time.time() + 60), "channels": {"read": ["*"]}}).encode()).rstrip(b"=")
    import hashlib
    import hmac
    signing_input = f"{forged}.{payload.decode()}".encode()
    sig = base64.urlsafe_b64encode(
        hmac.new(pem.encode(), signing_input, hashlib.sha256).digest()).rstrip(b"=")
    with pytest.raises(AccessDenied, match="alg"):
        check(authorizer, f"{signing_input.decode()}.{sig.decode()}")
    with pytest.raises(ValueError, match="shared secret"):
        JWTAuthorizer(key=pem, algorithms=["RS256", "HS256"])
    with pytest.raises(ValueError, match="needs a public key"):
        JWTAuthorizer(key=SECRET, algorithms=["RS256"])
    with pytest.raises(ValueError, match="not accepted"):
        JWTAuthorizer(key=SECRET, algorithms=["none"])
    with pytest.raises(ValueError, match="at least 32"):
        JWTAuthorizer(key="short")
    with pytest.raises(ValueError, match="exactly one"):
        JWTAuthorizer()


def _jwks(*keys: tuple[str, Any]) -> str:
    out = []
    for kid, key in keys:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())
                         if isinstance(key, rsa.RSAPrivateKey)
                         else jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk["kid"] = kid
        out.append(jwk)
    return json.dumps({"keys": out})


@pytest.fixture
def jwks_url() -> Iterator[str]:
    document = _jwks(("r1", RSA_KEY), ("e1", EC_KEY)).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


def test_jwks_from_a_file_and_from_a_url(tmp_path: Path, jwks_url: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(_jwks(("r1", RSA_KEY), ("e1", EC_KEY)))
    for source in (str(path), jwks_url):
        authorizer = JWTAuthorizer(jwks=source)
        assert check(authorizer, token(RSA_KEY, "RS256", _kid="r1")).can_read("news")
        assert check(authorizer, token(EC_KEY, "ES256", _kid="e1")).can_write("chat")
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with pytest.raises(AccessDenied):
            check(authorizer, token(other, "RS256", _kid="r1"))
        with pytest.raises(AccessDenied):
            check(authorizer, token(other, "RS256", _kid="unknown"))
    with pytest.raises(ValueError, match="cannot read the JWKS"):
        JWTAuthorizer(jwks=str(tmp_path / "missing.json"))


def test_the_gateway_with_jwt_over_websocket_and_sse(
    gateway: Callable[..., Gateway], unique_channel: str
) -> None:
    mine, theirs = f"user.alice.{unique_channel}", f"user.bob.{unique_channel}"
    gw = gateway(authorizer=JWTAuthorizer(key=SECRET), allow=())

    async def main() -> None:
        async with ws_connect(gw.ws, subprotocols=["pgcast", f"pgcast.token.{token()}"]) as ws:
            await subscribe(ws, mine)
            assert (await request(ws, {"type": "subscribe", "channels": [theirs]}))[
                "type"] == "error"
            assert (await request(ws, {"type": "publish", "channel": "chat"}))["type"] in (
                "published", "message")
            assert (await request(ws, {"type": "publish", "channel": mine}))["type"] == "error"
        for bad in (token(ttl=-1), token(key="another-secret-of-at-least-32-bytes!")):
            with pytest.raises(InvalidStatus) as info:
                async with ws_connect(f"{gw.ws}?token={bad}"):
                    pass
            assert info.value.response.status_code == 403
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            headers = {"Authorization": f"Bearer {token()}"}
            async with client.stream("GET", f"{gw.http}/sse?channel={mine}",
                                     headers=headers) as r:
                assert r.status_code == 200
            r2 = await client.get(f"{gw.http}/sse?channel={theirs}", headers=headers)
            assert r2.status_code == 403
        # Expiry closes the client with 4001 unless a fresh token comes first.
        async with ws_connect(gw.ws) as ws:
            assert (await request(ws, {"type": "auth", "token": token(ttl=2)}))[
                "type"] == "authenticated"
            await subscribe(ws, mine)
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(100):
                    await recv(ws, timeout=TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
        async with ws_connect(gw.ws) as ws:
            await request(ws, {"type": "auth", "token": token(ttl=2)})
            reply = await request(ws, {"type": "auth", "token": token(ttl=120)})
            assert reply["type"] == "authenticated" and reply["expires"] > time.time() + 100
            await asyncio.sleep(3)
            assert await request(ws, {"type": "ping"}) == {"type": "pong"}

    run(main())


def test_pgcast_serve_with_jwt(dsn: str, tmp_path: Path) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_text(_pem(EC_KEY))
    with serve(dsn, "--jwt-key-file", str(key_file), "--jwt-audience", "pgcast",
               allow=None) as (port, output):
        async def main() -> None:
            good = token(EC_KEY, "ES256", aud="pgcast")
            async with ws_connect(f"ws://127.0.0.1:{port}/ws?token={good}") as ws:
                await subscribe(ws, "news")
            with pytest.raises(InvalidStatus):
                async with ws_connect(f"ws://127.0.0.1:{port}/ws?token="
                                      f"{token(EC_KEY, 'ES256')}"):
                    pass

        run(main())
    assert _CODES[port] == 0, output[0]
    assert good_not_logged(output[0])
    for args, message in [
        (["--jwt-key", SECRET, "--allow", "x"], "exclude each other"),
        (["--jwt-audience", "a"], "needs a key"),
        (["--jwt-key", "short"], "at least 32"),
        (["--jwt-key-file", str(tmp_path / "nope.pem")], "cannot read --jwt-key-file"),
        (["--jwt-key-file", str(key_file), "--jwt-algorithm", "HS256"], "shared secret"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "pgcast.cli", "serve", "--dsn", dsn, *args],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr


def good_not_logged(out: str) -> bool:
    return "token=[redacted]" in out and "eyJ" not in out


def test_the_example_issues_a_token_the_gateway_accepts() -> None:
    example = Path(__file__).parent.parent / "examples" / "jwt" / "issue_token.py"
    done = subprocess.run(
        [sys.executable, str(example), "alice", "--read", "user.alice.*", "--publish", "chat"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PGCAST_JWT_KEY": SECRET},
    )
    assert done.returncode == 0, done.stderr
    access = check(JWTAuthorizer(key=SECRET, audience="pgcast"), done.stdout.strip())
    assert access.can_read("user.alice.inbox") and access.can_write("chat")
    assert not access.can_read("user.bob.inbox")
    missing = subprocess.run([sys.executable, str(example), "alice"], capture_output=True,
                             text=True, timeout=60, check=False,
                             env={k: v for k, v in os.environ.items() if k != "PGCAST_JWT_KEY"})
    assert missing.returncode == 2 and "PGCAST_JWT_KEY" in missing.stderr


# -- round 2: edge cases, each refused or pinned -------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: bytes, payload: bytes) -> str:
    import hashlib
    import hmac

    signing_input = f"{_b64(header)}.{_b64(payload)}"
    sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def test_an_exp_given_as_a_string_still_ends_the_access() -> None:
    """PyJWT reads exp as int(exp): a signed ``"exp": "<digits>"`` passed
    its check, and the gateway, seeing no number, gave access that never
    ended (expires None)."""
    at = int(time.time() + 60)
    access = check(JWTAuthorizer(key=SECRET), token(exp=str(at)))
    assert access.expires == at
    with pytest.raises(AccessDenied, match="expired"):
        check(JWTAuthorizer(key=SECRET), token(exp=str(int(time.time() - 5))))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: token(nbf=int(time.time() + 30)), r"not yet valid \(nbf\)"),
        (lambda: token(iat=int(time.time() + 3000)), r"not yet valid \(iat\)"),
        (lambda: _signed(b'{"alg":"HS256"}', b'{"exp": 1e400}'), "exp"),
        (lambda: _signed(b'{"alg":"HS256"}', b'{"exp": NaN}'), "exp"),
        (lambda: _signed(b'{"alg":"HS256"}', b'{"exp": true}'), "expired"),
        # JSON nested past the recursion limit, unsigned (header) or signed (payload).
        (lambda: _b64(b"[" * 50_000 + b"]" * 50_000) + "." + _b64(b"{}") + ".x",
         "Invalid header"),
        (lambda: _signed(b'{"alg":"HS256"}', b'{"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
         "Invalid payload"),
        (lambda: _b64(b"1") + "." + _b64(b"{}") + ".x", "json object"),
        (lambda: _signed(b'{"alg":"HS256","kid":{"a":1}}', b'{"exp": 9999999999}'),
         "Key ID"),
        (lambda: _signed(b'{"alg":"HS256","crit":["b64"],"b64":false}', b'{"exp": 9999999999}'),
         "invalid token"),
        (lambda: _signed(b'{"alg":"HS512"}', b'{"exp": 9999999999}'), "alg|signature|Signature"),
    ],
)
def test_edge_tokens_are_refused_saying_why(make: Callable[[], str], message: str) -> None:
    with pytest.raises(AccessDenied, match=message):
        check(JWTAuthorizer(key=SECRET), make())


def test_header_fields_that_point_elsewhere_are_ignored() -> None:
    """jku/x5u/jwk in a token's header never choose the key: the token
    verifies with the configured key or not at all."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(other.public_key()))
    forged = jwt.encode({"exp": int(time.time() + 60), "channels": {"read": ["*"]}}, other,
                        algorithm="RS256", headers={"jku": "http://127.0.0.1:9/jwks",
                                                    "x5u": "http://127.0.0.1:9/x", "jwk": jwk})
    with pytest.raises(AccessDenied):
        check(JWTAuthorizer(key=_pem(RSA_KEY)), forged)
    # Signed with the configured key, the same header fields change nothing.
    ok = jwt.encode({"exp": int(time.time() + 60)}, SECRET, algorithm="HS256",
                    headers={"jku": "http://127.0.0.1:9/jwks"})
    assert check(JWTAuthorizer(key=SECRET), ok).expires is not None


def test_unknown_kids_do_not_make_the_gateway_fetch_the_jwks_each_time(
    jwks_url: str,
) -> None:
    """Each token naming a kid the JWKS lacks made the gateway fetch the
    JWKS (urllib, in a thread, under PyJWKClient's lock) where PyJWT has no
    cooldown (older releases; and after a failed fetch in any): 50 such
    tokens, 51 fetches to the identity provider. Now one per 30 s."""
    authorizer = JWTAuthorizer(jwks=jwks_url)
    assert authorizer._jwks is not None
    fetches = 0
    fetch = authorizer._jwks.fetch_data

    def counted() -> Any:
        nonlocal fetches
        fetches += 1
        return fetch()

    authorizer._jwks.fetch_data = counted  # type: ignore[method-assign]
    # As PyJWT before its cooldown, or after a fetch that failed.
    authorizer._jwks.cooldown_duration = 0
    assert check(authorizer, token(RSA_KEY, "RS256", _kid="r1")).can_read("news")
    for i in range(50):
        with pytest.raises(AccessDenied, match="invalid token"):
            check(authorizer, token(RSA_KEY, "RS256", _kid=f"nope-{i}"))
    assert fetches <= 2, f"{fetches} JWKS fetches for 50 tokens of unknown kids"
    assert check(authorizer, token(EC_KEY, "ES256", _kid="e1")).can_write("chat")


def test_a_token_may_not_be_combined_with_an_allow_list() -> None:
    """Claims are the allow-list with JWT; an --allow beside them (a ceiling
    the operator might expect) is refused, not silently ignored."""
    from pgcast.gateway import create_app

    with pytest.raises(ValueError, match="either an authorizer or allow"):
        create_app("postgresql://nowhere", authorizer=JWTAuthorizer(key=SECRET), allow=["a"])


def test_large_tokens_are_bounded_by_the_header_and_frame_limits(
    gateway: Callable[..., Gateway], unique_channel: str
) -> None:
    """A valid 40 KB token works in a header; one past the request-header
    limit (64 KiB) gets 431 before any verification; one in an auth frame
    past max_frame_bytes is refused naming the limit (as the first frame,
    the 4003 close said only "authenticate first"); a later one leaves the
    connection as it was."""
    from pgcast.gateway._linger import MAX_HEADER_BYTES

    mine = f"user.alice.{unique_channel}"
    gw = gateway(authorizer=JWTAuthorizer(key=SECRET), allow=())
    big = token(pad="x" * 40_000)
    huge = token(pad="x" * MAX_HEADER_BYTES)

    async def main() -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
            async with client.stream("GET", f"{gw.http}/sse?channel={mine}",
                                     headers={"Authorization": f"Bearer {big}"}) as r:
                assert r.status_code == 200
            r = await client.get(f"{gw.http}/sse?channel={mine}",
                                 headers={"Authorization": f"Bearer {huge}"})
            assert r.status_code == 431 and str(MAX_HEADER_BYTES) in r.text
        # As the first frame: the close (4003) says why.
        async with ws_connect(gw.ws) as ws:
            await ws.send(json.dumps({"type": "auth", "token": big}))
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003
            assert "the limit is 16384" in closed.value.rcvd.reason
        # To refresh an accepted token: an error frame, and the connection stays.
        async with ws_connect(gw.ws) as ws:
            assert (await request(ws, {"type": "auth", "token": token()}))[
                "type"] == "authenticated"
            reply = await request(ws, {"type": "auth", "token": big})
            assert reply["type"] == "error" and "the limit is 16384" in reply["message"]
            await subscribe(ws, mine)

    run(main())


class _IdP:
    """A JWKS endpoint on loopback that can be made to hang (until released,
    at most TIMEOUT) or to stop."""

    def __init__(self, document: bytes) -> None:
        self.document = document
        self.hang = threading.Event()
        self.release = threading.Event()
        self.requested = threading.Event()
        self.requests = 0
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                idp.requests += 1
                idp.requested.set()
                if idp.hang.is_set():
                    idp.release.wait(TIMEOUT)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(idp.document)
                except OSError:
                    pass  # the fetch gave up (its timeout)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


@pytest.fixture
def idp() -> Iterator[_IdP]:
    server = _IdP(_jwks(("r1", RSA_KEY), ("e1", EC_KEY)).encode())
    try:
        yield server
    finally:
        server.stop()


def test_a_hanging_identity_provider_delays_no_one_whose_key_is_cached(idp: _IdP) -> None:
    """The JWKS went stale (5 min) while the identity provider hung: each
    verification fetched it again itself (urllib, PyJWT's cache) and waited
    the full HTTP timeout, then was refused: an honest client with a key
    the gateway had fetched waited 10.0 s and got "invalid token: Fail to
    fetch data"; 20 at once 40.1 s (the default executor's 6 threads), all
    refused, 21 fetches. Now the cached keys serve at once while one fetch
    runs in the background (and after it fails)."""
    authorizer = JWTAuthorizer(jwks=idp.url, jwks_lifespan=0.001, jwks_timeout=TIMEOUT)
    assert check(authorizer, token(RSA_KEY, "RS256", _kid="r1")).can_read("news")
    idp.requested.clear()
    idp.hang.set()

    async def honest() -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(*(
            authorizer(None, token(RSA_KEY, "RS256", _kid="r1")) for _ in range(20))), TIMEOUT)

    accesses = asyncio.run(honest())  # before the hanging fetch is released
    assert all(access.can_read("news") for access in accesses)
    assert idp.requested.wait(TIMEOUT), "the stale JWKS was not fetched again"
    assert not idp.release.is_set()
    assert idp.requests == 2, f"{idp.requests} fetches: one at a time"


def test_an_unknown_kid_while_the_identity_provider_hangs_gets_a_clear_error(
    idp: _IdP,
) -> None:
    """A token whose kid is not cached waits for the fetch under way at most
    jwks_timeout, then is refused saying so; a known kid is not delayed."""
    authorizer = JWTAuthorizer(jwks=idp.url, jwks_timeout=0.5)
    assert authorizer._jwks is not None
    authorizer._jwks.timeout = TIMEOUT  # the fetch outlasts the wait for it
    assert check(authorizer, token(RSA_KEY, "RS256", _kid="r1")).can_read("news")
    idp.hang.set()
    with pytest.raises(AccessDenied, match=r"no key with kid 'new'.*being fetched"):
        check(authorizer, token(RSA_KEY, "RS256", _kid="new"))
    assert check(authorizer, token(EC_KEY, "ES256", _kid="e1")).can_write("chat")
    # The fetch ends without the kid, which is not fetched again for 30 s.
    fetch = authorizer._fetch
    assert fetch is not None
    idp.release.set()
    fetch.result(TIMEOUT)
    with pytest.raises(AccessDenied, match=r"no key with kid 'new' in the JWKS \(fetched again"):
        check(authorizer, token(RSA_KEY, "RS256", _kid="new"))
    assert idp.requests == 2
    assert check(authorizer, token(RSA_KEY, "RS256", _kid="r1")).can_read("news")


def test_an_identity_provider_that_is_down_from_the_start(
    idp: _IdP, caplog: pytest.LogCaptureFixture,
) -> None:
    url = idp.url
    idp.stop()
    authorizer = JWTAuthorizer(jwks=url, jwks_timeout=1)
    with caplog.at_level(logging.WARNING, logger="pgcast.gateway"), pytest.raises(
            AccessDenied, match=r"no key with kid 'r1'.*last fetch of the JWKS failed: "
                                r"Fail to fetch"):
        check(authorizer, token(RSA_KEY, "RS256", _kid="r1"))
    assert f"fetching the JWKS from {url} failed" in caplog.text
    with pytest.raises(AccessDenied, match="has no kid"):
        check(authorizer, jwt.encode({"exp": int(time.time() + 60)}, RSA_KEY, algorithm="RS256"))
    with pytest.raises(ValueError, match="jwks_timeout must be a positive"):
        JWTAuthorizer(jwks=url, jwks_timeout=0)


def test_the_gateway_serves_websocket_and_sse_while_the_identity_provider_hangs(
    gateway: Callable[..., Gateway], idp: _IdP, unique_channel: str,
) -> None:
    """End to end: the JWKS stale and the identity provider hanging, a
    client with a known key connects over WebSocket and SSE before the
    hanging fetch is let go (before: each waited 10 s and got 403)."""
    mine = f"user.alice.{unique_channel}"
    authorizer = JWTAuthorizer(jwks=idp.url, jwks_lifespan=0.001, jwks_timeout=TIMEOUT)
    gw = gateway(authorizer=authorizer, allow=())
    good = token(RSA_KEY, "RS256", _kid="r1")

    async def main() -> None:
        async with ws_connect(gw.ws, subprotocols=["pgcast", f"pgcast.token.{good}"]) as ws:
            await subscribe(ws, mine)  # the JWKS is fetched and cached
        idp.requested.clear()
        idp.hang.set()
        async with ws_connect(gw.ws, subprotocols=["pgcast", f"pgcast.token.{good}"]) as ws:
            await subscribe(ws, mine)
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client, \
                client.stream("GET", f"{gw.http}/sse?channel={mine}",
                              headers={"Authorization": f"Bearer {good}"}) as r:
            assert r.status_code == 200
        assert await asyncio.to_thread(idp.requested.wait, TIMEOUT)
        assert not idp.release.is_set()

    run(main())
