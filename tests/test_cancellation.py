"""Work nobody waits for is not done: cancelled in the queue and inside a running predict.

Real ML processes; the models count their steps in shared memory, so a test sees exactly
how much work ran after the caller gave up.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

import pytest
from conftest import spawn_events, wait_until
from measure import STEP, settled, step_counter
from models import BatchStepper, Stepper, StubbornStepper

from ipcserve import RequestCancelledError, ResultDeadlineError

def test_a_cancelled_running_request_stops_within_one_step() -> None:
    counter = step_counter()
    gone = threading.Event()
    with Stepper(counter, step=STEP) as ml, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pid = ml.pids[0]
        fut = pool.submit(ml.call, ("long",), {"steps": 100}, cancel_if=gone.is_set)
        wait_until(lambda: counter.value >= 5, what="5 steps")
        gone.set()
        with pytest.raises(RequestCancelledError):
            fut.result(5)
        at_cancel = counter.value
        assert settled(counter) - at_cancel <= 2  # the step in progress, at most one more
        t0 = time.monotonic()
        assert ml.call(("next",), {"steps": 1}).value == {"tag": "next", "steps": 1}
        assert time.monotonic() - t0 < 0.5  # the next request starts at once
        status = ml.status
        assert ml.pids == [pid] and status["crashes"] == 0  # never restarted
        assert status["cancelled"]["running_disconnect"] == 1


def test_queued_abandoned_requests_are_never_computed() -> None:
    counter = step_counter()
    gone = {tag: threading.Event() for tag in ("a", "b", "c")}
    with Stepper(counter, step=STEP) as ml, concurrent.futures.ThreadPoolExecutor(3) as pool:
        def submit(tag: str) -> Any:
            return pool.submit(ml.call, (tag,), {"steps": 50}, cancel_if=gone[tag].is_set)

        running = submit("a")
        wait_until(lambda: counter.value >= 3, what="'a' to run")
        queued = {tag: submit(tag) for tag in ("b", "c")}
        wait_until(lambda: ml.inflight == 3, what="3 calls in flight")
        for tag in queued:  # the two waiting behind 'a' leave first ...
            gone[tag].set()
        for fut in queued.values():
            with pytest.raises(RequestCancelledError):
                fut.result(5)
        at_cancel = counter.value
        gone["a"].set()  # ... then 'a'
        with pytest.raises(RequestCancelledError):
            running.result(5)
        t0 = time.monotonic()
        computed = ml.call(("computed",), {}).value
        assert time.monotonic() - t0 < 0.5
        assert computed == ["a"]  # 'b' and 'c' were never computed
        # 'a' stopped within a step or two of leaving, far from its 50 (how many it had made
        # by then depends on the machine's load: 15 were seen on a loaded 3.12 run).
        assert settled(counter) - at_cancel <= 3
        cancelled = ml.status["cancelled"]
        assert cancelled["queued_disconnect"] == 2 and cancelled["running_disconnect"] == 1


def test_the_deadline_cancels_the_work_too() -> None:
    counter = step_counter()
    with Stepper(counter, step=STEP) as ml:
        t0 = time.monotonic()
        with pytest.raises(ResultDeadlineError, match="cancelled"):
            ml("long", steps=100, timeout=0.2)
        at_deadline = counter.value
        assert settled(counter) - at_deadline <= 2
        assert time.monotonic() - t0 < 2
        assert ml("next", steps=1) == {"tag": "next", "steps": 1}
        assert ml.status["cancelled"]["running_deadline"] == 1


def test_a_model_that_opts_out_runs_to_completion() -> None:
    counter = step_counter()
    gone = threading.Event()
    with StubbornStepper(counter, step=STEP) as ml, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(ml.call, ("long",), {"steps": 20}, cancel_if=gone.is_set)
        wait_until(lambda: counter.value >= 3, what="3 steps")
        gone.set()
        with pytest.raises(RequestCancelledError):
            fut.result(5)
        assert ml("next", steps=0) == {"tag": "next", "steps": 0}  # after the whole call
        assert counter.value == 20


def test_a_model_can_check_cancelled_itself() -> None:
    counter = step_counter()
    gone = threading.Event()
    with StubbornStepper(counter, step=STEP, checks=True) as ml, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(ml.call, ("long",), {"steps": 100}, cancel_if=gone.is_set)
        wait_until(lambda: counter.value >= 3, what="3 steps")
        gone.set()
        with pytest.raises(RequestCancelledError):
            fut.result(5)
        assert settled(counter) < 20


def test_a_batch_with_live_members_is_never_interrupted() -> None:
    counter = step_counter()
    entered, release = spawn_events()
    gone = threading.Event()
    # The batch wait makes the ML process wait for both admitted calls' requests before the
    # batch starts (admitted is not yet sent: without it a loaded CI run once batched 'leaves'
    # alone, and 'stays' ran after it).
    with BatchStepper(counter, entered, release, max_batch_size=8, max_batch_wait=2.0) as ml, \
            concurrent.futures.ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(ml, "block")
        assert entered.wait(10)
        leaving = pool.submit(ml.call, ({"tag": "leaves", "steps": 15},), {}, cancel_if=gone.is_set)
        staying = pool.submit(ml, {"tag": "stays", "steps": 15})
        wait_until(lambda: ml.inflight == 3, what="3 calls in flight")
        release.set()
        assert blocker.result(10) == "block"
        wait_until(lambda: counter.value >= 3, what="the batch to run")
        gone.set()
        with pytest.raises(RequestCancelledError):
            leaving.result(5)
        assert staying.result(10) == {"tag": "stays", "batch": 2}
        assert counter.value == 15  # the whole batch ran
        assert ml.status["crashes"] == 0


@pytest.mark.timeout(60)
def test_a_client_that_disconnects_over_http_stops_the_work(tmp_path: Any) -> None:
    import json
    import socket

    import requests
    from server import Server

    steps_file = tmp_path / "steps"
    steps_file.write_text("")
    server = Server("--model", "models:HttpStepper",
                    env={"IPCSERVE_TEST_STEPS": str(steps_file), "IPCSERVE_TEST_STEP": "0.1"})
    try:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps({"tag": "abandoned", "steps": 100}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: len(steps_file.read_text()) >= 3, what="3 steps")
        at_close = len(steps_file.read_text())
        wait_until(lambda: _status(server)["cancelled"]["running_disconnect"] == 1,
                   what="the cancellation")
        assert len(steps_file.read_text()) - at_close <= 2
        t0 = time.monotonic()
        r = requests.post(f"{server.url}/predict", json={"tag": "next", "steps": 1}, timeout=10)
        assert r.status_code == 200 and time.monotonic() - t0 < 0.5
        metrics = requests.get(f"{server.url}/metrics", timeout=5).text
        assert ('ipcserve_cancelled_total{model="httpstepper",reason="disconnect",stage="running"} 1.0'
                in metrics)
        assert _status(server)["crashes"] == 0
    finally:
        assert server.stop() == 0, server.output


def _status(server: Any) -> Any:
    import requests

    return requests.get(f"{server.url}/v1/models/httpstepper", timeout=5).json()["status"]


def test_a_request_sent_while_a_cancelled_call_runs_on_is_answered() -> None:
    counter = step_counter()
    with StubbornStepper(counter, step=STEP) as ml:
        with pytest.raises(ResultDeadlineError):
            ml("long", steps=20, timeout=0.1)
        # Same thread, same channel: the cancel watch reads this request while "long" runs
        # on (the model opted out of interruption) and must hand it back to the loop.
        assert ml("next", steps=1, timeout=10) == {"tag": "next", "steps": 1}
        assert counter.value == 21


def test_cancellation_still_works_after_a_watched_channel_was_closed() -> None:
    """The cancel watch keeps the channels of earlier calls registered; one that its caller
    closed since (a thread that ended, a channel moved to an idle ML process) must not kill
    the watch: it did, with "handle is closed", and no call was interrupted after that."""
    counter = step_counter()
    with Stepper(counter, step=STEP) as ml:
        ended = threading.Thread(target=lambda: ml.call(("watched",), {"steps": 5}))
        ended.start()
        ended.join(10)
        del ended
        import gc

        gc.collect()  # the thread's channel is closed now; the ML process sees EOF
        gone = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # A long call: the watch looks at it, finds the closed channel, unregisters it.
            assert ml.call(("next",), {"steps": 5}).value["steps"] == 5
            fut = pool.submit(ml.call, ("long",), {"steps": 100}, cancel_if=gone.is_set)
            wait_until(lambda: counter.value >= 15, what="the long call stepping")
            gone.set()
            with pytest.raises(RequestCancelledError):
                fut.result(5)
            wait_until(lambda: ml.status["cancelled"]["running_disconnect"] == 1,
                       what="the running call interrupted")
        assert settled(counter) < 40
