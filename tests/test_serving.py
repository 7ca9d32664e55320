"""The serving core's promises, held on every surface: native, OpenAI and V2 requests all
count their deadline from arrival, are cancelled when the client leaves, are counted in
/metrics and /v1/history, and see the same readiness."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import wait_until

from server import Server
from measure import sample

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    steps = tmp_path_factory.mktemp("rows") / "steps"
    steps.write_text("")
    server = Server("--model", "iface_models:Rows", "--max-batch-size", "64",
                    env={"IPCSERVE_TEST_STEPS": str(steps), "IPCSERVE_TEST_STEP": "0.1"})
    try:
        yield server, steps
    finally:
        assert server.stop() == 0, server.output


def _rows_body(n: int, first: float = 0.0) -> dict[str, Any]:
    data = [first, 0.0, 0.0, 0.0] + [0.0] * (4 * (n - 1))
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [n, 4], "data": data}]}


def test_a_v2_request_of_64_rows_is_one_admission_and_one_batched_call(
        rows: tuple[Server, Path]) -> None:
    server, _ = rows
    before = requests.get(f"{server.url}/metrics", timeout=10).text
    answer = requests.post(f"{server.url}/v2/models/rows/infer", json=_rows_body(64), timeout=30)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    # Every row was computed by one model call of 64 items.
    assert output["shape"] == [64, 1] and output["data"] == [64] * 64
    after = requests.get(f"{server.url}/metrics", timeout=10).text
    for name, labels, added in [("ipcserve_requests_total", {"model": "rows", "status": "200"}, 1),
                                ("ipcserve_batch_size_count", {"model": "rows"}, 1),
                                ("ipcserve_batch_size_sum", {"model": "rows"}, 64)]:
        assert _count(after, name, **labels) - _count(before, name, **labels) == added, name
    history = requests.get(f"{server.url}/v1/history", timeout=10).json()["models"]["rows"]
    assert sum(history["requests"]["200"]) >= 1
    assert max(v for v in history["batch_max"] if v is not None) == 64


@pytest.mark.timeout(60)
def test_a_v2_client_that_disconnects_stops_the_work(rows: tuple[Server, Path]) -> None:
    server, steps = rows
    steps.write_text("")
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps(_rows_body(2, first=-100)).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/rows/infer HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: len(steps.read_text()) >= 3, what="3 steps")
    at_close = len(steps.read_text())

    def cancelled() -> float:
        metrics = requests.get(f"{server.url}/metrics", timeout=5).text
        return _count(metrics, "ipcserve_cancelled_total", model="rows", reason="disconnect",
                       stage="running")

    wait_until(lambda: cancelled() == 2, what="both rows cancelled")
    assert len(steps.read_text()) - at_close <= 2
    metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    assert _count(metrics, "ipcserve_requests_total", model="rows", status="499") == 1
    answer = requests.post(f"{server.url}/v2/models/rows/infer", json=_rows_body(1), timeout=10)
    assert answer.status_code == 200


def _surfaces() -> list[tuple[str, str, dict[str, Any], Any]]:
    """(surface, route, body, the error type from the body) for a model of each kind."""
    return [
        ("native", "/v1/models/doubler/predict", {"x": 1}, lambda b: b["type"]),
        ("openai", "/v1/embeddings", {"model": "fakeembedder", "input": "a"},
         lambda b: b["error"]["code"]),
        ("v2", "/v2/models/rows/infer", _rows_body(1), lambda b: b["error"]),
    ]


@pytest.fixture
def in_process() -> Iterator[Any]:
    """Three models on one Flask app, driven through its test client (per test: the
    no-leftovers check stops every ML process a test started)."""
    from flask import Flask
    from iface_models import Rows
    from models import Doubler, FakeEmbedder

    from ipcserve.flask import IPCServe

    app = Flask("serving")
    ext = IPCServe(app)
    for ml in (Doubler(timeout=5.0), FakeEmbedder(timeout=5.0), Rows(timeout=5.0)):
        ext.add_model(ml)
    ext.start()
    try:
        yield app
    finally:
        ext.drain(grace=1)


@pytest.mark.parametrize("surface, route, body, error_of", _surfaces(),
                         ids=[s[0] for s in _surfaces()])
def test_every_surface_counts_its_deadline_from_arrival(in_process: Any, surface: str,
                                                        route: str, body: dict[str, Any],
                                                        error_of: Any) -> None:
    client = in_process.test_client()
    late = client.post(route, json=body, environ_overrides={"ipcserve.received": time.monotonic() - 6})
    assert late.status_code == 504, late.get_data(as_text=True)
    assert error_of(late.json) in ("QueueDeadlineError", "timeout") or "deadline" in error_of(late.json)
    in_time = client.post(route, json=body, environ_overrides={"ipcserve.received": time.monotonic()})
    assert in_time.status_code == 200, in_time.get_data(as_text=True)


@pytest.mark.parametrize("surface, route, body, error_of", _surfaces(),
                         ids=[s[0] for s in _surfaces()])
def test_every_surface_is_cancelled_by_its_disconnect_probe(in_process: Any, surface: str,
                                                            route: str, body: dict[str, Any],
                                                            error_of: Any) -> None:
    # waitress's probe says the client left: the call is cancelled (499), never computed.
    client = in_process.test_client()
    gone = client.post(route, json=body,
                       environ_overrides={"waitress.client_disconnected": lambda: True})
    assert gone.status_code == 499, gone.get_data(as_text=True)


def test_every_surface_is_counted_in_the_metrics(in_process: Any) -> None:
    from ipcserve.http.serving import served

    client = in_process.test_client()
    for _, route, body, _ in _surfaces():
        assert client.post(route, json=body).status_code == 200
    with in_process.app_context():
        text = served().metrics.exposition()[0].decode()
    for model in ("doubler", "fakeembedder", "rows"):
        assert _count(text, "ipcserve_requests_total", model=model, status="200") >= 1, model


@pytest.mark.timeout(90)
def test_readyz_and_the_v2_health_routes_agree_during_a_drain_delay() -> None:
    server = Server("--drain-delay", "30")
    try:
        probes = ["/readyz", "/v2/health/ready", "/v2/models/digits/ready"]
        assert [requests.get(server.url + p, timeout=5).status_code for p in probes] == [200] * 3
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: requests.get(server.url + "/readyz", timeout=5).status_code == 503,
                   what="/readyz 503")
        assert [requests.get(server.url + p, timeout=5).status_code for p in probes] == [503] * 3
        # Still served meanwhile: balancers stop sending before anything is refused.
        pixels = {"pixels": [0.0] * 64}
        assert requests.post(server.url + "/predict", json=pixels, timeout=10).status_code == 200
    finally:
        assert server.stop(signal.SIGTERM) == 128 + signal.SIGTERM, server.output


def _count(text: str, name: str, **labels: str) -> float:
    """A counter's sample, 0 before it was ever incremented."""
    return sample(text, name, **labels) or 0.0
