"""Nothing fails in silence (issue 24): a failed channel hand-over, a supervisor thread that
raises, and a version stopped past its grace each give a prompt, documented answer, and
show in readiness, /metrics, the event log and the server log.

Faults are real: the ML process really loses a pipe end while unpickling it (the fd is
fetched and dropped in ``rebuild_connection``, what a failed transfer does), the real
supervisor thread raises, a real reload stops a real ML process mid-request.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import pytest
import requests
from conftest import spawn_events, wait_until
from models import Blocker, HandoverFails
from server import Server
from measure import metrics, sample

from ipcserve import WorkerCrashedError, WorkerUnavailableError

pytestmark = pytest.mark.timeout(90)


def _events(server: Server, kind: str) -> list[dict]:
    data = requests.get(f"{server.url}/v1/events", timeout=10).json()["data"]
    return [e for e in data if e["kind"] == kind]


# -- 1. a channel the ML process cannot take ------------------------------------------------

@pytest.mark.parametrize("fetch", [True, False], ids=["fd-lost", "fd-never-fetched"])
def test_a_failed_handover_is_sent_again_at_once(fetch: bool) -> None:
    """The ML process cannot take our pipe end: the call goes out again on a fresh channel
    at once, not at its deadline (10 s here), whether our end of the pipe then reports EOF
    (the fd was received and lost) or not (it was never fetched)."""
    with HandoverFails(failures=1, fetch=fetch, timeout=10.0) as ml:
        t0 = time.monotonic()
        assert ml(21) == 42
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, f"answered after {elapsed:.2f}s"
        assert ml.status["handovers_failed"] == 1
        assert ml(4) == 8  # the channel that worked is reused


@pytest.mark.parametrize("fetch", [True, False], ids=["fd-lost", "fd-never-fetched"])
def test_handovers_that_keep_failing_answer_503_at_once_then_recover(fetch: bool) -> None:
    """Bounded: three lost channels in a row for one call give a clear 503 (never computed,
    safe to retry), not a loop and not a 504; the ML process serves the next call."""
    with HandoverFails(failures=3, fetch=fetch, timeout=10.0) as ml:
        t0 = time.monotonic()
        with pytest.raises(WorkerUnavailableError) as caught:
            ml(1)
        assert time.monotonic() - t0 < 1.0
        assert type(caught.value) is WorkerUnavailableError  # not a crash: never computed
        assert caught.value.http_status == 503
        assert "could not take this request's channel 3 times in a row" in str(caught.value)
        assert ml.status["handovers_failed"] == 3
        assert ml(5) == 10


@pytest.mark.timeout(60)
def test_a_failed_handover_over_http_is_answered_in_well_under_a_second() -> None:
    server = Server("--model", "models:HandoverFails", "--timeout", "10")
    try:
        t0 = time.monotonic()
        r = requests.post(f"{server.url}/predict", json={"x": 21}, timeout=30)
        elapsed = time.monotonic() - t0
        assert r.status_code == 200 and r.json() == 42, r.text
        assert elapsed < 1.0, f"answered after {elapsed:.2f}s"
        assert sample(metrics(server.url), "ipcserve_channel_handovers_failed_total", model="handoverfails") == 1
        wait_until(lambda: "could not be decoded" in server.output, what="the warning")
    finally:
        assert server.stop() == 0, server.output


# -- 4. the supervisor thread fails -----------------------------------------------------------

@pytest.mark.timeout(90)
def test_a_failing_supervisor_is_visible_then_restarted(tmp_path: Path) -> None:
    """While the supervisor's tick raises, /readyz says 503, the event log and /metrics say
    why, requests are still served; the thread retries with a backoff, logs the traceback
    once (not once per tick), and readiness comes back when a tick completes."""
    fault = tmp_path / "supervisor-fault"
    server = Server("--model", "models:SupervisorFails",
                    env={"IPCSERVE_TEST_SUPERVISOR_FAULT": str(fault),
                         "IPCSERVE_HEARTBEAT_INTERVAL": "0.1"})
    try:
        assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
        fault.touch()
        wait_until(lambda: requests.get(f"{server.url}/readyz", timeout=10).status_code == 503,
                   what="/readyz turning 503")
        body = requests.get(f"{server.url}/readyz", timeout=10).json()
        assert body["models"] == {"supervisorfails": False} and not body["draining"], body
        assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code != 200
        wait_until(lambda: (sample(metrics(server.url), "ipcserve_supervisor_failures_total",
                                   model="supervisorfails") or 0) >= 3,
                   what="three failed ticks")
        assert sample(metrics(server.url), "ipcserve_model_ready", model="supervisorfails") == 0
        failed = _events(server, "supervisor-failed")
        assert len(failed) == 1 and "injected supervisor fault" in failed[0]["message"], failed
        status = requests.get(f"{server.url}/v1/models/supervisorfails", timeout=10).json()["status"]
        assert status["supervisor_failing"] is True, status
        # The ML process is fine: requests are answered meanwhile.
        r = requests.post(f"{server.url}/predict", json={"x": 21}, timeout=10)
        assert r.status_code == 200 and r.json() == 42, r.text
        assert server.output.count("the supervisor thread failed") == 1, server.output
        assert "RuntimeError: injected supervisor fault (test)" in server.output

        fault.unlink()
        wait_until(lambda: requests.get(f"{server.url}/readyz", timeout=10).status_code == 200,
                   what="/readyz back to 200")
        assert _events(server, "supervisor-recovered"), _events(server, "supervisor-recovered")
        r = requests.post(f"{server.url}/predict", json={"x": 4}, timeout=10)
        assert r.status_code == 200 and r.json() == 8, r.text
    finally:
        assert server.stop() == 0, server.output


# -- 5. a version stopped past its grace --------------------------------------------------------

def test_a_call_cut_by_shutdown_past_its_grace_is_a_crash_not_a_503() -> None:
    """Sent to the ML process and computing when the grace ran out: 502, never the 503 a
    balancer would resend."""
    entered, release = spawn_events()
    ml = Blocker(entered, release, timeout=30.0).start()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(ml, "block")
            assert entered.wait(10)
            assert ml.shutdown(grace=0.1) is False
            with pytest.raises(WorkerCrashedError) as caught:
                future.result(10)
        assert caught.value.http_status == 502
        assert "was stopped (a reload or a shutdown, after its grace period)" in str(caught.value)
    finally:
        # Never release.set(): its waiter was killed, and a multiprocessing Event's set()
        # waits for every sleeper it wakes.
        ml.shutdown(grace=0)


@pytest.mark.timeout(90)
def test_a_reload_past_its_grace_answers_the_cut_request_502() -> None:
    server = Server("--model", "models:Sleeper", "--timeout", "60", "--shutdown-grace", "0.5")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(requests.post, f"{server.url}/predict", json={"seconds": 30},
                               timeout=60)
            wait_until(lambda: requests.get(f"{server.url}/v1/models/sleeper", timeout=10)
                       .json()["status"].get("inflight") == 1, what="the slow request in flight")
            t0 = time.monotonic()
            reload = requests.post(f"{server.url}/v1/models/sleeper/reload", timeout=60)
            cut = slow.result(60)
            elapsed = time.monotonic() - t0
        assert reload.status_code == 200, reload.text
        assert reload.json()["revision"] == 2 and reload.json()["drained"] is False
        assert cut.status_code == 502, cut.text
        assert "Retry-After" not in cut.headers
        body = cut.json()
        assert body["type"] == "WorkerCrashedError" and "after its grace period" in body["error"]
        assert elapsed < 20, f"the cut request took {elapsed:.1f}s"  # far from its 30 s of work
        r = requests.post(f"{server.url}/predict", json={"seconds": 0}, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        assert server.stop() == 0, server.output

