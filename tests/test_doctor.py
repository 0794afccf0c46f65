"""``pgcast doctor``: the checks and settings it prints, its exit code, --json."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from pgcast.cli import main
from pgcast.cli.doctor import format_report
from pgcast.diagnostics import SETTINGS, Check, Report, run_checks
from pgcast.embedded import EmbeddedServer


def test_doctor_on_a_healthy_server(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--dsn", dsn]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "checks"
    for name in ("connect", "primary", "listen", "round trip", "queue usage"):
        assert any(line.startswith(f"  ok    {name}") for line in lines), (name, out)
    assert "pg_listening_channels() confirms LISTEN took effect" in out
    assert "settings" in lines
    assert "server_version" in out
    assert "max_notify_queue_pages" in out
    assert lines[-1] == "result: ok"


def test_doctor_reports_the_server_settings(dsn: str) -> None:
    report = run_checks(dsn)
    assert list(report.settings) == list(SETTINGS)
    with psycopg.connect(dsn) as conn:
        version = conn.info.server_version
    if version >= 170000:
        assert report.settings["max_notify_queue_pages"] is not None
    else:
        assert report.settings["max_notify_queue_pages"] is None  # PostgreSQL 15/16
    assert report.settings["server_version"]
    assert report.ok


def test_doctor_json(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--dsn", dsn, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True
    # "consumers" (tests/test_consumers.py) depends on what other tests left
    # in the shared database's pgcast schema, if it is there.
    checks = [c for c in data["checks"] if c["name"] != "consumers"]
    assert [c["name"] for c in checks] == [
        "connect", "primary", "listen", "round trip", "queue usage",
    ]
    assert {c["verdict"] for c in checks} == {"ok"}
    assert set(data["settings"]) == set(SETTINGS)


def test_doctor_when_the_server_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["doctor", "--dsn", "postgresql://postgres@127.0.0.1:1/postgres", "--timeout", "2"])
    assert code == 1
    out = capsys.readouterr().out
    assert "FAIL  connect  cannot connect:" in out
    assert "\n\t" not in out  # the libpq message on one line
    assert out.rstrip().endswith("result: problems found")


def test_doctor_refuses_a_bad_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--dsn", "postgresql://x@127.0.0.1:1/x", "--timeout", "0"]) == 1
    assert "--timeout must be > 0 seconds" in capsys.readouterr().err


def test_doctor_warns_about_an_idle_session_timeout_shorter_than_the_health_check(
    pg_server: EmbeddedServer | None,
) -> None:
    if pg_server is None:
        pytest.skip("PGCAST_TEST_DSN is set: this test creates a database of its own")
    name = f"pgcast_doctor_{uuid.uuid4().hex[:8]}"
    db_dsn = pg_server.create_database(name)
    try:
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} SET idle_session_timeout = '10s'")
        report = run_checks(db_dsn)
        warned = [c for c in report.checks if c.verdict == "warn"]
        assert [c.name for c in warned] == ["idle_session_timeout"]
        assert "10 s ends idle sessions sooner than the 30 s health check" in warned[0].detail
        assert report.ok  # a warning is not a failure
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_format_report_marks_each_verdict() -> None:
    report = Report(
        checks=[
            Check("connect", "ok", "fine"),
            Check("queue usage", "warn", "87.0% in use"),
            Check("listen", "fail", "LISTEN did not take effect"),
        ],
        settings={"max_notify_queue_pages": None, "server_version": "15.4"},
    )
    text = format_report(report)
    assert "  ok    connect      fine" in text
    assert "  WARN  queue usage  87.0% in use" in text
    assert "  FAIL  listen       LISTEN did not take effect" in text
    assert "max_notify_queue_pages  (not on this server)" in text
    assert text.endswith("result: problems found")
    assert not report.ok
