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


def prune_steps(
    older_than: timedelta | None,
    keep_last: int | None,
    channel: str | None,
    force: bool,
    max_age: timedelta | None,
) -> Steps[PruneResult]:
    """Delete what retention no longer keeps (see :func:`pgcast.durable.prune`)."""
    prune_query(older_than, keep_last, channel, force=force, max_age=max_age)  # checks
    exists = yield ("SELECT to_regclass('pgcast.log') IS NOT NULL", None)
    if not exists[0][0]:
        raise SchemaError(
            "the pgcast schema is not installed in this database: there is nothing to "
            "prune (`pgcast init` installs it)"
        )
    found = yield ("SELECT coalesce(max(version), 0) FROM pgcast.schema_version", None)
    version = int(found[0][0])
    warn_old_schema(version)  # version 1: what is deleted is not recorded
    rows = yield prune_query(
        older_than, keep_last, channel, force=force, max_age=max_age, version=version
    )
    return PruneResult(rows)


def consumers_steps(retention: timedelta) -> Steps[list[ConsumerLag]]:
    """Every named consumer and its lag (see :func:`pgcast.durable.consumers`)."""
    exists = yield ("SELECT to_regclass('pgcast.consumers') IS NOT NULL", None)
    if not exists[0][0]:
        raise SchemaError(
            "the pgcast schema is not installed in this database: there are no "
            "consumers (`pgcast init` installs it)"
        )
    found = yield ("SELECT coalesce(max(version), 0) FROM pgcast.schema_version", None)
    rows = yield consumers_query(int(found[0][0]))
    return [lag_of(row, retention) for row in rows]
