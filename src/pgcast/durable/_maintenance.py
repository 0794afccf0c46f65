"""The steps of the schema's maintenance, pure: pruning the log, listing the
consumers' lag, and what a failed install becomes. Run against a connection by
:mod:`pgcast.durable._run_async` (and its generated sync twin), the same way
in both flavours.
"""

from __future__ import annotations

from datetime import timedelta

import psycopg

from .._checks import wrap_error
from .._errors import PgcastError, SchemaError
from ._lag import ConsumerLag, consumers_query, lag_of
from ._schema import PruneResult, Steps, prune_query, warn_old_schema

__all__ = ["consumers_steps", "prune_steps", "schema_error"]


def schema_error(exc: BaseException) -> PgcastError:
    """The error to raise when installing the schema failed with *exc* (a
    psycopg error, or a pgcast error caused by one)."""
    cause = exc if isinstance(exc, psycopg.Error) else exc.__cause__
    if isinstance(cause, psycopg.errors.InsufficientPrivilege):
        return SchemaError(
            "the pgcast schema (needed for durable channels and payloads of 8000 "
            f"bytes or more) is not installed and this role may not install it: {cause}. "
            "Run `pgcast init` (or pgcast.install_schema(conn)) as a role that may "
            "create schemas in this database"
        )
    if isinstance(cause, psycopg.errors.ReadOnlySqlTransaction):
        return SchemaError(
            f"the pgcast schema cannot be installed on a read-only server or transaction: {cause}"
        )
    if isinstance(exc, PgcastError):
        return exc
    assert isinstance(exc, psycopg.Error)
    return wrap_error(exc)


def _installed_version(table: str, otherwise: str) -> Steps[int]:
    """The installed schema's version; SchemaError saying *otherwise* when
    the schema (its table ``pgcast.<table>``) is not installed. Reads only."""
    exists = yield ("SELECT to_regclass(%s) IS NOT NULL", (f"pgcast.{table}",))
    if not exists[0][0]:
        raise SchemaError(
            f"the pgcast schema is not installed in this database: {otherwise} "
            "(`pgcast init` installs it)"
        )
    found = yield ("SELECT coalesce(max(version), 0) FROM pgcast.schema_version", None)
    return int(found[0][0])


def prune_steps(
    older_than: timedelta | None,
    keep_last: int | None,
    channel: str | None,
    force: bool,
    max_age: timedelta | None,
) -> Steps[PruneResult]:
    """Delete what retention no longer keeps (see :func:`pgcast.durable.prune`)."""
    prune_query(older_than, keep_last, channel, force=force, max_age=max_age)  # checks
    version = yield from _installed_version("log", "there is nothing to prune")
    warn_old_schema(version)  # version 1: what is deleted is not recorded
    rows = yield prune_query(
        older_than, keep_last, channel, force=force, max_age=max_age, version=version
    )
    return PruneResult(rows)


def consumers_steps(retention: timedelta) -> Steps[list[ConsumerLag]]:
    """Every named consumer and its lag (see :func:`pgcast.durable.consumers`)."""
    version = yield from _installed_version("consumers", "there are no consumers")
    rows = yield consumers_query(version)
    return [lag_of(row, retention) for row in rows]
