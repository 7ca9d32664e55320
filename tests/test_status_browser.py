"""The status page's charts, event log, reload button and try-it for every kind of model, in
a real headless Chromium against the real ``python app.py`` serving four models: digits
(image), Doubler (JSON), FakeChat (streamed text generation), FakeEmbedder (embeddings).

Set ``IPCSERVE_SCREENSHOT_TO=docs/img/status-page.png`` to also write the screenshot taken
under load there (how the README's picture is made).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromium
import pytest
import requests
from chromium import js, text, wait_for
from digits_data import well_classified_png
from server import Server

chromium.skip_unless_available()
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(240)]

KEY = "page-key"
MODELS = ("--model", "digits", "--model", "models:Doubler", "--model", "models:FakeChat",
          "--model", "models:FakeEmbedder")
ENV = {"IPCSERVE_RESTART_BACKOFF": "0.05", "IPCSERVE_HEARTBEAT_INTERVAL": "0.1",
       "IPCSERVE_TEST_TOKEN_DELAY": "0.08"}  # FakeChat: 80 ms per word, visibly streamed


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    server = Server(*MODELS, env=ENV)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium.browser(tmp_path_factory.mktemp("chromium")) as driver:
        yield driver


def open_page(driver: Any, server: Server) -> None:
    driver.get(f"{server.url}/")
    wait_for(driver, lambda d: text(d, '#models tr[data-model="doubler"] .state') == "ready",
             "the models to show as ready")
    wait_for(driver, lambda d: js(d, "return document.querySelectorAll('.model-charts').length") == 4,
             "a chart group per model")


def chart(model: str, name: str) -> str:
    return f'.model-charts[data-model="{model}"] figure[data-chart="{name}"]'


def drawn(driver: Any, css: str) -> list[dict[str, Any]]:
    """The drawn SVG elements matching ``css``: their data attributes and tooltip."""
    found: list[dict[str, Any]] = js(driver, """
        return [...document.querySelectorAll(arguments[0])].map(e => ({
          series: e.dataset.series, kind: e.dataset.kind, t: Number(e.dataset.t),
          value: Number(e.dataset.value), title: e.querySelector('title')?.textContent}));""", css)
    return found


class Load:
    """Requests sent in a loop from a thread until stopped (traffic while a picture is taken)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-load")
        self._thread.start()

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                x: Any = "input-error" if self.sent % 10 == 9 else self.sent
                session.post(f"{self.url}/v1/models/doubler/predict", json={"x": x}, timeout=10)
                self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def test_charts_draw_real_traffic_and_a_kill_9_shows_in_the_log_and_on_the_chart(
        server: Server, driver: Any, tmp_path: Path) -> None:
    open_page(driver, server)
    # What other tests of this module sent before (any order): the bars count from there.
    before = {k: sum(v) for k, v in _get(server, "/v1/history")["models"]["doubler"]["requests"].items()}
    url = f"{server.url}/v1/models/doubler/predict"
    for i in range(20):
        assert requests.post(url, json={"x": i}, timeout=10).status_code == 200
    for _ in range(4):
        assert requests.post(url, json={"x": "input-error"}, timeout=10).status_code == 400

    bucket = 5  # seconds; requests per bucket = drawn rate x bucket

    def counted(series: str) -> float:
        bars = drawn(driver, chart("doubler", "requests") + f' rect.bar[data-series="{series}"]')
        return round(sum(b["value"] for b in bars) * bucket, 3)

    wait_for(driver, lambda d: counted("200") == before["200"] + 20
             and counted("4xx") == before["4xx"] + 4, "bars for the 20 answered and 4 refused requests")
    bars = drawn(driver, chart("doubler", "requests") + " rect.bar")
    assert {b["series"] for b in bars} == {"200", "4xx"} | {k for k, n in before.items() if n}, bars
    labels = {"200": "200 OK", "4xx": "4xx", "503": "503", "504": "504", "cancelled": "cancelled",
              "5xx": "other 5xx"}
    assert all(f" · {labels[b['series']]}: " in b["title"] and b["title"].endswith("/s")
               for b in bars), bars
    points = drawn(driver, chart("doubler", "latency") + " circle.point")
    assert {p["series"] for p in points} == {"p50", "p95", "p99"}, points
    assert all(p["value"] > 0 and " ms" in p["title"] for p in points), points
    assert drawn(driver, chart("doubler", "batch") + " rect.bar"), "no batch size drawn"
    assert text(driver, "#web-pid") == str(server.proc.pid), "which web process the charts show"
    # The charts of a model without traffic (yet, whatever order the tests ran in) say so.
    quiet = [name for name, series in _get(server, "/v1/history")["models"].items()
             if not any(series["rate"])]
    for name in quiet:
        assert "no requests" in (text(driver, chart(name, "requests")) or ""), name
    ticks = js(driver, "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)",
               chart("doubler", "requests") + " .axis text")
    assert "now" in ticks and "−15 min" in ticks, ticks

    pid = _get(server, "/v1/models/doubler")["status"]["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    crash_row = '#events tr[data-kind="crashed"]'
    message = wait_for(driver, lambda d: text(d, crash_row + " .message"), "the crash in the event log")
    assert f"pid={pid}" in message and "killed by signal 9" in message, message
    assert text(driver, crash_row + " .model") == "doubler"
    wait_for(driver, lambda d: text(d, '#events tr[data-kind="restarted"] .message'),
             "the restart in the event log")
    kinds = js(driver, "return [...document.querySelectorAll('#events tr')].map(r => r.dataset.kind)")
    assert kinds.index("restarted") < kinds.index("crashed"), f"newest first: {kinds}"
    marker = ' line.marker[data-kind="{}"]'.format
    markers = wait_for(driver, lambda d: drawn(d, chart("doubler", "requests") + marker("crashed")),
                       "the crash marked on the chart")
    assert "killed by signal 9" in markers[0]["title"], markers
    wait_for(driver, lambda d: drawn(d, chart("doubler", "latency") + marker("restarted")),
             "the restart marked on the chart")
    assert not drawn(driver, chart("digits", "requests") + " line.marker"), "another model's crash"

    # A screenshot of the page under load (kept in pytest's tmp_path for a human to look at).
    wait_for(driver, lambda d: text(d, '#models tr[data-model="doubler"] .state') == "ready",
             "the restarted model to be ready")
    load = Load(server.url)
    try:
        wait_for(driver, lambda d: load.sent > 50 and counted("200") > 80, "the load to show")
        # The window chooser redraws at once: the last minute, labelled every 15 s.
        Select(driver.find_element(By.ID, "window")).select_by_value("60")
        assert text(driver, "#window-label") == "minute"
        ticks = js(driver, "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)",
                   chart("doubler", "requests") + " .axis text")
        assert {"now", "−15 s", "−30 s", "−45 s", "−1 min"} <= set(ticks), ticks
        assert drawn(driver, chart("doubler", "requests") + ' rect.bar[data-series="200"]')
        driver.set_window_size(1100, 1700)  # the models, the charts of digits and doubler
        js(driver, "scrollTo(0, 0)")
        picture = tmp_path / "status-page-under-load.png"
        assert driver.save_screenshot(str(picture))
    finally:
        load.stop()
        driver.set_window_size(1200, 1000)
    assert picture.stat().st_size > 10_000
    target = os.environ.get("IPCSERVE_SCREENSHOT_TO")
    if target:
        shutil.copyfile(picture, target)


def select_model(driver: Any, name: str) -> None:
    Select(driver.find_element(By.ID, "model")).select_by_value(name)


def test_try_it_answers_for_every_kind_of_model(server: Server, driver: Any, tmp_path: Path) -> None:
    open_page(driver, server)
    # Image: a file, as the API classifies it.
    path, label = well_classified_png(server.url, tmp_path)
    select_model(driver, "digits")
    driver.find_element(By.ID, "file").send_keys(str(path))
    assert wait_for(driver, lambda d: text(d, "#result-label"), "the predicted label") == str(label)
    assert "-F 'image=@" in (text(driver, "#curl") or "")

    # JSON: the body is pre-filled from the model's schema, then sent.
    select_model(driver, "doubler")
    body = wait_for(driver, lambda d: d.find_element(By.ID, "json-body").get_attribute("value") != "{}"
                    and d.find_element(By.ID, "json-body").get_attribute("value"), "the pre-filled body")
    assert '"x"' in body, body
    assert not text(driver, "#result-json"), "the image model's answer is still shown"
    driver.find_element(By.ID, "predict").click()
    wait_for(driver, lambda d: (text(d, "#result-json") or "").strip() == "2", "the JSON answer")
    assert (text(driver, "#result-time") or "").startswith("HTTP 200 in ")
    curl = text(driver, "#curl") or ""
    assert curl.startswith("curl -sS -X POST '" + server.url + "/v1/models/doubler/predict'"), curl
    assert "-d '{" in curl and "Content-Type: application/json" in curl, curl
    # The error as the API returns it.
    area = driver.find_element(By.ID, "json-body")
    area.clear()
    area.send_keys('{"x": "raise"}')
    driver.find_element(By.ID, "predict").click()
    error = wait_for(driver, lambda d: d.find_element(By.ID, "error").is_displayed() and text(d, "#error"),
                     "the error")
    assert error.startswith("HTTP 500 ModelError: ") and "does not like 'raise'" in error, error

    # Text generation: the answer streams in; every text the element showed is recorded.
    select_model(driver, "fakechat")
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    words = "one two three four five six seven eight nine ten"
    prompt.send_keys(words)
    js(driver, """window.seen = [];
        new MutationObserver(() => window.seen.push(document.getElementById('result-stream').textContent))
          .observe(document.getElementById('result-stream'),
                   {childList: true, characterData: true, subtree: true});""")
    driver.find_element(By.ID, "predict").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "result-stream").get_attribute("data-state") == "done",
             "the end of the stream")
    assert text(driver, "#result-stream") == words
    seen = [s for s in js(driver, "return window.seen") if s]
    assert len(set(seen)) >= 5, f"not visibly incremental: {seen}"
    assert all(words.startswith(s) for s in seen), seen
    assert '"finish_reason": "stop"' in (text(driver, "#result-json") or "")
    assert " -N " in (text(driver, "#curl") or "") and "x-ndjson" in (text(driver, "#curl") or "")

    # Embeddings, through OpenAI's API.
    select_model(driver, "fakeembedder")
    driver.find_element(By.ID, "predict").click()
    assert wait_for(driver, lambda d: text(d, "#result-stream"), "the embeddings") == \
        "2 vectors of 26 dimensions"
    assert '"object": "list"' in (text(driver, "#result-json") or "")
    assert "/v1/embeddings" in (text(driver, "#curl") or "")
    # The revision and load time of each model are shown.
    assert text(driver, '#models tr[data-model="fakechat"] .revision') == "1"
    assert (text(driver, '#models tr[data-model="fakechat"] .loaded') or "").endswith(" s")


def test_narrow_window_and_dark_mode(server: Server, driver: Any, tmp_path: Path) -> None:
    driver.set_window_size(420, 900)
    try:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        open_page(driver, server)
        background = js(driver, "return getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(22, 26, 31)", background
        # No sideways scrolling of the page; each chart fits the window.
        assert js(driver, "return document.documentElement.scrollWidth <= window.innerWidth + 1")
        widths = js(driver, "return [...document.querySelectorAll('figure.chart svg')]"
                            ".map(s => s.getBoundingClientRect().right)")
        assert widths and max(widths) <= js(driver, "return window.innerWidth"), widths
        assert driver.save_screenshot(str(tmp_path / "narrow-dark.png"))
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        driver.set_window_size(1200, 1000)


def test_the_page_with_an_api_key_and_the_reload_button(driver: Any) -> None:
    server = Server("--model", "models:Doubler", "--api-key", KEY, env=ENV)
    try:
        driver.get(f"{server.url}/")
        wait_for(driver, lambda d: "401" in (text(d, "#status-note") or ""), "the API key hint")
        assert not js(driver, "return document.querySelectorAll('figure.chart').length")
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        wait_for(driver, lambda d: text(d, '#models tr[data-model="doubler"] .state') == "ready",
                 "the status once the key is entered")
        for i in range(3):
            requests.post(f"{server.url}/predict", json={"x": i}, timeout=10,
                          headers={"Authorization": f"Bearer {KEY}"})
        wait_for(driver, lambda d: len(drawn(d, chart("doubler", "requests") + " rect.bar")) >= 1,
                 "charts drawn with the key")
        wait_for(driver, lambda d: '"x"' in d.find_element(By.ID, "json-body").get_attribute("value"),
                 "the body pre-filled from the schema (/openapi.json, with the key)")
        driver.find_element(By.ID, "predict").click()
        wait_for(driver, lambda d: (text(d, "#result-time") or "").startswith("HTTP 200"), "an answer")
        assert "Authorization: Bearer $IPCSERVE_API_KEY" in (text(driver, "#curl") or "")
        assert KEY not in (text(driver, "#curl") or ""), "the key itself is never shown"
        # Reload: the button POSTs to the reload URL /v1/models lists, with the key.
        assert text(driver, '#models tr[data-model="doubler"] .revision') == "1"
        js(driver, "document.querySelector('#models tr[data-model=\"doubler\"] button.reload').click()")
        wait_for(driver, lambda d: "revision 2 serving" in (text(d, "#reload-note") or ""), "the reload")
        wait_for(driver, lambda d: text(d, '#events tr[data-kind="reloaded"] .message'), "the reload event")
        wait_for(driver, lambda d: text(d, '#models tr[data-model="doubler"] .revision') == "2",
                 "the new revision in the table")
        reload_marker = ' line.marker[data-kind="reloaded"]'
        wait_for(driver, lambda d: drawn(d, chart("doubler", "requests") + reload_marker),
                 "the reload marked on the chart")
        driver.get(f"{server.url}/")  # the key is kept for this tab
        assert driver.find_element(By.ID, "api-key").get_attribute("value") == KEY
        js(driver, "sessionStorage.clear()")
    finally:
        assert server.stop() == 0, server.output


def _get(server: Server, path: str) -> Any:
    r = requests.get(f"{server.url}{path}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()
