"""The public surface: what ``import pgcast`` promises (httpx's test_exported_members)."""

from __future__ import annotations

import inspect

import pgcast
import pgcast._errors
import pgcast.aio


def test_every_exported_name_exists_and_is_documented() -> None:
    for name in pgcast.__all__:
        obj = getattr(pgcast, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"pgcast.{name} has no docstring"


def test_every_public_error_is_exported_and_in_the_tree() -> None:
    for name in pgcast._errors.__all__:
        error = getattr(pgcast._errors, name)
        assert getattr(pgcast, name) is error, f"pgcast.{name} is not exported"
        assert issubclass(error, pgcast.PgcastError)
        assert name in (pgcast._errors.__doc__ or ""), f"{name} is missing from the drawn tree"


def test_public_names_are_not_private_modules() -> None:
    assert all(not name.startswith("_") or name == "__version__" for name in pgcast.__all__)
    assert "connect" in pgcast.aio.__all__ and "NotificationManager" in pgcast.aio.__all__
