"""``pgcast.connect()`` and ``pgcast.aio.connect()`` take psycopg2's keywords.

pgpubsub hands its arguments to ``psycopg2.connect()``, whose spellings differ
from psycopg 3's in a few places (``database``, ``dsn=``, ``async_``,
``connection_factory``/``cursor_factory``): each is mapped or refused with
the reason, in both flavours, against a real server.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgcast
import pgcast.aio
from _eventwait import ARRIVAL_TIMEOUT, arun


def split(dsn: str) -> dict[str, Any]:
    """The test DSN as psycopg2-style keywords, with ``database`` for ``dbname``."""
    params: dict[str, Any] = conninfo_to_dict(dsn)
    params["database"] = params.pop("dbname")
    return params


def test_database_keyword_is_dbname(dsn: str) -> None:
    params = split(dsn)
    with pgcast.connect(**params) as ps:
        assert ps.connection.info.dbname == params["database"]


def test_aio_database_keyword_is_dbname(dsn: str) -> None:
    params = split(dsn)

    async def body() -> None:
        async with await pgcast.aio.connect(**params) as ps:
            assert ps.connection.info.dbname == params["database"]

    arun(body())


def test_dsn_keyword_is_the_connection_string(dsn: str) -> None:
    with pgcast.connect(dsn=dsn) as ps:
        assert ps.connection.info.dbname == conninfo_to_dict(dsn)["dbname"]


def test_aio_dsn_keyword_is_the_connection_string(dsn: str) -> None:
    async def body() -> None:
        async with await pgcast.aio.connect(dsn=dsn) as ps:
            assert ps.connection.info.dbname == conninfo_to_dict(dsn)["dbname"]

    arun(body())


def test_dsn_keyword_with_other_keywords_they_win(dsn: str) -> None:
    # psycopg2: "if the same parameter name is specified in both sources, the
    # kwargs value will have precedence over the dsn value".
    given = make_conninfo(dsn, application_name="from_dsn")
    with pgcast.connect(dsn=given, application_name="from_kwargs") as ps:
        assert ps.connection.info.parameter_status("application_name") == "from_kwargs"


def test_async_false_is_accepted(dsn: str) -> None:
    with pgcast.connect(dsn, async_=False) as ps, pgcast.connect(dsn, **{"async": 0}) as ps2:
        assert not ps.closed and not ps2.closed


CONFLICTS: list[tuple[dict[str, Any], str]] = [
    ({"database": "a", "dbname": "b"}, "both 'database' and 'dbname'"),
    ({"dsn": "dbname=a"}, "both a connection string and 'dsn='"),
    ({"async_": True}, "pgcast.aio.connect()"),
    ({"async": True}, "pgcast.aio.connect()"),
    ({"connection_factory": object}, "connection_factory="),
    ({"cursor_factory": object}, "cursor_factory="),
]


@pytest.mark.parametrize(("kwargs", "message"), CONFLICTS)
def test_conflicts_are_refused_before_connecting(
    dsn: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pgcast.connect(dsn, **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), CONFLICTS)
def test_aio_conflicts_are_refused_before_connecting(
    dsn: str, kwargs: dict[str, Any], message: str
) -> None:
    async def body() -> None:
        with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            await pgcast.aio.connect(dsn, **kwargs)

    arun(body())


def test_dsn_keyword_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="dsn must be a connection string, not int"):
        pgcast.connect(dsn=5)


def test_reconnect_keeps_the_mapped_database(dsn: str) -> None:
    # The mapped arguments are what a reconnect opens again.
    params = split(dsn)
    with pgcast.connect(**params, reconnect_backoff=pgcast.Backoff(initial=0.01)) as ps:
        ps.listen("compat_connect_reconnect")
        old = ps.backend_pid
        with pgcast.connect(dsn) as killer:
            killer.notify("compat_connect_reconnect", "before")
            killer.connection.execute("SELECT pg_terminate_backend(%s)", (old,))
        got: list[object] = []
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        for item in ps.events(select_timeout=0.05, yield_timeouts=True):
            got.append(item)
            if isinstance(item, pgcast.Reconnected) or time.monotonic() > deadline:
                break
        assert isinstance(got[-1], pgcast.Reconnected), got
        assert ps.backend_pid != old
        assert ps.connection.info.dbname == params["database"]


def test_connect_keywords_and_defaults_are_written_once() -> None:
    """connect()'s own keywords are RESILIENCE_KEYWORDS (plus install_schema),
    with resilience()'s defaults: connect_as() and compat take that list."""
    import inspect

    from pgcast._connect import RESILIENCE_KEYWORDS
    from pgcast._reconnect import resilience

    defaults = inspect.signature(resilience).parameters
    for connect in (pgcast.connect, pgcast.aio.connect):
        params = inspect.signature(connect).parameters
        own = set(params) - {"conninfo", "install_schema", "kwargs"}
        assert own == set(RESILIENCE_KEYWORDS), connect
        for name in RESILIENCE_KEYWORDS:
            assert params[name].default == defaults[name].default, (connect, name)


def test_compat_open_passes_every_pgcast_keyword(dsn: str) -> None:
    from pgcast.compat import postgresql

    params = conninfo_to_dict(dsn)
    on_gap, on_reconnect = print, repr
    with postgresql.open(
        host=params.get("host"), port=params.get("port"), user=params.get("user"),
        database=params["dbname"], on_gap=on_gap, on_reconnect=on_reconnect,
        notify_timeout=3, health_check_interval=0,
    ) as conn:
        res = conn._res
        assert (res.on_gap, res.on_reconnect, res.notify_timeout) == (on_gap, on_reconnect, 3.0)
        assert (res.reconnect, res.health_check_interval) == (False, 0)


@pytest.mark.parametrize("bad", [{"notify_timeout": -1}, {"reconnect": "yes"}])
def test_pgcast_keywords_are_checked_before_connecting(bad: dict[str, Any]) -> None:
    from pgcast.client._open import connect_as

    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        connect_as(pgcast.PubSub, "host=127.0.0.1 port=1 connect_timeout=1", **bad)
