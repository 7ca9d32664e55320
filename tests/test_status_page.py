"""The status page's data, ``GET /v1/history`` and ``GET /v1/events``, from the real
``python app.py`` (waitress) under real traffic, a real ``kill -9``, a hang and a reload."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import free_port, wait_until
from server import Server

from ipcserve.engine import events
from ipcserve.engine.events import MAX_EVENTS, EventLog
from ipcserve.flask import IPCServe
from ipcserve.http.history import OUTCOMES, History

pytestmark = pytest.mark.timeout(120)

KEY = "st4tus-key"


@pytest.fixture(scope="module")
def doubler() -> Iterator[Server]:
    server = Server("--model", "models:Doubler", "--timeout", "1", "--hang-timeout", "2",
                    env={"IPCSERVE_RESTART_BACKOFF": "0.05", "IPCSERVE_HEARTBEAT_INTERVAL": "0.1"})
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output


def _get(server: Server, path: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = requests.get(f"{server.url}{path}", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    return r.json()


def _totals(server: Server, model: str = "doubler") -> dict[str, int]:
    series = _get(server, "/v1/history")["models"][model]
    return {outcome: sum(counts) for outcome, counts in series["requests"].items()}


def _events(server: Server, **query: Any) -> list[dict[str, Any]]:
    suffix = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
    body = _get(server, f"/v1/events{suffix}")
    assert body["object"] == "list"
    events: list[dict[str, Any]] = body["data"]
    return events


def _pid(server: Server) -> int:
    workers = _get(server, "/v1/models/doubler")["status"]["workers"]
    pid: int = workers[0]["pid"]
    return pid


def _ready(server: Server) -> bool:
    return requests.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_history_counts_each_outcome_of_real_requests(doubler: Server) -> None:
    before = _totals(doubler)
    url = f"{doubler.url}/predict"
    for i in range(7):
        assert requests.post(url, json={"x": i}, timeout=10).status_code == 200
    for _ in range(3):
        assert requests.post(url, json={"x": "input-error"}, timeout=10).status_code == 400
    assert requests.post(url, json={"x": "raise"}, timeout=10).status_code == 500
    after = _totals(doubler)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta == {"200": 7, "4xx": 3, "503": 0, "504": 0, "cancelled": 0, "5xx": 1}, delta

    history = _get(doubler, "/v1/history")
    assert history["bucket_seconds"] == 5 and history["span_seconds"] == 900
    assert history["pid"] == doubler.proc.pid  # which web process answered
    series = history["models"]["doubler"]
    t = series["t"]
    assert len(t) == 180 and all(b - a == 5 for a, b in zip(t, t[1:]))
    assert t[-1] <= history["now"] < t[-1] + 5
    for key in ("rate", "p50_ms", "p95_ms", "p99_ms", "batch_mean", "batch_max", "queue_depth"):
        assert len(series[key]) == 180, key
    assert set(series["requests"]) == set(OUTCOMES)
    busy = [i for i, p50 in enumerate(series["p50_ms"]) if p50 is not None]
    assert busy, series
    for i in busy:
        assert 0 < series["p50_ms"][i] <= series["p95_ms"][i] <= series["p99_ms"][i]
    # Every request that reached the model was in a batch of at least one.
    assert any(b is not None and b >= 1 for b in series["batch_mean"])
    assert all(isinstance(d, int) and d >= 0 for d in series["queue_depth"])
    assert sum(series["rate"]) * 5 == pytest.approx(sum(after.values()))


def test_kill_9_is_logged_as_a_crash_with_its_cause_then_a_restart(doubler: Server) -> None:
    wait_until(lambda: _ready(doubler), what="readiness")
    pid = _pid(doubler)
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        return any(e["kind"] == "restarted" and e["time"] >= crash_time()
                   for e in _events(doubler))

    def crash_time() -> float:
        crashes = [e for e in _events(doubler) if e["kind"] == "crashed" and e.get("pid") == pid]
        return crashes[0]["time"] if crashes else float("inf")

    wait_until(restarted, timeout=20, what="a restarted event after the crash")
    events = _events(doubler)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, reverse=True), "newest first"
    crash = next(e for e in events if e["kind"] == "crashed" and e["pid"] == pid)
    assert crash["model"] == "doubler"
    assert "killed by signal 9" in crash["message"] and str(pid) in crash["message"], crash
    assert crash["exitcode"] == -9
    restart = next(e for e in events if e["kind"] == "restarted")
    assert restart["id"] > crash["id"] and restart["pid"] != pid
    assert f"pid={restart['pid']}" in restart["message"]
    assert any(e["kind"] == "started" for e in events)  # the first process, at start
    wait_until(lambda: _ready(doubler), what="readiness after the restart")
    assert requests.post(f"{doubler.url}/predict", json={"x": 2}, timeout=10).json() == 4


def test_a_hang_is_a_504_in_the_history_and_a_watchdog_kill_in_the_log(doubler: Server) -> None:
    wait_until(lambda: _ready(doubler), what="readiness")
    before = _totals(doubler)["504"]
    r = requests.post(f"{doubler.url}/predict", json={"x": "hang"}, timeout=30)
    assert r.status_code == 504
    assert _totals(doubler)["504"] == before + 1
    wait_until(lambda: any(e["kind"] == "hung-killed" for e in _events(doubler)), timeout=20,
               what="the watchdog's kill in the event log")
    hung = next(e for e in _events(doubler) if e["kind"] == "hung-killed")
    assert "watchdog" in hung["message"]
    wait_until(lambda: _ready(doubler), what="readiness after the restart")


def test_a_reload_is_logged_with_its_revision(doubler: Server) -> None:
    wait_until(lambda: _ready(doubler), what="readiness")
    r = requests.post(f"{doubler.url}/v1/models/doubler/reload", timeout=60)
    assert r.status_code == 200, r.text
    revision = r.json()["revision"]
    newest = _events(doubler, limit=1)
    assert len(newest) == 1 and newest[0]["kind"] == "reloaded", newest
    assert newest[0]["revision"] == revision
    assert f"revision {revision} serving" in newest[0]["message"]


def test_crashes_in_a_row_open_the_circuit_and_say_so() -> None:
    server = Server("--model", "models:Doubler",
                    env={"IPCSERVE_RESTART_BACKOFF": "0.05", "IPCSERVE_HEARTBEAT_INTERVAL": "0.1",
                         "IPCSERVE_CIRCUIT_BREAKER_THRESHOLD": "2"})
    try:
        for _ in range(2):
            wait_until(lambda: _ready(server), what="readiness")
            r = requests.post(f"{server.url}/predict", json={"x": "exit"}, timeout=10)
            assert r.status_code == 502, r.text
        wait_until(lambda: any(e["kind"] == "circuit-opened" for e in _events(server)),
                   what="the circuit-opened event")
        kinds = [e["kind"] for e in _events(server)]
        assert kinds.count("crashed") == 2, kinds
        opened = next(e for e in _events(server) if e["kind"] == "circuit-opened")
        assert "2 crashes in a row" in opened["message"] and opened["crashes"] == 2
        crashed = next(e for e in _events(server) if e["kind"] == "crashed")
        assert "exited with code 3" in crashed["message"] and crashed["exitcode"] == 3
        assert sum(_get(server, "/v1/history")["models"]["doubler"]["requests"]["5xx"]) == 2
    finally:
        assert server.stop() == 0, server.output


def test_events_limit_is_checked(doubler: Server) -> None:
    assert len(_events(doubler, limit=2)) == 2
    for bad in ("0", "-1", "x", "501"):
        r = requests.get(f"{doubler.url}/v1/events?limit={bad}", timeout=10)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["type"] == "InputError" and "limit" in r.json()["error"]


def test_history_and_events_need_the_api_key_like_other_v1_routes() -> None:
    server = Server("--model", "models:Doubler", "--api-key", KEY)
    try:
        for path in ("/v1/history", "/v1/events", "/v1/models"):
            r = requests.get(f"{server.url}{path}", timeout=10)
            assert r.status_code == 401 and r.json()["type"] == "UnauthorizedError", (path, r.text)
            r = requests.get(f"{server.url}{path}", timeout=10,
                             headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, path
        assert requests.post(f"{server.url}/predict", json={"x": 1}, timeout=10,
                             headers={"Authorization": f"Bearer {KEY}"}).json() == 2
        assert sum(_get(server, "/v1/history", KEY)["models"]["doubler"]["requests"]["200"]) == 1
        assert _get(server, "/v1/events", KEY)["data"][0]["kind"] == "started"
        page = requests.get(f"{server.url}/", timeout=10)  # the page itself asks for the key
        assert page.status_code == 200 and "charts.js" in page.text and "tryit.js" in page.text
    finally:
        assert server.stop() == 0, server.output


def test_the_server_says_where_the_status_page_is(doubler: Server) -> None:
    assert f"status page: open {doubler.url}/" in doubler.output


def test_a_failed_reload_and_a_drain_are_logged_in_process(tmp_path: Any) -> None:
    """IPCServe in-process (Flask's test client): the events its reload() and drain() add."""
    from flask import Flask
    from models import LoadsOnce

    marker = tmp_path / "broken"
    app = Flask(__name__)
    ext = IPCServe(app)
    ml = LoadsOnce(str(marker), name="once", timeout=10.0)
    ext.add_model(ml)
    ext.start()
    try:
        client = app.test_client()
        marker.write_text("")
        r = client.post("/v1/models/once/reload")
        assert r.status_code == 500 and r.get_json()["type"] == "ReloadError", r.get_json()
        failed = client.get("/v1/events?limit=1").get_json()["data"][0]
        assert failed["kind"] == "reload-failed" and failed["model"] == "once", failed
        assert "revision 1 keeps serving" in failed["message"]
        assert "the new weights are broken" in failed["message"]
    finally:
        assert ext.drain(grace=5)
    newest = events.LOG.newest(limit=1)[0]
    assert newest["kind"] == "drain-started" and newest["model"] is None, newest
    # Shown to every app: a drain concerns the whole server.
    assert client.get("/v1/events?limit=1").get_json()["data"][0]["kind"] == "drain-started"


# -- a response cache whose backend is down ----------------------------------------------

@pytest.fixture(scope="module")
def dead_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A model cached in Redis at a port where nothing listens (a Redis that is down)."""
    config = tmp_path_factory.mktemp("dead-cache") / "models.toml"
    config.write_text(f"""
[cache]
CACHE_TYPE = "RedisCache"
CACHE_REDIS_URL = "redis://127.0.0.1:{free_port()}/0"

[models.double]
model = "models:Doubler"
cache = true
""")
    server = Server("--config", str(config))
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output


def test_a_failing_cache_backend_is_in_the_model_list_and_the_metrics(dead_cache: Server) -> None:
    for x in range(3):  # answered by the model, as if the model had no cache
        r = requests.post(f"{dead_cache.url}/v1/models/double/predict", json={"x": x}, timeout=10)
        assert r.status_code == 200 and r.json() == 2 * x, r.text
        assert r.headers["X-IPCServe-Cache"] == "miss"
    cache = _get(dead_cache, "/v1/models/double")["cache"]
    # No set after a failed get: the backend that just failed is not asked again.
    assert cache["errors"] == {"get": 3, "set": 0, "clear": 0} and cache["failing"] is True, cache
    assert cache["last_error"]["op"] == "get" and "ConnectionError" in cache["last_error"]["error"]
    metrics = requests.get(f"{dead_cache.url}/metrics", timeout=10).text
    assert 'ipcserve_cache_errors_total{model="double",op="get"} 3.0' in metrics
    assert "ipcserve_cache_requests_total{" not in metrics  # neither hits nor misses
    # One warning line (then one per 10 s at most), naming the model and the backend.
    assert dead_cache.output.count("model double: the response cache (RedisCache) failed") == 1


@pytest.mark.browser
def test_the_status_page_warns_of_a_failing_cache(dead_cache: Server, tmp_path: Any) -> None:
    import chromium

    chromium.skip_unless_available()
    r = requests.post(f"{dead_cache.url}/v1/models/double/predict", json={"x": 1}, timeout=10)
    assert r.status_code == 200
    errors = sum(_get(dead_cache, "/v1/models/double")["cache"]["errors"].values())
    css = '#models tr[data-model="double"] .state .cache-errors'
    with chromium.browser(tmp_path) as driver:
        driver.get(f"{dead_cache.url}/")
        chromium.wait_for(driver, lambda d: chromium.text(d, css) is not None, "the cache warning")
        assert chromium.text(driver, css) == f"cache errors: {errors}"
        warning = chromium.js(driver, "const e = document.querySelector(arguments[0]); "
                                      "return {cls: e.className, title: e.title};", css)
    assert "bad" in warning["cls"].split(), warning  # red: the backend is still failing
    assert "RedisCache" in warning["title"] and "ConnectionError" in warning["title"], warning


# -- the ring and the log stay bounded (pure logic: an injected clock) ---------------------

def test_history_ring_is_fixed_size_and_forgets_what_is_older_than_its_span() -> None:
    now = [1000.0]
    history = History(bucket_seconds=1, span_seconds=10, sample_size=4, clock=lambda: now[0])
    for i in range(100):  # 100 requests in one bucket: the latency sample stays at 4
        history.record("m", 200, 0.001 * (i + 1), batch_size=2, queue_depth=i % 5)
    ring = history._rings["m"]
    assert len(ring) == 10 and len(ring[0].sample) <= 4
    series = history.snapshot()["models"]["m"]
    assert series["requests"]["200"][-1] == 100 and series["rate"][-1] == 100
    assert series["batch_mean"][-1] == 2 and series["queue_depth"][-1] == 4
    p50, p99 = series["p50_ms"][-1], series["p99_ms"][-1]
    assert 1 <= p50 <= p99 <= 100
    now[0] += 5
    history.record("m", 503, 0.5)
    series = history.snapshot()["models"]["m"]
    assert series["requests"]["200"][-6] == 100 and series["requests"]["503"][-1] == 1
    now[0] += 10  # a whole span later: the first bucket has left the window
    history.record("m", 504, 0.5)
    series = history.snapshot()["models"]["m"]
    assert sum(series["requests"]["200"]) == 0 and sum(series["requests"]["503"]) == 0
    assert sum(series["requests"]["504"]) == 1 and len(series["t"]) == 10
    now[0] += 1000  # a lap of the ring later a reused slot never shows old counts
    assert sum(sum(c) for c in history.snapshot()["models"]["m"]["requests"].values()) == 0
    assert history.snapshot(["m", "other"])["models"]["other"]["p50_ms"] == [None] * 10


def test_history_outcomes_of_statuses() -> None:
    history = History(bucket_seconds=60, span_seconds=60, clock=lambda: 30.0)
    for status in (200, 201, 400, 404, 413, 429, 499, 500, 502, 503, 504):
        history.record("m", status, 0.01)
    counts = {k: v[0] for k, v in history.snapshot()["models"]["m"]["requests"].items()}
    assert counts == {"200": 2, "4xx": 3, "503": 2, "504": 1, "cancelled": 1, "5xx": 2}


def test_event_log_keeps_the_newest_and_checks_kinds() -> None:
    log = EventLog(maxlen=3)
    for i in range(5):
        log.record("started", "m" if i % 2 else "n", f"event {i}")
    newest = log.newest()
    assert [e["message"] for e in newest] == ["event 4", "event 3", "event 2"]
    assert [e["message"] for e in log.newest(models={"m"})] == ["event 3"]
    assert len(log.newest(limit=1)) == 1
    log.record("drain-started", None, "drain")
    assert log.newest(models={"m"})[0]["model"] is None  # server-wide events always show
    with pytest.raises(ValueError, match="kind must be one of"):
        log.record("exploded", "m", "no such kind")
    assert MAX_EVENTS == 500
