"""Crashes, hangs, the watchdog, restarts, the circuit breaker and orphan-freedom, with real
processes and signals.

The HTTP side of the same events (503 + Retry-After, 504) is in test_http.py.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import spawn_events, wait_until
from models import Blocker, Doubler, GatedDoubler

from ipcserve import ResultDeadlineError, WorkerCrashedError, WorkerUnavailableError


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how, exitcode", [("sigkill", -9), ("exit", 3)])
def test_crash_mid_request_fails_fast_then_restarts(how: str, exitcode: int) -> None:
    entered, release = spawn_events()
    with Blocker(entered, release, restart_backoff=0.05) as ml:
        old_pid = ml.pids[0]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            if how == "sigkill":
                fut = pool.submit(ml, "block", timeout=20)
                assert entered.wait(5)
                t0 = time.monotonic()
                os.kill(old_pid, signal.SIGKILL)
            else:
                t0 = time.monotonic()
                fut = pool.submit(ml, "exit", timeout=20)
            with pytest.raises(WorkerCrashedError) as info:
                fut.result(5)
            elapsed = time.monotonic() - t0
        assert elapsed < 1.0, f"in-flight request took {elapsed:.2f}s to fail"
        assert info.value.http_status == 502 and info.value.retry_after
        wait_until(lambda: ml.ready, what="the restart")
        assert ml("next") == "next"
        assert ml.pids[0] != old_pid
        status = ml.status
        assert status["crashes"] == 1
        assert status["workers"][0]["restarts"] == 1
        assert status["workers"][0]["last_exitcode"] == exitcode


def test_segfault_is_reported_and_recovered() -> None:
    with Doubler(restart_backoff=0.05) as ml:
        with pytest.raises(WorkerCrashedError):
            ml("segfault")
        wait_until(lambda: ml.ready, what="the restart")
        assert ml(2) == 4
        assert ml.status["workers"][0]["last_exitcode"] == -signal.SIGSEGV


def test_every_in_flight_request_gets_exactly_one_answer_on_crash() -> None:
    entered, release = spawn_events()
    with Blocker(entered, release, restart_backoff=0.05) as ml:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            blocked = pool.submit(ml, "block", timeout=20)
            assert entered.wait(5)
            others = [pool.submit(ml, i, timeout=20) for i in range(7)]
            wait_until(lambda: ml.status["inflight"] == 8, what="eight calls in flight")
            os.kill(ml.pids[0], signal.SIGKILL)
            outcomes = []
            for fut in [blocked, *others]:
                exc = fut.exception(10)
                outcomes.append(type(exc).__name__ if exc else fut.result())
        # Each got one answer: the blocked one crashed; the others either crashed with
        # the process or, if their channel was still queued, were served by the new one.
        assert len(outcomes) == 8
        assert outcomes[0] == "WorkerCrashedError"
        assert all(o == "WorkerCrashedError" or o == i for i, o in enumerate(outcomes[1:], 0))
        assert ml.status["inflight"] == 0


def test_requests_queued_during_a_restart_are_served_by_the_new_process() -> None:
    entered, release = spawn_events()
    with Blocker(entered, release, restart_backoff=0.5) as ml:
        old_pid = ml.pids[0]
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: ml.status["workers"][0]["state"] == "restarting", what="the crash")
        # No process is running now: these wait in the queue for the next one.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: ml(i, timeout=10), range(4)))
        assert results == [0, 1, 2, 3]
        assert ml.pids[0] != old_pid


def test_repeated_crashes_open_the_circuit_then_it_closes() -> None:
    # The load gate holds the restart after the second crash in load(), so the circuit is
    # open, and the process not ready, for exactly as long as the test needs.
    gate, _ = spawn_events()
    gate.set()
    with GatedDoubler(gate, restart_backoff=0.05, circuit_breaker_threshold=2) as ml:
        try:
            with pytest.raises(WorkerCrashedError):
                ml("exit")
            # The caller can see the crash before the supervisor does: wait for the restart
            # itself, or "ready" may still describe the dead process.
            wait_until(lambda: ml.status["workers"][0]["restarts"] == 1 and ml.ready,
                       what="the restart after the first crash")
            assert not ml.status["circuit_open"]
            gate.clear()
            with pytest.raises(WorkerCrashedError):
                ml("exit")
            wait_until(lambda: ml.status["circuit_open"], what="the circuit to open")
            assert not ml.ready
            with pytest.raises(WorkerUnavailableError, match="crashed 2 times in a row") as info:
                ml(1)
            assert info.value.http_status == 503 and info.value.retry_after >= 1
            assert ml.status["inflight"] == 0  # refused at once, never queued
        finally:
            gate.set()
        wait_until(lambda: ml.ready, what="the restart once the gate opens")
        assert not ml.status["circuit_open"]
        assert ml(1) == 2
        assert ml.status["crashes"] == 2


def test_hung_predict_times_out_then_the_watchdog_restarts_it() -> None:
    entered, release = spawn_events()
    with Blocker(entered, release, hang_timeout=1.0, heartbeat_interval=0.1,
                 restart_backoff=0.05) as ml:
        pid = ml.pids[0]
        # Attach this thread's channel first, so the short deadline below covers only the
        # hung predict, not the channel handshake.
        assert ml("attach", timeout=5) == "attach"
        with pytest.raises(ResultDeadlineError) as info:
            ml("hang", timeout=0.3)
        assert info.value.http_status == 504
        assert entered.wait(5), "the request never reached predict"
        wait_until(lambda: ml.status["hangs_killed"] == 1, what="the watchdog kill")
        wait_until(lambda: ml.ready, what="the restart")
        assert ml("after") == "after"
        assert ml.pids != [pid]
        assert ml.status["workers"][0]["restarts"] == 1


def test_restart_backoff_grows_with_a_crash_streak() -> None:
    with Doubler(restart_backoff=0.2, circuit_breaker_threshold=10) as ml:
        delays = []
        for n in (1, 2, 3):
            wait_until(lambda: ml.ready, what="a ready process")
            with pytest.raises(WorkerCrashedError):
                ml("exit")
            wait_until(lambda: ml.status["crashes"] == n, what=f"crash {n} to be seen")
            delays.append(ml.status["restart_backoff"])
        assert delays == [0.2, 0.4, 0.8]


_PARENT = textwrap.dedent("""
    import sys, signal
    sys.path[:0] = {paths!r}
    from models import Doubler
    # A parent started from a background job inherits SIGINT ignored: Ctrl-C must count.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if __name__ == "__main__":
        ml = Doubler(start_method={method!r}).start()
        assert ml(1) == 2
        print(ml.pids[0], flush=True)
        signal.pause() if {pause!r} else sys.stdin.read()
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_no_orphan_when_the_parent_dies(sig: int, method: str) -> None:
    here = os.path.dirname(__file__)
    code = _PARENT.format(paths=[here, os.path.dirname(here)], method=method, pause=True)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as parent:
        _kill_parent_and_check_worker(parent, sig)


def _kill_parent_and_check_worker(parent: subprocess.Popen[str], sig: int) -> None:
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        assert line.strip().isdigit(), f"parent did not report a worker pid: {line!r}"
        worker = int(line)
        assert pid_alive(worker)
        os.kill(parent.pid, sig)
        parent.wait(10)
        wait_until(lambda: not pid_alive(worker), timeout=10, what=f"worker {worker} to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
