"""For the operator: API keys per team with quotas, the access log, CORS; real servers.

Doubler and FakeChat (tests/models.py) are the models; a real headless Chromium loads a page
from another origin (a plain HTTP server of this test) that calls ``/predict``.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from server import Server

pytestmark = pytest.mark.timeout(180)

FAST, SLOW, ONLY_CHAT, TOKENS, ADMIN = "fast-key", "slow-key", "chat-key", "tok-key", "admin"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    directory = tmp_path_factory.mktemp("keys")
    keys = directory / "keys.toml"
    keys.write_text(f"""
[keys.fast]
sha256 = "{_digest(FAST)}"

[keys.slow]
sha256 = "{_digest(SLOW)}"
requests_per_minute = 600      # 10 per second

[keys.chat]
key_env = "CHAT_TEAM_KEY"
models = ["fakechat"]

[keys.tokens]
sha256 = "{_digest(TOKENS)}"
tokens_per_minute = 60         # 1 per second, a burst of 1 second's worth
""")
    log = directory / "access.log"
    server = Server("--model", "models:Doubler", "--model", "models:FakeChat", "--keys-file",
                    str(keys), "--api-key", ADMIN, "--access-log", str(log),
                    "--access-log-bodies", "1",
                    env={"CHAT_TEAM_KEY": ONLY_CHAT})
    assert server.url, server.output
    yield server, log
    assert server.stop() == 0, server.output


def _predict(server: Server, key: str, model: str = "doubler", **headers: str
             ) -> requests.Response:
    return requests.post(f"{server.url}/v1/models/{model}/predict", json={"x": 2}, timeout=30,
                         headers={"Authorization": f"Bearer {key}", **headers})


def test_a_key_over_its_quota_gets_429_at_its_rate_and_the_others_never(
        keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    counts: dict[str, dict[int, int]] = {FAST: {}, SLOW: {}}
    retry_after: list[str] = []
    stop = time.monotonic() + 4.0
    started = time.monotonic()

    def hammer(key: str) -> None:
        with requests.Session() as session:
            while time.monotonic() < stop:
                answer = session.post(f"{server.url}/v1/models/doubler/predict", json={"x": 2},
                                      headers={"Authorization": f"Bearer {key}"}, timeout=30)
                counts[key][answer.status_code] = counts[key].get(answer.status_code, 0) + 1
                if answer.status_code == 429:
                    retry_after.append(answer.headers.get("Retry-After", ""))
                    assert answer.json()["type"] == "RateLimitedError"

    threads = [threading.Thread(target=hammer, args=(k,)) for k in (FAST, FAST, SLOW, SLOW)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - started
    assert set(counts[FAST]) == {200} and counts[FAST][200] > 100, counts
    assert set(counts[SLOW]) == {200, 429}, counts
    # A bucket of one second's worth (10), refilled at 10 per second.
    rate = (counts[SLOW][200] - 10) / elapsed
    assert 9.0 <= rate <= 11.0, (counts, elapsed)
    assert retry_after and all(r.isdigit() and int(r) >= 1 for r in retry_after)
    metrics = requests.get(f"{server.url}/metrics", timeout=30,
                           headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert f'ipcserve_key_limited_total{{key="slow"}} {float(counts[SLOW][429])}' in metrics
    assert 'ipcserve_key_limited_total{key="fast"} 0.0' in metrics
    history = requests.get(f"{server.url}/v1/history", timeout=30,
                           headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert history["keys"]["slow"]["limited"] == counts[SLOW][429]
    assert history["keys"]["fast"]["requests"] == counts[FAST][200]


def test_models_per_key_unknown_keys_and_the_server_key(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    refused = _predict(server, ONLY_CHAT)
    assert refused.status_code == 403, refused.text
    assert refused.json() == {"error": "the key 'chat' may not use model 'doubler'",
                              "type": "ForbiddenError"}
    chat = requests.post(f"{server.url}/v1/chat/completions", timeout=30,
                         headers={"Authorization": f"Bearer {ONLY_CHAT}"},
                         json={"model": "fakechat", "messages": [{"role": "user",
                                                                  "content": "hi there"}]})
    assert chat.status_code == 200, chat.text
    assert _predict(server, "nobody").status_code == 401
    assert _predict(server, ADMIN).status_code == 200  # --api-key: every model, no quota
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200  # open


def test_a_token_quota_counts_the_answers_tokens(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed

    def chat() -> requests.Response:
        return requests.post(f"{server.url}/v1/chat/completions", timeout=30,
                             headers={"Authorization": f"Bearer {TOKENS}"},
                             json={"model": "fakechat", "messages": [
                                 {"role": "user", "content": "one two three four five"}]})

    first = chat()
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["total_tokens"] == 10  # FakeChat: words are tokens
    over = chat()  # 10 tokens spent from a bucket of 1: nine seconds in debt
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    assert 8 <= int(over.headers["Retry-After"]) <= 10


def test_the_access_log_has_one_line_per_request(keyed: tuple[Server, Path]) -> None:
    server, log = keyed
    before = len(log.read_text().splitlines())
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert _predict(server, FAST, traceparent=f"00-{trace}-00f067aa0ba902b7-01"
                    ).status_code == 200
    assert _predict(server, FAST, model="nope").status_code == 404
    assert _predict(server, "wrong").status_code == 401
    stream = requests.post(f"{server.url}/v1/chat/completions", timeout=30, stream=True,
                           headers={"Authorization": f"Bearer {ONLY_CHAT}"},
                           json={"model": "fakechat", "stream": True,
                                 "messages": [{"role": "user", "content": "a b c"}]})
    assert stream.status_code == 200 and b"[DONE]" in b"".join(stream.iter_content(None))
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{server.url}/wp-login.php", timeout=30).status_code == 404
    audited = requests.post(f"{server.url}/v1/models/doubler/predict", timeout=30,
                            headers={"Authorization": f"Bearer {FAST}"},
                            json={"x": 3, "api_key": "hunter2", "note": "n" * 500})
    assert audited.status_code == 200, audited.text

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.read_text().splitlines()[before:]]
    # The stream's line is written when its answer is done: wait for it (bounded).
    deadline = time.monotonic() + 10
    while len(lines()) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    predict, missing, unauthorized, streamed, health, unknown, audit = sorted(
        lines(), key=lambda line: line["time"])
    assert predict["status"] == 200 and predict["model"] == "doubler"
    assert predict["key"] == "fast" and predict["trace_id"] == trace
    assert predict["route"] == "/v1/models/<name>/predict" and predict["method"] == "POST"
    assert predict["batch_size"] >= 1 and predict["compute_ms"] >= 0 and \
        predict["latency_ms"] >= predict["compute_ms"]
    assert predict["time"].endswith("Z") and "T" in predict["time"]
    assert (missing["status"], unauthorized["status"]) == (404, 401)
    assert "key" not in unauthorized
    assert streamed["status"] == 200 and streamed["model"] == "fakechat"
    assert streamed["key"] == "chat" and streamed["path"] == "/v1/chat/completions"
    assert health["status"] == 200 and health["path"] == "/healthz"
    assert unknown["status"] == 404 and unknown["path"] == "/wp-login.php"  # scanners too
    # --access-log-bodies 1: every body, secrets redacted, long values cut
    assert (predict["request_body"], predict["response_body"]) == ({"x": 2}, 4)
    assert audit["request_body"] == {"x": 3, "api_key": "[redacted]",
                                     "note": "n" * 200 + "[300 more characters]"}
    assert streamed["request_body"]["messages"] == [{"role": "user", "content": "a b c"}]
    assert "response_body" not in streamed  # a stream's answer is not kept
    assert "hunter2" not in log.read_text()
    text = log.read_text()
    for secret in (FAST, SLOW, ONLY_CHAT, ADMIN):
        assert secret not in text  # names, never keys


@pytest.mark.timeout(240)
def test_the_status_page_shows_the_requests_per_key(keyed: tuple[Server, Path],
                                                    tmp_path: Path) -> None:
    import chromium

    chromium.skip_unless_available()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, _ = keyed
    assert _predict(server, FAST).status_code == 200
    usage = requests.get(f"{server.url}/v1/history", timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN}"}).json()["keys"]
    with chromium.browser(tmp_path) as browser:
        browser.get(f"{server.url}/")
        browser.find_element(By.ID, "api-key").send_keys(ADMIN)

        def row(b: Any) -> Any:
            found = b.find_elements(By.CSS_SELECTOR, '#keys tr[data-key="fast"] .requests')
            return found and int(found[0].text) >= usage["fast"]["requests"]
        WebDriverWait(browser, chromium.WAIT).until(row)
        assert browser.find_element(By.ID, "keys-section").is_displayed()
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#keys .name")]
        assert sorted(names) == ["chat", "fast", "slow", "tokens"]
        browser.execute_script("sessionStorage.clear()")


def test_a_bad_keys_file_stops_the_server(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.team]\nsha256 = "abc"\n')
    server = Server("--model", "models:Doubler", "--keys-file", str(keys), wait_ready=False)
    assert server.stop() == 2, server.output
    assert "sha256 must be 64 hex digits" in server.output


# -- CORS ---------------------------------------------------------------------------------
PAGE = """<!doctype html><title>front end</title><pre id="out">waiting</pre><script>
fetch("%s/v1/models/doubler/predict", {method: "POST",
  headers: {"Content-Type": "application/json", "Authorization": "Bearer %s"},
  body: JSON.stringify({x: 21})})
  .then(r => r.json()).then(b => { out.textContent = "answer " + JSON.stringify(b); })
  .catch(e => { out.textContent = "failed " + e.name; });
</script>"""


@pytest.fixture()
def front_end() -> Iterator[tuple[str, dict[str, str]]]:
    """A page on another origin (another port): ``(origin, pages)``; ``pages[path]`` is
    served as HTML."""
    pages: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", pages
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.timeout(240)
def test_a_page_on_another_origin_calls_the_api_with_cors_and_not_without(
        front_end: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    import chromium

    chromium.skip_unless_available()
    from selenium.webdriver.support.ui import WebDriverWait

    origin, pages = front_end
    with_cors = Server("--model", "models:Doubler", "--api-key", ADMIN, "--cors-origins", origin)
    without = Server("--model", "models:Doubler", "--api-key", ADMIN)
    try:
        pages["/on"], pages["/off"] = PAGE % (with_cors.url, ADMIN), PAGE % (without.url, ADMIN)
        # The preflight is answered without the key and never reaches the model.
        preflight = requests.options(f"{with_cors.url}/v1/models/doubler/predict", timeout=30,
                                     headers={"Origin": origin,
                                              "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers":
                                                  "authorization,content-type"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["Access-Control-Allow-Origin"] == origin
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
        other = requests.options(f"{with_cors.url}/predict", timeout=30,
                                 headers={"Origin": "http://evil.example",
                                          "Access-Control-Request-Method": "POST"})
        assert "Access-Control-Allow-Origin" not in other.headers
        with chromium.browser(tmp_path) as browser:
            results = {}
            for path in ("/on", "/off"):
                browser.get(origin + path)
                WebDriverWait(browser, chromium.WAIT).until(
                    lambda b: b.find_element("id", "out").text != "waiting")
                results[path] = browser.find_element("id", "out").text
        assert results["/on"] == "answer 42", results  # Doubler: 2 * 21
        assert results["/off"] == "failed TypeError", results  # the browser refused it
    finally:
        assert with_cors.stop() == 0, with_cors.output
        assert without.stop() == 0, without.output
