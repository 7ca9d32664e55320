"""The status page (``GET /``) in a real headless Chromium, against the real ``python app.py``.

Chromium and chromedriver come from Debian (``chromium``, ``chromium-driver``), started by
tests/chromium.py (selenium-manager never runs: it would try to download a driver).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromium
import pytest
from digits_data import well_classified_png
from server import Server

chromium.skip_unless_available()
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

WAIT = chromium.WAIT  # seconds; every wait below is bounded by this, well under the test timeout


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium.browser(tmp_path_factory.mktemp("chromium"), size=(1000, 1000)) as browser:
        yield browser


def text(browser: Any, css: str) -> str | None:
    """An element's text, read in one script call (the table is re-rendered every 2 s)."""
    return browser.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)


def wait_for(browser: Any, condition: Any, what: str) -> Any:
    return WebDriverWait(browser, WAIT, poll_frequency=0.05).until(
        lambda b: condition(b), message=f"timed out after {WAIT}s waiting for {what}")


def open_page(browser: Any, server: Server) -> None:
    browser.get(f"{server.url}/")
    wait_for(browser, lambda b: text(b, '#models tr[data-model="digits"] .state') == "ready",
             "the digits model to show as ready")


def predicted_label(browser: Any) -> str:
    return wait_for(browser, lambda b: text(b, "#result-label"), "a predicted label")


def test_page_shows_ready_model_with_pid(server: Server, driver: Any) -> None:
    open_page(driver, server)
    pid = text(driver, '#models tr[data-model="digits"] .pid')
    assert pid and pid.isdigit() and int(pid) > 0, pid
    assert text(driver, '#models tr[data-model="digits"] .cancelled') == "0"
    assert wait_for(driver, lambda b: text(b, "#ready"), "the readiness badge") == "ready"
    for element_id in ("file", "canvas", "predict", "clear", "api-key"):
        assert driver.find_element(By.ID, element_id).is_displayed(), element_id
    # Offline intranet: every resource the page loaded came from the server itself.
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(url.startswith(server.url + "/") for url in resources), resources
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_uploaded_png_is_classified(server: Server, driver: Any, tmp_path: Path) -> None:
    path, label = well_classified_png(server.url, tmp_path)
    open_page(driver, server)
    driver.find_element(By.ID, "file").send_keys(str(path))
    assert predicted_label(driver) == str(label)
    assert '"probabilities"' in (text(driver, "#result-json") or "")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#result-bars li")) == 10
    assert not driver.find_element(By.ID, "error").is_displayed()
    # The p50/p95 cells fill in on the next refresh, now that a request succeeded.
    wait_for(driver, lambda b: (text(b, '#models tr[data-model="digits"] .p50') or "").endswith("ms"),
             "the recent latency to show")
    # Kept in pytest's tmp_path (see "pytest --basetemp") for a human to look at.
    screenshot = tmp_path / "page.png"
    assert driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 0


def test_drawn_one_is_classified(server: Server, driver: Any) -> None:
    open_page(driver, server)
    canvas = driver.find_element(By.ID, "canvas")
    height = canvas.size["height"]
    # A vertical stroke through the middle, top to bottom, in small steps like a real hand.
    actions = ActionChains(driver, duration=20).move_to_element_with_offset(canvas, 0, -int(height * 0.35))
    actions.click_and_hold()
    for _ in range(14):
        actions.move_by_offset(0, int(height * 0.05))
    actions.release().perform()
    driver.find_element(By.ID, "predict").click()
    label = predicted_label(driver)
    assert label in [str(d) for d in range(10)], label
    assert label == "1"
    driver.find_element(By.ID, "clear").click()
    blank = driver.execute_script(
        "const c = document.getElementById('canvas');"
        "return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.every(v => v === 255);")
    assert blank, "Clear left ink on the canvas"


def test_non_image_upload_shows_415(server: Server, driver: Any, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not a picture\n")
    open_page(driver, server)
    driver.find_element(By.ID, "file").send_keys(str(path))
    message = wait_for(driver, lambda b: b.find_element(By.ID, "error").is_displayed()
                       and text(b, "#error"), "the error message")
    assert "415" in message and "UnsupportedMediaTypeError" in message, message
    assert "not an image" in message, message
    assert text(driver, "#result-label") == ""


def test_api_key_is_asked_for_sent_and_remembered(driver: Any, tmp_path: Path) -> None:
    server = Server("--api-key", "s3cret")
    try:
        path, label = well_classified_png(server.url, tmp_path, api_key="s3cret")
        driver.get(f"{server.url}/")
        wait_for(driver, lambda b: "401" in (text(b, "#status-note") or ""), "the API key hint")
        driver.find_element(By.ID, "api-key").send_keys("s3cret")
        wait_for(driver, lambda b: text(b, '#models tr[data-model="digits"] .state') == "ready",
                 "the status once the key is entered")
        driver.find_element(By.ID, "file").send_keys(str(path))
        assert predicted_label(driver) == str(label)
        driver.get(f"{server.url}/")  # the key is kept in the tab's sessionStorage
        assert driver.find_element(By.ID, "api-key").get_attribute("value") == "s3cret"
        driver.execute_script("sessionStorage.clear()")
    finally:
        assert server.stop() == 0, server.output
