"""``pgcast serve`` (the gateway) and ``pgcast demo`` (the gateway, an embedded
server and the three-bar page).

Starlette and uvicorn are imported when one of these commands runs, so the
rest of the CLI works without the ``gateway`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from ._common import UsageError, add_dsn_argument, resolve_dsn
from ._workers import REUSE_PORT_FLAG, run_workers

__all__ = ["register"]

DEMO_CHANNEL = "data"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="run the WebSocket/SSE gateway",
        description="Serve PostgreSQL notifications to browsers over WebSocket (/ws) and "
        "Server-Sent Events (/sse), with /healthz and /metrics, on one LISTEN connection. "
        "Clients may subscribe only to channels matching --allow and publish only to "
        "channels matching --allow-publish.",
    )
    add_dsn_argument(p)
    _add_listen_arguments(p)
    p.add_argument("--allow", action="append", default=[], metavar="GLOB",
                   help="channels clients may subscribe to (fnmatch glob; repeatable)")
    p.add_argument("--allow-publish", action="append", default=[], metavar="GLOB",
                   help="channels clients may publish to (fnmatch glob; repeatable)")
    p.add_argument("--durable", action="append", default=[], metavar="GLOB",
                   help="durable channels (pgcast.durable): no message missed across the "
                   "gateway's reconnects, and clients may resume from a log id (repeatable)")
    p.add_argument("--allowed-origin", action="append", default=None, metavar="ORIGIN",
                   help="a browser origin allowed to connect, e.g. https://app.example.com, "
                   "or * for any (repeatable; default: the gateway's own origin only)")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a Host header value requests may carry (no port; *.example.com "
                   "for subdomains; * for any; repeatable). Stops DNS rebinding. Default: "
                   "the loopback names when --host is a loopback address, else any")
    p.add_argument("--max-clients", type=int, default=50_000, metavar="N",
                   help="clients connected at once, per worker (default 50000; the "
                   "process's descriptor limit is raised to its hard limit, and a note "
                   "says when that allows fewer)")
    p.add_argument("--max-channels", type=int, default=10_000, metavar="N",
                   help="distinct channels of all clients together, each a LISTEN on the "
                   "worker's connection (default 10000)")
    p.add_argument("--replay-wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long a resume's query waits for its turn on the one replay "
                   "connection before the resume fails with an error (default 10)")
    p.add_argument("--queue-size", type=int, default=1000, metavar="N",
                   help="messages queued per client before --overflow applies (default 1000)")
    p.add_argument("--overflow", choices=("disconnect", "drop-oldest"), default="disconnect",
                   help="what happens to a client whose queue is full (default disconnect)")
    p.add_argument("--demo-page", action="store_true",
                   help="also serve the three-bar demo page at /")
    ops = p.add_argument_group("operations", "behind a load balancer or proxy")
    ops.add_argument("--workers", type=int, default=1, metavar="N",
                     help="N processes sharing the port (SO_REUSEPORT), each with its own "
                     "LISTEN connection (default 1)")
    ops.add_argument(REUSE_PORT_FLAG, action="store_true", help=argparse.SUPPRESS)
    ops.add_argument("--log-level", default="info",
                     choices=("critical", "error", "warning", "info", "debug", "trace"),
                     help="uvicorn's log level (default info; tokens are always redacted)")
    ops.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                     help="log each request and WebSocket (default on)")
    ops.add_argument("--ssl-certfile", metavar="PATH", help="serve HTTPS/WSS with this certificate")
    ops.add_argument("--ssl-keyfile", metavar="PATH", help="the certificate's private key")
    ops.add_argument("--proxy-headers", action=argparse.BooleanOptionalAction, default=True,
                     help="take the client address and scheme from X-Forwarded-* headers "
                     "sent by --forwarded-allow-ips (default on)")
    ops.add_argument("--forwarded-allow-ips", default="127.0.0.1", metavar="IPS",
                     help="comma-separated proxy addresses whose X-Forwarded-* headers are "
                     "trusted (default 127.0.0.1; * for any: only behind a proxy)")
    ops.add_argument("--metrics-token-file", metavar="PATH",
                     help="file holding a secret /metrics then requires from any address "
                     "(Authorization: Bearer; or PGCAST_METRICS_TOKEN). Default: /metrics "
                     "answers loopback clients only")
    ops.add_argument("--metrics-public", action="store_true",
                     help="serve /metrics to anyone (no token): it shows client and channel "
                     "counts, traffic and the server process id, no names nor addresses")
    limits = p.add_argument_group(
        "rate limits", "per client, and --total-publish-rate for all together; over a limit "
        "a request gets an error frame, and a client refused 50 times within 10 s (over its "
        "own limits) is closed with 4029")
    limits.add_argument("--publish-rate", type=float, default=100.0, metavar="N",
                        help="publishes a second per client (bursts of 2N; default 100)")
    limits.add_argument("--request-rate", type=float, default=50.0, metavar="N",
                        help="other requests (subscribe, unsubscribe, ping, auth) a second "
                        "per client (bursts of 2N; default 50)")
    limits.add_argument("--total-publish-rate", type=float, default=1000.0, metavar="N",
                        help="publishes a second of all clients together, per worker "
                        "(bursts of 2N; default 1000): NOTIFY's queue is shared by the "
                        "whole database")
    limits.add_argument("--no-rate-limits", action="store_true",
                        help="no per-client rate limits at all")
    limits.add_argument("--max-clients-per-address", type=int, default=1000, metavar="N",
                        help="connections at once from one client address, an IPv6 address "
                        "counting as its /64 (default 1000; 0: no cap). Raise it when many "
                        "users share one address (NAT); behind a proxy, trust its headers "
                        "(--forwarded-allow-ips) or the cap counts the proxy's address")
    limits.add_argument("--max-channels-per-address", type=int, default=None, metavar="N",
                        help="channels one client address may create (subscribe to while no "
                        "client has them) and hold (default a quarter of --max-channels; "
                        "0: no cap), so one address cannot take them all")
    jwt = p.add_argument_group(
        "JWT", "verify JSON Web Tokens instead of --allow/--allow-publish: a token's "
        "channels.read / channels.publish claims are the globs it may subscribe to / "
        "publish on, until its exp (needs pgcast[jwt])")
    jwt.add_argument("--jwt-key", metavar="SECRET",
                     help="HMAC secret (visible in ps: prefer --jwt-key-file or PGCAST_JWT_KEY)")
    jwt.add_argument("--jwt-key-file", metavar="PATH",
                     help="file holding the HMAC secret or a PEM public key")
    jwt.add_argument("--jwt-jwks", metavar="PATH_OR_URL",
                     help="a JWKS document (file, or https:// URL fetched and cached)")
    jwt.add_argument("--jwt-audience", metavar="AUD", help="the required aud claim")
    jwt.add_argument("--jwt-issuer", metavar="ISS", help="the required iss claim")
    jwt.add_argument("--jwt-algorithm", action="append", default=None, metavar="ALG",
                     help="an accepted alg (repeatable; default HS256 for a secret, "
                     "RS256 and ES256 for a public key or JWKS)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "demo", help="the demo: a browser page whose bars move on NOTIFY",
        description="Start an embedded PostgreSQL (unless --dsn), the gateway and a page "
        f"with three coloured bars at http://HOST:PORT/. `NOTIFY {DEMO_CHANNEL}, 'green'` "
        "in psql moves the green bar; the buttons publish too. With --terminal, the "
        "terminal demo instead.",
    )
    p.add_argument("--dsn", help="use this PostgreSQL instead of a temporary embedded one")
    _add_listen_arguments(p)
    p.add_argument("--terminal", action="store_true",
                   help="run the terminal demo (a listener printing notifications) instead")
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)


def _add_listen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000,
                   help="port to listen on, 0 to 65535 (0: any free one; default 8000)")


def _port(text: str) -> int:
    """A TCP port for argparse: a clear usage error instead of bind()'s
    OverflowError traceback."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: ports are 0 to 65535")
    return port


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Bind before starting, so a busy port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # one of several workers on the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                      "choose another with --port") from None
    sock.set_inheritable(True)
    return sock


def _check_database(dsn: str) -> None:
    """Connect once first, so an unreachable database is a one-line error
    rather than uvicorn's start-up traceback."""
    from .. import client

    client.connect(dsn).close()


def _run(app: Any, sock: socket.socket, log_level: str = "info", **options: Any) -> int:
    from ..gateway._serve import GatewayServer, config

    host, port = sock.getsockname()[:2]
    server = GatewayServer(config(app, host, port, log_level=log_level, **options))
    server.run(sockets=[sock])
    # uvicorn returns without starting when the app's start-up failed (it logged why).
    return 0 if server.started else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from ..gateway import create_app

    authorizer = jwt_authorizer(args)
    options = serve_options(args)
    cap = per_address(args.max_clients_per_address)
    metrics_token = read_metrics_token(args)
    if authorizer is None and not args.allow:
        print("pgcast serve: warning: no --allow given, so clients can subscribe to no "
              "channel", file=sys.stderr)
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    dsn = resolve_dsn(args)
    _check_database(dsn)
    _raise_descriptor_limit(args.max_clients)
    if args.workers > 1:
        _bind(args.host, args.port).close()  # a busy port: one line, before any worker
        return run_workers(args.argv, args.workers, dsn)
    sock = _bind(args.host, args.port, reuse_port=args.reuse_port)
    app = create_app(
        dsn,
        allow=args.allow,
        allow_publish=args.allow_publish,
        authorizer=authorizer,
        rate_limits=rate_limits(args),
        max_clients_per_address=cap,
        max_channels_per_address=channels_per_address(args.max_channels_per_address),
        allowed_origins=args.allowed_origin,
        allowed_hosts=allowed_hosts(args.host, args.allowed_host),
        max_clients=args.max_clients,
        max_channels=args.max_channels,
        replay_wait=args.replay_wait,
        queue_size=args.queue_size,
        overflow=args.overflow,
        durable=args.durable,
        demo_page=args.demo_page,
        metrics_token=metrics_token,
        metrics_public=args.metrics_public,
    )
    scheme = "https" if args.ssl_certfile else "http"
    print(f"pgcast gateway on {scheme}://{_url_host(args.host)}:{args.port}/ "
          f"(WebSocket /ws, SSE /sse, /healthz, /metrics, the browser client /pgcast.js)",
          file=sys.stderr, flush=True)
    return _run(app, sock, **options)


#: Descriptors a gateway process needs besides one per client (its
#: listening socket, database connections, log files, the interpreter's own).
_SPARE_DESCRIPTORS = 64


def _raise_descriptor_limit(max_clients: int) -> None:
    """Raise the soft limit on open files to the hard one (each client is a
    socket); say so when even that allows fewer clients than *max_clients*."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft - _SPARE_DESCRIPTORS < max_clients:
        print(f"pgcast serve: note: the open-file limit is {soft}, so each process holds "
              f"at most about {max(0, soft - _SPARE_DESCRIPTORS)} clients, fewer than "
              f"--max-clients {max_clients}; raise it (ulimit -n, systemd LimitNOFILE=) or "
              "run several --workers", file=sys.stderr)


def pgcast_command() -> str:
    """How to run this very ``pgcast`` from a shell: ``pgcast`` when that is
    what PATH finds, else the script's full path (``make demo`` runs it from
    ``.venv-demo/bin``, which is not on PATH), else ``python -m pgcast``."""
    script = Path(sys.argv[0]).resolve()
    found = shutil.which("pgcast")
    if found is not None and (script.name != "pgcast" or Path(found).resolve() == script):
        return "pgcast"
    if script.name == "pgcast" and script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m pgcast"


def serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn's options from ``pgcast serve``'s operations flags.

    :raises UsageError: half a TLS pair, or a file that cannot be read.
    """
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise UsageError("TLS needs both --ssl-certfile and --ssl-keyfile")
    for path in (args.ssl_certfile, args.ssl_keyfile):
        if path and not os.access(path, os.R_OK):
            raise UsageError(f"cannot read {path}")
    if args.proxy_headers and "*" in (h.strip() for h in args.forwarded_allow_ips.split(",")):
        print("pgcast serve: warning: --forwarded-allow-ips '*' takes a client's address from "
              "the first X-Forwarded-For entry, which the client can write itself unless the "
              "proxy replaces the header (nginx: proxy_set_header X-Forwarded-For "
              "$remote_addr); --max-clients-per-address and /metrics' loopback check then "
              "believe it. Prefer the proxy's address or network (e.g. 10.0.0.0/8)",
              file=sys.stderr)
    options: dict[str, Any] = {
        "log_level": args.log_level,
        "access_log": args.access_log,
        "proxy_headers": args.proxy_headers,
        "forwarded_allow_ips": args.forwarded_allow_ips,
    }
    if args.ssl_certfile:
        options.update(ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return options


def _secret(path: str | None, flag: str, env: str, given: str | None = None) -> str | None:
    """A secret from the file *path* (option *flag*), else *given*, else
    the environment variable *env*. :raises UsageError: unreadable file."""
    if not path:
        return given or os.environ.get(env) or None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def read_metrics_token(args: argparse.Namespace) -> str | None:
    """The metrics token of ``--metrics-token-file`` or ``PGCAST_METRICS_TOKEN``.

    :raises UsageError: an unreadable file, a token under 16 characters,
        or a token with ``--metrics-public``.
    """
    token = _secret(args.metrics_token_file, "--metrics-token-file", "PGCAST_METRICS_TOKEN")
    if token is not None and (len(token) < 16 or not token.isprintable()):
        raise UsageError("the metrics token must be at least 16 printable characters")
    if token is not None and args.metrics_public:
        raise UsageError("--metrics-public and a metrics token exclude each other")
    return token


def channels_per_address(value: int | None) -> int | Literal["auto"] | None:
    """``--max-channels-per-address``: unset for a quarter of
    ``--max-channels``, 0 for no cap.

    :raises UsageError: a negative number.
    """
    if value is None:
        return "auto"
    if value < 0:
        raise UsageError(f"--max-channels-per-address must be 0 (no cap) or more, got {value}")
    return value or None


def per_address(value: int) -> int | None:
    """``--max-clients-per-address``: 0 for no cap.

    :raises UsageError: a negative number.
    """
    if value < 0:
        raise UsageError(f"--max-clients-per-address must be 0 (no cap) or more, got {value}")
    return value or None


def rate_limits(args: argparse.Namespace) -> Any:
    """The :class:`~pgcast.gateway.RateLimits` the options describe, or None.

    :raises UsageError: a rate that is not a positive number.
    """
    if args.no_rate_limits:
        return None
    from ..gateway import RateLimits

    def burst(rate: float) -> int:
        return max(1, round(2 * rate)) if math.isfinite(rate) and rate > 0 else 1

    try:
        return RateLimits(
            publishes_per_second=args.publish_rate,
            publish_burst=burst(args.publish_rate),
            requests_per_second=args.request_rate,
            request_burst=burst(args.request_rate),
            total_publishes_per_second=args.total_publish_rate,
            total_publish_burst=burst(args.total_publish_rate),
        )
    except ValueError as exc:
        raise UsageError(f"--publish-rate/--request-rate/--total-publish-rate: {exc}") from None


def jwt_authorizer(args: argparse.Namespace) -> Any:
    """The JWT authorizer the ``--jwt-*`` options describe, or None.

    :raises UsageError: contradictory options.
    """
    key = _secret(args.jwt_key_file, "--jwt-key-file", "PGCAST_JWT_KEY", args.jwt_key)
    options = (key, args.jwt_jwks, args.jwt_audience, args.jwt_issuer, args.jwt_algorithm)
    if not any(options):
        return None
    if args.allow or args.allow_publish:
        raise UsageError("--jwt-* and --allow/--allow-publish exclude each other: with JWT "
                         "the token's claims say which channels a client may use")
    if not key and not args.jwt_jwks:
        raise UsageError("JWT needs a key: --jwt-key-file, --jwt-key (or PGCAST_JWT_KEY) "
                         "or --jwt-jwks")
    if key and args.jwt_jwks:
        raise UsageError("give either a JWT key or --jwt-jwks, not both")
    try:
        from ..gateway.jwt import JWTAuthorizer
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    try:
        return JWTAuthorizer(key=key if not args.jwt_jwks else None, jwks=args.jwt_jwks,
                             algorithms=args.jwt_algorithm, audience=args.jwt_audience,
                             issuer=args.jwt_issuer)
    except ValueError as exc:
        raise UsageError(f"JWT: {exc}") from None


#: The names a browser on this machine uses for a loopback address.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def allowed_hosts(host: str, given: list[str] | None) -> list[str] | None:
    """The ``allowed_hosts`` of ``pgcast serve``: those given, else the
    loopback names when listening on loopback (a page whose name rebinds to
    127.0.0.1 must not reach a local gateway), else any."""
    if given:
        return None if "*" in given else given
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return list(LOOPBACK_HOSTS) if loopback else None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@contextlib.contextmanager
def _database(dsn: str | None) -> Iterator[tuple[str, str]]:
    """Yield a DSN and the psql executable to reach it."""
    if dsn:
        yield dsn, "psql"
        return
    from ..embedded import EmbeddedServer

    print("starting an embedded PostgreSQL...", file=sys.stderr, flush=True)
    with EmbeddedServer() as srv:
        yield srv.dsn, str(srv.bin_dir / "psql")


def demo_command(psql: str, dsn: str, colour: str = "green") -> str:
    """The shell command that moves the *colour* bar of the demo page."""
    # Double quotes around the SQL: readable, and nothing in it is special to a shell.
    return f"{shlex.quote(psql)} {shlex.quote(dsn)} -c \"NOTIFY {DEMO_CHANNEL}, '{colour}'\""


def without_password(dsn: str) -> str:
    """*dsn* without its password (as key=value then), or as it is."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # psycopg.ProgrammingError: not a DSN; shown as given
        return dsn
    if "password" not in params:
        return dsn
    return make_conninfo("", **{k: v for k, v in params.items() if k != "password"})


def cmd_demo(args: argparse.Namespace) -> int:
    if args.terminal:
        from . import terminal_demo

        return terminal_demo.run(args.dsn, seconds=args.seconds)
    from ..gateway import create_app

    sock = _bind(args.host, args.port)
    with _database(args.dsn) as (dsn, psql):
        _check_database(dsn)
        command = demo_command(psql, dsn)
        app = create_app(
            dsn,
            allow=[DEMO_CHANNEL],
            allow_publish=[DEMO_CHANNEL],
            demo_page=True,
            # The page is seen by whoever reaches --host: no password on it.
            demo_command=demo_command(psql, without_password(dsn)),
            allowed_hosts=allowed_hosts(args.host, None),
        )
        url = f"http://{_url_host(args.host)}:{args.port}/"
        print(f"\npgcast demo: open {url}\n\nMove the green bar from a terminal with:\n\n"
              f"    {command}\n\n(or: {pgcast_command()} notify --dsn {shlex.quote(dsn)} "
              f"{DEMO_CHANNEL} green)\nCtrl-C to stop.\n", flush=True)
        return _run(app, sock, log_level="warning")
