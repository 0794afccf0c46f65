"""Issue a token for pgcast's gateway, as your login service would.

    export PGCAST_JWT_KEY=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    pgcast serve --jwt-audience pgcast &        # reads PGCAST_JWT_KEY
    python examples/jwt/issue_token.py alice --read 'user.alice.*' --publish chat

prints a JWT valid for --minutes (default 15) that lets *alice* subscribe to
``user.alice.*`` and publish on ``chat``. A browser page then connects with
``new WebSocket(url, ["pgcast", "pgcast.token." + token])`` and, before the
token expires, sends ``{"type": "auth", "token": fresh}`` to stay connected.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jwt


def issue(key: str, user: str, *, read: list[str], publish: list[str], minutes: float,
          audience: str = "pgcast") -> str:
    """A signed HS256 token with the claims pgcast's JWTAuthorizer reads."""
    now = int(time.time())
    claims = {
        "sub": user,
        "aud": audience,
        "iat": now,
        "exp": now + int(minutes * 60),
        "channels": {"read": read, "publish": publish},
    }
    return jwt.encode(claims, key, algorithm="HS256")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("user")
    parser.add_argument("--read", action="append", default=[], metavar="GLOB")
    parser.add_argument("--publish", action="append", default=[], metavar="GLOB")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--audience", default="pgcast")
    args = parser.parse_args(argv)
    key = os.environ.get("PGCAST_JWT_KEY")
    if not key:
        print("issue_token: set PGCAST_JWT_KEY to the secret pgcast serve uses", file=sys.stderr)
        return 2
    print(issue(key, args.user, read=args.read, publish=args.publish, minutes=args.minutes,
                audience=args.audience))
    return 0


if __name__ == "__main__":
    sys.exit(main())
