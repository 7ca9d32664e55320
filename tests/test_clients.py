"""examples/client.py and examples/client.js as a user runs them, against the real server."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from digits_data import held_out_pngs, well_classified_png
from server import ROOT, Server

pytestmark = pytest.mark.timeout(120)

RUN_TIMEOUT = 60  # seconds per client run, well under the test timeout

CLIENTS = {
    "python": [sys.executable, str(ROOT / "examples" / "client.py")],
    "node": ["node", str(ROOT / "examples" / "client.js")],
}


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "node" and shutil.which("node") is None:
        pytest.skip("node is not installed")
    return CLIENTS[request.param]


def run(client: list[str], url: str, path: Path, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "IPCSERVE_API_KEY"}
    if api_key:
        env["IPCSERVE_API_KEY"] = api_key
    return subprocess.run([*client, url, str(path)], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env=env, cwd=ROOT)


def test_client_prints_the_prediction(client: list[str], server: Server, tmp_path: Path) -> None:
    path, label = well_classified_png(server.url, tmp_path)
    done = run(client, server.url, path)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["label"] == label
    assert len(answer["probabilities"]) == 10


def test_client_reports_http_error(client: list[str], server: Server, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not a picture\n")
    done = run(client, server.url, path)
    assert done.returncode != 0
    assert done.stdout == ""
    assert "415" in done.stderr and "UnsupportedMediaTypeError" in done.stderr, done.stderr


def test_plain_fetch_client_shows_a_readable_error(server: Server) -> None:
    """A front-end's usual ``throw new Error(`API Error: ${status} - ${errorData.error}`)``."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    import requests

    features = [0.5] * 64  # the digits model wants "pixels": a bad body, caught before the model
    message = requests.post(f"{server.url}/predict", json={"features": features}, timeout=30).json()["error"]
    assert isinstance(message, str) and "pixels" in message, message
    done = subprocess.run(["node", str(ROOT / "tests" / "plain_fetch_client.js"), server.url,
                           json.dumps(features)], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, cwd=ROOT)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == f"API Error: 400 - {message}\n", done.stdout
    assert "[object Object]" not in done.stdout


def test_client_sends_the_api_key(client: list[str], tmp_path: Path) -> None:
    server = Server("--api-key", "s3cret")
    try:
        path, label = well_classified_png(server.url, tmp_path, api_key="s3cret")
        done = run(client, server.url, path, api_key="s3cret")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["label"] == label
        done = run(client, server.url, path)
        assert done.returncode != 0 and "401 UnauthorizedError" in done.stderr, done.stderr
    finally:
        assert server.stop() == 0, server.output


class _Busy(http.server.BaseHTTPRequestHandler):
    """Answers 503 with ``Retry-After: 0`` until ``busy`` runs out, then a fixed prediction."""

    busy = 0
    seen = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen += 1
        if type(self).seen <= self.busy:
            status, body = 503, {"error": "busy", "type": "OverloadedError"}
        else:
            status, body = 200, {"label": 4, "probabilities": [0.1] * 10}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def busy_server() -> Iterator[tuple[str, type[_Busy]]]:
    handler = type("Busy", (_Busy,), {})  # fresh counters per test
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="busy-server")
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.mark.parametrize("busy, ok", [(3, True), (4, False)], ids=["recovers", "gives-up"])
def test_client_retries_503(client: list[str], busy_server: tuple[str, type[_Busy]],
                            tmp_path: Path, busy: int, ok: bool) -> None:
    url, handler = busy_server
    handler.busy = busy
    path = tmp_path / "digit.png"
    path.write_bytes(held_out_pngs()[0][0])
    done = run(client, url, path)
    assert handler.seen == 4  # the first try and 3 retries, never more
    if ok:
        assert done.returncode == 0 and json.loads(done.stdout)["label"] == 4, done.stderr
    else:
        assert done.returncode != 0 and "503 OverloadedError" in done.stderr, done.stderr
