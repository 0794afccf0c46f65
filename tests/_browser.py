"""Headless Chromium for the browser tests: Debian's ``chromium``.

Installed by ``make browser``, or here if missing and apt is usable, and
driven by Playwright's Python API with ``executable_path``; Playwright's own
browser downloads are never used. :func:`find_chromium` skips the test,
saying why, only where no Chromium can be installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
INSTALL_TIMEOUT = 900


def _install_chromium() -> str | None:
    """Install Debian's chromium; None when done, else why it could not be."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this system to install Debian's chromium"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install chromium (run `make browser` as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=env,
                                  timeout=INSTALL_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return f"{' '.join(argv)} did not finish in {INSTALL_TIMEOUT} s"
        if done.returncode != 0:
            return f"{' '.join(argv)} failed: {done.stderr.strip()[-300:]}"
    return None if CHROMIUM.exists() else "apt-get installed chromium but not at /usr/bin"


def find_chromium() -> Path:
    """The Chromium executable, installing it if needed; skips the test,
    saying why, where that is impossible or Playwright is missing."""
    if not CHROMIUM.exists():
        why = _install_chromium()
        if why is not None:
            pytest.skip(f"no Chromium for the browser test: {why}")
    pytest.importorskip("playwright.sync_api", reason="Playwright is in the dev extra")
    return CHROMIUM
