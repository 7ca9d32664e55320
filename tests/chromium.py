"""A real headless Chromium for page tests: Debian's ``chromium`` and ``chromium-driver``,
driven by selenium with the driver path given explicitly (selenium-manager never runs: it
would try to download a driver on an offline machine).

``skip_unless_available()`` at module level, then ``with chromium.browser(tmp) as driver``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-quic")
WAIT = 30.0  # seconds; every wait is bounded by this, well under the tests' timeouts


def skip_unless_available() -> None:
    """Skip the calling test module where Chromium, its driver or selenium is missing."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, "
                    "chromium-driver)", allow_module_level=True)
    pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")


def _no_selenium_manager(self: object, args: list[str]) -> dict[str, str]:
    raise AssertionError(f"selenium-manager was asked to find a driver: {args}")


@contextlib.contextmanager
def browser(directory: Path, size: tuple[int, int] = (1200, 1000)) -> Iterator[Any]:
    """A headless Chromium with its profile and driver log in ``directory``."""
    from selenium import webdriver
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={size[0]},{size[1]}")
    options.add_argument(f"--user-data-dir={directory / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with open(directory / "chromedriver.log", "w") as log:
        service = webdriver.ChromeService(CHROMEDRIVER, log_output=log)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(SeleniumManager, "binary_paths", _no_selenium_manager)
            driver = webdriver.Chrome(options=options, service=service)
        try:
            yield driver
        finally:
            driver.quit()


def js(driver: Any, script: str, *args: Any) -> Any:
    """Run ``script`` (a function body; ``arguments`` are ``args``) in the page."""
    return driver.execute_script(script, *args)


def text(driver: Any, css: str) -> str | None:
    """An element's text read in one script call (the page re-renders every 2 s)."""
    return js(driver, "const e = document.querySelector(arguments[0]); "
                      "return e ? e.textContent : null;", css)


def wait_for(driver: Any, condition: Any, what: str, timeout: float = WAIT) -> Any:
    """Poll ``condition(driver)`` until it is truthy (bounded); its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: condition(d), message=f"timed out after {timeout}s waiting for {what}")


def severe_console_errors(driver: Any) -> list[Any]:
    """The page's console errors so far (a 4xx/5xx the page asked for on purpose shows too)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
