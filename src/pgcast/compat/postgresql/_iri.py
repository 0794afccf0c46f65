"""py-postgresql's connection parameters as libpq's.

py-postgresql opens a connection from a *PQ IRI* and keywords::

    pq://user:password@host:port/database?setting=value&[driver_param]=value#search_path

``host`` may be ``[::1]`` (IPv6) or ``[unix:/path:to:socket]`` (the socket
file, ``/`` written ``:``); query keys in brackets are connection parameters,
the others server settings; the fragment is the ``search_path``. The scheme
``pq://`` may be omitted (``'localhost/postgres'``). Keywords (``user``,
``password``, ``host``, ``port``, ``database``, ``unix``, ``settings``,
``sslmode``, ``connect_timeout``, ...) override the IRI. What neither gives
comes, as in py-postgresql, from the ``PG*`` variables and ``~/.pgpass``
(libpq reads them).

:func:`libpq_params` turns both into the keyword arguments of
``psycopg.connect``: ``database`` is ``dbname``, a unix socket file is
libpq's socket directory and port, settings travel in ``options`` as
``-c name=value`` (``application_name`` as libpq's parameter of that
name), and py-postgresql's SSL file names are libpq's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote

__all__ = ["libpq_params", "parse_iri"]

_IRI = re.compile(
    r"(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://)?"
    r"(?P<netloc>(?:[^/?#\[]|\[[^\]]*\])*)(?P<path>/[^?#]*)?(?:\?(?P<query>[^#]*))?(?:#(?P<fragment>.*))?",
    re.DOTALL,
)

#: py-postgresql's keyword -> libpq's, where they differ.
_RENAMED = {
    "database": "dbname",
    "sslcrtfile": "sslcert",
    "sslkeyfile": "sslkey",
    "sslrootcrtfile": "sslrootcert",
    "sslrootcrlfile": "sslcrl",
}

#: The socket file name libpq derives from a port.
_SOCKET_FILE = re.compile(r"\.s\.PGSQL\.(\d+)")


def parse_iri(iri: str) -> dict[str, Any]:
    """py-postgresql's parameters of a PQ IRI (``settings`` a dict).

    :raises ValueError: not a ``pq``, ``postgres`` or ``postgresql`` IRI.
    """
    found = _IRI.fullmatch(iri)
    scheme = (found["scheme"] if found else None) or "pq"
    if found is None or scheme.lower() not in {"pq", "postgres", "postgresql"}:
        raise ValueError(f"not a PQ IRI (pq://user:password@host:port/database): {iri!r}")
    params: dict[str, Any] = {}
    userinfo, _, hostport = found["netloc"].rpartition("@")
    if userinfo:
        user, colon, password = userinfo.partition(":")
        params["user"] = unquote(user)
        if colon:
            params["password"] = unquote(password)
    if hostport.startswith("["):
        inside, _, rest = hostport[1:].partition("]")
        if inside.startswith("unix:"):
            params["unix"] = inside[len("unix:"):].replace(":", "/")
        else:
            params["host"] = inside
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = hostport.partition(":")
        if host:
            params["host"] = unquote(host)
    if port:
        params["port"] = port
    database = (found["path"] or "/").split("/")[1]
    if database:
        params["database"] = unquote(database)
    settings: dict[str, str] = {}
    for key, value in parse_qsl(found["query"] or "", keep_blank_values=True):
        if key.startswith("[") and key.endswith("]"):
            params.setdefault(key[1:-1], value)
        elif key:
            settings[key] = value
    if found["fragment"]:
        settings["search_path"] = ",".join(unquote(p) for p in found["fragment"].split(","))
    if settings:
        params["settings"] = settings
    return params


def _options(settings: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """Server settings as libpq's ``options``: ``-c name=value`` each, with
    spaces and backslashes escaped as libpq requires."""
    pairs = settings.items() if isinstance(settings, Mapping) else settings
    words = []
    for name, given in pairs:
        # py-postgresql's search_path may be a list
        value = ",".join(map(str, given)) if isinstance(given, list | tuple) else given
        text = f"{name}={value}".replace("\\", "\\\\").replace(" ", "\\ ")
        words.append(f"-c {text}")
    return " ".join(words)


def libpq_params(iri: str | None, kw: dict[str, Any]) -> dict[str, Any]:
    """The ``psycopg.connect`` keywords for ``postgresql.open(iri, **kw)``.

    Keywords override what the IRI says.
    """
    params = parse_iri(iri) if iri else {}
    if "unix" in kw:
        params.pop("host", None)
        params.pop("port", None)
    settings = dict(params.pop("settings", {}))
    given = dict(kw)
    extra = given.pop("settings", None)
    if extra:
        settings.update(extra.items() if isinstance(extra, Mapping) else extra)
    params.update(given)
    unix = params.pop("unix", None)
    if unix is not None:
        directory, name = os.path.split(str(unix))
        params["host"] = directory
        socket_port = _SOCKET_FILE.fullmatch(name)
        if socket_port is None:
            raise ValueError(
                f"unix={unix!r}: libpq connects to a socket named .s.PGSQL.<port> "
                "in a directory; give the path of such a file"
            )
        params["port"] = socket_port[1]
    out = {_RENAMED.get(k, k): v for k, v in params.items() if v is not None}
    if "application_name" in settings:  # a libpq parameter too, and pgcast sets that one
        out.setdefault("application_name", settings.pop("application_name"))
    if settings:
        options = _options(settings)
        out["options"] = f"{out['options']} {options}" if out.get("options") else options
    return out
