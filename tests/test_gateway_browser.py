"""End to end in a real browser: the demo page in headless Chromium.

Debian's ``chromium`` driven by Playwright (see ``_browser.py``). Skipped,
saying why, only where no Chromium can be installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _browser import CHROMIUM_ARGS, find_chromium
from _serving import serving
from pgcast.gateway import create_app
from pgcast.gateway._serve import GatewayServer, config


@pytest.fixture(scope="module")
def chromium() -> Path:
    return find_chromium()


@pytest.fixture
def demo_url(dsn: str, psql: Callable[..., str]) -> Iterator[str]:
    app = create_app(dsn, allow=["data"], allow_publish=["data"], demo_page=True,
                     demo_command="psql -c \"NOTIFY data, 'green'\"")
    with serving(lambda port: GatewayServer(config(app, "127.0.0.1", port, log_level="warning",
                                                   timeout_graceful_shutdown=3)), 10) as port:
        yield f"http://127.0.0.1:{port}/"


@pytest.mark.slow
def test_demo_page_bar_moves_on_notify_in_headless_chromium(
    chromium: Path, demo_url: str, psql: Callable[..., str]
) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS,
                                     timeout=60_000)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(demo_url, timeout=30_000)
            assert page.text_content("#command") == "psql -c \"NOTIFY data, 'green'\""
            # "listening" appears once the gateway confirmed the subscription.
            page.wait_for_selector('#status[data-state="open"]', timeout=20_000)
            green = page.locator("#bar-green")
            assert green.get_attribute("data-count") == "0"

            psql("NOTIFY data, 'green'")
            page.wait_for_function(
                "document.getElementById('bar-green').dataset.count === '1'", timeout=15_000
            )
            assert green.get_attribute("data-value") == "10"
            assert green.evaluate("el => el.style.width") == "10%"
            assert page.locator("#bar-red").get_attribute("data-count") == "0"

            psql("NOTIFY data, 'green 70'")
            page.wait_for_function(
                "document.getElementById('bar-green').dataset.value === '70'", timeout=15_000
            )

            # A button publishes through the gateway; the page hears its own NOTIFY.
            page.click('button[data-colour="red"]')
            page.wait_for_function(
                "document.getElementById('bar-red').dataset.count === '1'", timeout=15_000
            )
            assert "data:" in (page.text_content("#log") or "")
            if os.environ.get("PGCAST_SCREENSHOT"):
                page.screenshot(path=os.environ["PGCAST_SCREENSHOT"])
            assert errors == []
        finally:
            browser.close()
