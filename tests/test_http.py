"""The real server (python app.py on waitress) through real HTTP."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import signal
import threading

import pytest
import requests
from conftest import wait_until
from digits_data import held_out_pngs
from prometheus_client.parser import text_string_to_metric_families
from server import Server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def doubler() -> Server:
    server = Server("--model", "models:Doubler", "--timeout", "1", "--hang-timeout", "3",
                    env={"IPCSERVE_RESTART_BACKOFF": "0.05", "IPCSERVE_HEARTBEAT_INTERVAL": "0.1"})
    yield server
    assert server.stop() == 0, server.output


def error_of(response: requests.Response) -> dict:
    """The error body, checked: ``{"error": "<message>", "type": "<ErrorType>"}``.

    ``error`` is a string so a plain ``fetch`` client shows a sentence, not ``[object Object]``;
    a ModelError adds ``model_error_type``.
    """
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    body = response.json()
    expected_keys = {"error", "type"}
    if body.get("type") == "ModelError" and "model_error_type" in body:
        expected_keys.add("model_error_type")
    assert set(body) == expected_keys, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["type"], str) and body["type"], body
    assert "Traceback" not in response.text
    return body


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), 255).save(buf, format="PNG")
    return buf.getvalue()


def test_digits_model_is_accurate_over_http(server: Server) -> None:
    samples = held_out_pngs()
    local = threading.local()
    sessions: list[requests.Session] = []  # one per pool thread, all closed below
    sessions_lock = threading.Lock()

    def classify(sample: tuple[bytes, int]) -> bool:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            with sessions_lock:
                sessions.append(session)
        r = session.post(f"{server.url}/predict", data=sample[0],
                         headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-3
        return body["label"] == sample[1]

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            hits = list(pool.map(classify, samples))
    finally:
        for session in sessions:
            session.close()
    assert 1 <= len(sessions) <= 8
    accuracy = sum(hits) / len(hits)
    assert accuracy >= 0.90, accuracy


def test_multipart_upload_and_json_pixels(server: Server) -> None:
    image, label = held_out_pngs()[0]
    r = requests.post(f"{server.url}/v1/models/digits/predict",
                      files={"image": ("d.png", image, "image/png")}, timeout=30)
    assert r.status_code == 200 and r.json()["label"] == label
    r = requests.post(f"{server.url}/predict", json={"pixels": [0.0] * 64}, timeout=30)
    assert r.status_code == 200 and 0 <= r.json()["label"] <= 9


@pytest.mark.parametrize("kwargs, status, words", [
    ({"data": b"not an image", "headers": {"Content-Type": "image/png"}}, 415, "not an image"),
    ({"data": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty"),
    ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "multipart"),
    ({"data": b"{", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ({"json": [1, 2]}, 400, "must be an object"),
    ({"json": {"pixels": "abc"}}, 400, "pixels"),
    ({"json": {"pixels": [1] * 64, "extra": 1}}, 400, "pixels"),
    ({"data": b'{"pixels": NaN}', "headers": {"Content-Type": "application/json"}}, 400, "NaN"),
    ({"files": {"other": ("x.txt", b"", "text/plain")}, "data": {"a": "b"}}, 400, "empty"),
    ({"data": {"a": "b"}}, 415, "got application/x-www-form-urlencoded"),
], ids=["garbage", "empty", "text", "bad-json", "json-array", "json-type", "json-field",
        "json-nan", "multipart-empty-file", "form"])
def test_bad_input_gets_a_clear_json_error(server: Server, kwargs: dict, status: int, words: str) -> None:
    r = requests.post(f"{server.url}/predict", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert words.lower() in error_of(r)["error"].lower()


def test_oversized_inputs_get_413(server: Server) -> None:
    r = requests.post(f"{server.url}/predict", data=png(6000, 4000),  # 24 Mpx > 20 Mpx
                      headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 413 and "pixels" in error_of(r)["error"]
    r = requests.post(f"{server.url}/predict", data=b"\0" * (17 * 1024 * 1024),
                      headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 413
    error_of(r)


def test_image_cut_in_its_pixel_data_is_400(server: Server) -> None:
    # The header is whole, so it is an image: its pixels cannot be decoded.
    data = held_out_pngs()[0][0]
    r = requests.post(f"{server.url}/predict", data=data[: len(data) // 2],
                      headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 400, r.text
    assert error_of(r)["type"] == "InputError"
    assert "could not be decoded" in error_of(r)["error"]


def test_image_cut_in_its_header_is_415(server: Server) -> None:
    # Only the PNG signature and part of the header: Pillow cannot tell what it is.
    data = held_out_pngs()[0][0]
    r = requests.post(f"{server.url}/predict", data=data[:12],
                      headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 415, r.text
    assert error_of(r)["type"] == "UnsupportedMediaTypeError"
    assert "not an image" in error_of(r)["error"]


def test_unknown_model_and_method(server: Server) -> None:
    r = requests.post(f"{server.url}/v1/models/nope/predict", json={}, timeout=30)
    assert r.status_code == 404 and "digits" in error_of(r)["error"]
    r = requests.get(f"{server.url}/predict", timeout=30)
    assert r.status_code == 405
    error_of(r)
    r = requests.get(f"{server.url}/no/such/page", timeout=30)
    assert r.status_code == 404
    error_of(r)


def test_health_readiness_status_and_metrics(server: Server) -> None:
    assert requests.get(f"{server.url}/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(f"{server.url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["models"] == {"digits": True}
    models = requests.get(f"{server.url}/v1/models", timeout=30).json()
    assert models["default"] == "digits"
    status = models["data"][0]["status"]
    assert status["workers"][0]["state"] == "ready" and status["workers"][0]["pid"]
    before = _samples(server)
    requests.post(f"{server.url}/predict", json={"pixels": [0] * 64}, timeout=30)
    requests.post(f"{server.url}/predict", json={"pixels": [0]}, timeout=30)
    after = _samples(server)
    key200 = ("ipcserve_requests_total", (("model", "digits"), ("status", "200")))
    key400 = ("ipcserve_requests_total", (("model", "digits"), ("status", "400")))
    assert after[key200] - before.get(key200, 0) == 1
    assert after[key400] - before.get(key400, 0) == 1
    for name in ("ipcserve_request_latency_seconds_count", "ipcserve_inference_seconds_count",
                 "ipcserve_queue_wait_seconds_count", "ipcserve_batch_size_count",
                 "ipcserve_queue_depth", "ipcserve_restarts_total", "ipcserve_hangs_killed_total",
                 "ipcserve_model_ready"):
        assert any(k[0] == name for k in after), name
    assert after[("ipcserve_model_ready", (("model", "digits"),))] == 1


def _samples(server: Server) -> dict:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_status_page_is_served(server: Server) -> None:
    r = requests.get(f"{server.url}/", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "<form" in r.text and "http://" not in r.text.replace("http://127.0.0.1", "")


def test_json_model_errors_map_to_statuses(doubler: Server) -> None:
    url = f"{doubler.url}/predict"
    assert requests.post(url, json={"x": 21}, timeout=30).json() == 42
    r = requests.post(url, json={"x": "raise"}, timeout=30)
    assert r.status_code == 500 and error_of(r)["type"] == "ModelError"
    assert error_of(r)["model_error_type"] == "ValueError"
    assert "does not like 'raise'" in error_of(r)["error"]
    r = requests.post(url, json={"x": "input-error"}, timeout=30)
    assert r.status_code == 400 and "input-error" in error_of(r)["error"]
    r = requests.post(url, json={"y": 1, "x": 1}, timeout=30)
    assert r.status_code == 200
    r = requests.post(url, json={"_private": 1}, timeout=30)
    assert r.status_code == 400


def test_crash_gives_502_then_recovers(doubler: Server) -> None:
    """502, not 503: the request was admitted and may be what killed the process, so a
    balancer retrying 503s (never admitted) must not resend it to the next host."""
    url = f"{doubler.url}/predict"
    r = requests.post(url, json={"x": "exit"}, timeout=30)
    assert r.status_code == 502 and "Retry-After" not in r.headers
    assert error_of(r)["type"] == "WorkerCrashedError"
    wait_until(lambda: requests.get(f"{doubler.url}/readyz", timeout=30).status_code == 200,
               what="readiness after the restart")
    assert requests.post(url, json={"x": 2}, timeout=30).json() == 4


def test_hang_gives_504_and_the_watchdog_restarts(doubler: Server) -> None:
    url = f"{doubler.url}/predict"
    r = requests.post(url, json={"x": "hang"}, timeout=30)
    assert r.status_code == 504 and error_of(r)["type"] == "ResultDeadlineError"
    wait_until(lambda: _samples(doubler).get(("ipcserve_hangs_killed_total", (("model", "doubler"),)), 0) >= 1,
               what="the watchdog kill")
    wait_until(lambda: requests.get(f"{doubler.url}/readyz", timeout=30).status_code == 200,
               what="readiness after the restart")
    assert requests.post(url, json={"x": 3}, timeout=30).json() == 6


def test_api_key_is_required_when_set() -> None:
    server = Server("--api-key", "s3cret")
    try:
        url = f"{server.url}/predict"
        r = requests.post(url, json={"pixels": [0] * 64}, timeout=30)
        assert r.status_code == 401 and error_of(r)["type"] == "UnauthorizedError"
        r = requests.post(url, json={"pixels": [0] * 64}, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert r.status_code == 401
        r = requests.post(url, json={"pixels": [0] * 64}, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert r.status_code == 200
        assert requests.get(f"{server.url}/metrics", timeout=30).status_code == 401
        assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
    finally:
        assert server.stop() == 0


def test_model_that_fails_to_load_exits_non_zero() -> None:
    server = Server("--model", "models:FailsToLoad", wait_ready=False)
    assert server.proc.wait(30) == 1
    server.kill()
    assert "weights file /nonexistent/model.bin is missing" in server.output


def test_sigterm_drains_in_flight_requests_then_exits_cleanly() -> None:
    server = Server("--model", "models:Sleeper", "--threads", "4")
    try:
        ml_pid = requests.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["status"]["workers"][0]["pid"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(requests.post, f"{server.url}/predict", json={"seconds": 1.5}, timeout=30)
            wait_until(lambda: _samples(server).get(("ipcserve_queue_depth", (("model", "sleeper"),))) == 1,
                       what="the slow request to be in flight")
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: requests.get(f"{server.url}/readyz", timeout=30).status_code == 503,
                       what="readiness to drop")
            r = requests.post(f"{server.url}/predict", json={"seconds": 0}, timeout=30)
            assert r.status_code == 503 and error_of(r)["type"] == "WorkerUnavailableError"
            done = slow.result(30)
        assert done.status_code == 200 and done.json()["slept"] == 1.5
        assert server.proc.wait(30) == 0
        wait_until(lambda: not os.path.exists(f"/proc/{ml_pid}"), what="the ML process to exit")
    finally:
        assert server.stop() == 0, server.output
    assert "draining" in server.output


def test_response_bodies_are_json_even_for_405_and_404(doubler: Server) -> None:
    r = requests.put(f"{doubler.url}/v1/models/doubler/predict", timeout=30)
    assert r.status_code == 405
    json.loads(r.text)
    assert error_of(r)["type"] == "MethodNotAllowed"
    r = requests.get(f"{doubler.url}/no/such/page", timeout=30)
    assert r.status_code == 404
    json.loads(r.text)
    assert error_of(r)["type"] == "NotFound"
    r = requests.post(f"{doubler.url}/v1/models/nope/predict", json={"x": 1}, timeout=30)
    assert r.status_code == 404
    assert error_of(r)["type"] == "NotFoundError" and "doubler" in error_of(r)["error"]


def test_json_fields_named_like_call_parameters_reach_the_model(doubler: Server) -> None:
    url = f"{doubler.url}/predict"
    r = requests.post(url, json={"timeout": 2}, timeout=30)
    assert r.status_code == 200 and r.json() == {"timeout": 4}
    r = requests.post(url, json={"self": 3}, timeout=30)
    assert r.status_code == 400 and "self" in error_of(r)["error"]
    r = requests.post(url, data=b'{"x": 1e400}', headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "overflows" in error_of(r)["error"]


def test_a_wrong_field_for_predict_is_a_400_naming_it() -> None:
    server = Server("--model", "models:Sleeper")
    try:
        r = requests.post(f"{server.url}/predict", json={"secs": 1}, timeout=30)
        assert r.status_code == 400
        message = error_of(r)["error"]
        assert "secs" in message and "seconds" in message
    finally:
        assert server.stop() == 0


def test_readiness_before_and_after_the_model_has_loaded(tmp_path) -> None:
    gate = tmp_path / "gate"
    server = Server("--model", "models:GatedLoad", env={"IPCSERVE_TEST_GATE": str(gate)},
                    wait_ready=False)
    try:
        assert server.url
        assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
        r = requests.get(f"{server.url}/readyz", timeout=30)
        assert r.status_code == 503 and r.json()["models"] == {"gatedload": False}
        r = requests.post(f"{server.url}/predict", json={"x": 1}, timeout=30)
        assert r.status_code == 503 and "loading" in error_of(r)["error"]
        assert r.headers["Retry-After"]
        gate.write_text("open")
        server.wait_ready(30)
        assert requests.post(f"{server.url}/predict", json={"x": 1}, timeout=30).json() == 1
    finally:
        assert server.stop() == 0


def test_sigterm_while_the_model_loads_stops_promptly(tmp_path) -> None:
    server = Server("--model", "models:GatedLoad", env={"IPCSERVE_TEST_GATE": str(tmp_path / "never")},
                    wait_ready=False)
    try:
        assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
    finally:
        assert server.stop(timeout=20) == 0
    assert "stopped while loading" in server.output
