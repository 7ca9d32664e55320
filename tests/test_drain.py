"""Draining the way load balancers expect (``--drain-delay``), on one real server.

On SIGTERM ``/readyz`` turns 503 at once while requests are still admitted and answered for
the delay (every response closing its connection), then admission stops (503 +
Retry-After: never admitted, safe to retry elsewhere), the requests in flight are answered,
and the process exits by itself. The multi-host version, behind HAProxy, is in
test_multihost.py.
"""

from __future__ import annotations

import concurrent.futures
import signal

import pytest
import requests
from conftest import wait_until
from server import Server


def _inflight(server: Server) -> int:
    status = requests.get(f"{server.url}/v1/models/sleeper", timeout=5).json()["status"]
    return int(status.get("inflight", 0))


@pytest.mark.timeout(90)
def test_sigterm_flips_readyz_first_serves_through_the_delay_then_finishes_in_flight() -> None:
    server = Server("--model", "models:Sleeper", "--workers", "2", "--drain-delay", "2",
                    "--shutdown-grace", "20")
    url = f"{server.url}/predict"
    try:
        keep_alive = requests.Session()  # a pooled connection, as a balancer holds one
        first = keep_alive.post(url, json={"seconds": 0}, timeout=10)
        assert first.status_code == 200 and first.headers.get("Connection") != "close"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(requests.post, url, json={"seconds": 4}, timeout=30)
            wait_until(lambda: _inflight(server) == 1, what="a long request in flight")
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: requests.get(f"{server.url}/readyz", timeout=5).status_code == 503,
                       what="/readyz turning 503")
            assert requests.get(f"{server.url}/readyz", timeout=5).json()["draining"] is True
            # Still admitted and answered during the delay; the connection is closed after it.
            during = keep_alive.post(url, json={"seconds": 0.1}, timeout=10)
            assert during.status_code == 200, during.text
            assert during.headers.get("Connection") == "close"
            assert keep_alive.post(url, json={"seconds": 0}, timeout=10).status_code == 200  # reconnects

            def refused() -> bool:
                r = requests.post(url, json={"seconds": 0}, timeout=10)
                assert r.status_code in (200, 503), r.text  # never a cut or another error
                return r.status_code == 503

            wait_until(refused, timeout=10, what="admission to stop after the delay")
            after = requests.post(url, json={"seconds": 0}, timeout=10)
            assert after.status_code == 503 and after.headers["Retry-After"]
            assert after.json()["type"] == "WorkerUnavailableError"
            assert long.result(30).status_code == 200  # in flight across the whole drain
        assert server.proc.wait(20) == 0, server.output
    finally:
        server.kill()
    assert "/readyz says 503 now; requests are served for 2s more" in server.output, server.output
    assert "Traceback" not in server.output, server.output


@pytest.mark.timeout(60)
def test_a_second_sigterm_cuts_the_delay_short() -> None:
    server = Server("--model", "models:Sleeper", "--drain-delay", "60")
    try:
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: requests.get(f"{server.url}/readyz", timeout=5).status_code == 503,
                   what="/readyz turning 503")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 128 + signal.SIGTERM, server.output
    finally:
        server.kill()


def test_a_negative_drain_delay_is_refused_with_exit_code_2() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ipcserve", "serve", "--drain-delay", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--drain-delay must be a number of seconds >= 0" in done.stderr, done.stderr
