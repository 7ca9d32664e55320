"""How ``python app.py`` answers signals: SIGHUP reloads the models without dropping a request,
SIGTERM drains, a second Ctrl-C stops at once and cleanly."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import pytest
import requests
from conftest import wait_until
from server import Server


def _inflight(server: Server) -> int:
    status = requests.get(f"{server.url}/v1/models/sleeper", timeout=5).json()["status"]
    return int(status.get("inflight", 0))


@pytest.mark.timeout(60)
def test_sighup_reloads_and_drops_no_request() -> None:
    server = Server("--model", "models:Sleeper")
    try:
        before = requests.get(f"{server.url}/v1/models/sleeper", timeout=5).json()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(requests.post, f"{server.url}/predict", json={"seconds": 1.5},
                                   timeout=20) for _ in range(2)]
            wait_until(lambda: _inflight(server) == 2, what="2 requests in flight")
            server.proc.send_signal(signal.SIGHUP)
            responses = [f.result(20) for f in futures]
        assert [r.status_code for r in responses] == [200, 200]
        wait_until(lambda: "SIGHUP reload done" in server.output, timeout=30, what="the reload")
        after = requests.get(f"{server.url}/v1/models/sleeper", timeout=5).json()
        assert (before["revision"], after["revision"]) == (1, 2)
        old_pids = {w["pid"] for w in before["status"]["workers"]}
        new_pids = {w["pid"] for w in after["status"]["workers"]}
        assert old_pids and new_pids and not old_pids & new_pids
        assert server.proc.poll() is None, "SIGHUP must not stop the server"
        reply = requests.post(f"{server.url}/predict", json={"seconds": 0}, timeout=10)
        assert reply.status_code == 200
    finally:
        code = server.stop()
    assert code == 0, server.output
    assert "SIGHUP received: reloading every model" in server.output


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_stops_within_a_second_cleanly() -> None:
    server = Server("--model", "models:Sleeper", "--timeout", "60", "--shutdown-grace", "30")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(requests.post, f"{server.url}/predict", json={"seconds": 40},
                             timeout=30)
        wait_until(lambda: _inflight(server) == 1, what="a request in flight")
        server.proc.send_signal(signal.SIGINT)
        wait_until(lambda: "SIGINT received: draining" in server.output, what="the drain")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        code = server.proc.wait(10)
        elapsed = time.monotonic() - t0
        response = future.result(10)
    assert code == 130, server.output
    assert elapsed < 1.0, f"took {elapsed:.2f}s to stop after the second Ctrl-C"
    # Admitted and computing when stopped: 502 (as a crash), never the 503 a balancer resends.
    assert response.status_code == 502 and response.json()["type"] == "WorkerCrashedError"
    server.kill()
    assert "Traceback" not in server.output and "EBADF" not in server.output, server.output


@pytest.mark.timeout(60)
def test_a_normal_start_and_stop_logs_no_warning() -> None:
    server = Server()
    assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 200
    assert server.stop() == 0
    lines = server.output.splitlines()
    assert any(" INFO ipcserve.server.lifecycle: serving digits on http://" in line for line in lines), lines
    assert any("models ready: digits" in line for line in lines), lines
    assert any(line.endswith("INFO ipcserve.server.lifecycle: stopped") for line in lines), lines
    noisy = [line for line in lines if " WARNING " in line or " ERROR " in line]
    assert not noisy, noisy
    assert not any("ipcserve: ipcserve:" in line for line in lines)


_OWN_APP = """
import sys
from flask import Flask
from ipcserve.flask import IPCServe
from ipcserve.server import serve
from models import Doubler

app = Flask(__name__)
IPCServe(app).add_model(Doubler(name="doubler"))
if __name__ == "__main__":
    raise SystemExit(serve(app, port=int(sys.argv[sys.argv.index("--port") + 1])))
"""


@pytest.mark.timeout(60)
def test_serve_in_your_own_app_logs_its_lines_without_a_logging_setup(tmp_path: Path) -> None:
    """``serve(app)`` from a script that configured no logging prints what ``python app.py``
    prints (it once printed nothing: the reader could not find the status page's address)."""
    script = tmp_path / "myapp.py"
    script.write_text(_OWN_APP)
    server = Server(script=str(script))  # finds its URL in the "serving ..." line, or fails
    try:
        answer = requests.post(f"{server.url}/v1/models/doubler/predict", json={"x": 21},
                               timeout=5)
        assert answer.json() == 42, answer.text
    finally:
        assert server.stop() == 0
    lines = server.output.splitlines()
    assert any("INFO ipcserve.server.lifecycle: serving doubler on http://" in line
               for line in lines), lines
    assert any(line.endswith("INFO ipcserve.server.lifecycle: stopped") for line in lines), lines
