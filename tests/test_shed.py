"""shed_status: a request shed by max_inflight gets 503 or 429, with Retry-After either way."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from server import Server

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("shed_status", ["503", "429"])
def test_shed_status_is_configurable_and_keeps_retry_after(shed_status: str) -> None:
    server = Server("--model", "models:Sleeper", "--kind", "json", "--max-inflight", "1",
                    "--shed-status", shed_status)
    try:
        url = server.url + "/predict"
        answers: list[requests.Response] = []

        def call() -> None:
            answers.append(requests.post(url, json={"seconds": 1}, timeout=30))

        # Rounds of concurrent calls against one slot: whichever is second is shed (no sleeps;
        # bounded by the deadline).
        deadline = time.monotonic() + 20
        shed = None
        while shed is None and time.monotonic() < deadline:
            threads = [threading.Thread(target=call) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            shed = next((a for a in answers if a.status_code != 200), None)
        assert any(a.status_code == 200 for a in answers)
        assert shed is not None, "no request was shed"
        assert shed.status_code == int(shed_status)
        assert int(shed.headers["Retry-After"]) >= 1
        assert shed.json()["type"] == "OverloadedError"
    finally:
        assert server.stop() == 0, server.output


def test_other_shed_status_is_refused_at_start() -> None:
    server = Server("--model", "models:Sleeper", "--kind", "json", "--shed-status", "500",
                    wait_ready=False)
    try:
        assert server.proc.wait(30) != 0
        assert "503 or 429" in server.output
    finally:
        server.kill()
