"""Headless Debian Chromium through chromium-driver and selenium: the studio's browser test and screenshot.

Both paths are given explicitly and Selenium Manager is kept offline: nothing is downloaded. Returns
None with the reason when no browser can be driven here (the caller skips and says why).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


def browser_missing() -> str | None:
    """Why no browser can be driven here, or None when one can."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium on PATH (`make install` installs Debian's chromium with apt where it runs as root)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (Debian package chromium-driver; `make install` installs it where it can)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (`make install` installs the [dev] extra)"
    return None


def chrome(profile: Path, log: Path, width: int = 1400, height: int = 1000):
    """A headless Chromium WebDriver with a fresh profile in `profile` (caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try the network
    options = Options()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    service = Service(executable_path=shutil.which("chromedriver"), log_output=str(log))
    return webdriver.Chrome(service=service, options=options)
