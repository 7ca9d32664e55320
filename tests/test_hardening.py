"""Engine failures found by trying ipcserve as an attacker and a bad day would: each test
failed before its fix. Real processes, real kills."""

from __future__ import annotations

import concurrent.futures
import glob
import os
import signal
import time

import pytest
from conftest import spawn_events, wait_until
from models import Blocker, Misbehaver

from ipcserve import (
    ModelError,
    QueueDeadlineError,
    WorkerCrashedError,
    WorkerUnavailableError,
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_request_never_read_on_a_reused_channel_is_a_queue_deadline() -> None:
    entered, release = spawn_events()
    with Blocker(entered, release) as ml, concurrent.futures.ThreadPoolExecutor(2) as pool:
        # Thread B's channel is attached (reused below); then thread A blocks the process.
        b = pool.submit(ml, "warm")
        assert b.result(10) == "warm"
        a = pool.submit(ml, "block", timeout=20)
        assert entered.wait(10)
        with pytest.raises(QueueDeadlineError, match="before an ML process took it"):
            pool.submit(ml, "late", timeout=0.3).result(10)
        release.set()
        assert a.result(10) == "block"
        assert "late" not in ml("computed")  # never computed: the phase is the truth


def test_requests_queued_at_a_crash_get_503_at_once_when_the_circuit_opens() -> None:
    entered, release = spawn_events()
    with Blocker(entered, release, circuit_breaker_threshold=1, restart_backoff=20.0,
                 max_restart_backoff=20.0) as ml, concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = pool.submit(ml, "block", timeout=30)
        assert entered.wait(10)
        # Three callers whose channels wait in the queue behind the blocked process.
        queued = [pool.submit(ml, f"q{i}", timeout=30) for i in range(3)]
        wait_until(lambda: ml.inflight == 4, what="4 calls in flight")
        t0 = time.monotonic()
        os.kill(ml.pids[0], signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            running.result(5)
        for fut in queued:
            with pytest.raises(WorkerUnavailableError, match="crashed 1 times in a row") as info:
                fut.result(5)
            assert info.value.retry_after and info.value.retry_after > 1
        assert time.monotonic() - t0 < 1.5


def test_requests_queued_at_a_crash_are_served_by_the_restarted_process() -> None:
    entered, release = spawn_events()
    with Blocker(entered, release, restart_backoff=0.05) as ml, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = pool.submit(ml, "block", timeout=30)
        assert entered.wait(10)
        queued = [pool.submit(ml, f"q{i}", timeout=30) for i in range(3)]
        wait_until(lambda: ml.inflight == 4, what="4 calls in flight")
        os.kill(ml.pids[0], signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            running.result(5)
        assert sorted(f.result(20) for f in queued) == ["q0", "q1", "q2"]


def test_results_and_exceptions_that_used_to_kill_the_process_fail_one_request() -> None:
    with Misbehaver() as ml:
        pid = ml("pid")
        with pytest.raises(ModelError, match="SystemExit"):
            ml("sysexit")
        with pytest.raises(ModelError, match="could not be sent back: KeyboardInterrupt"):
            ml("interrupt-pickling")
        with pytest.raises(ModelError, match="could not be read in the web process") as info:
            ml("rebuild-fails")
        assert "cannot be rebuilt" in str(info.value)
        assert ml("pid") == pid  # the same process answered every one of them
        assert ml.status["crashes"] == 0


def test_crash_errors_always_name_the_exit_cause() -> None:
    entered, release = spawn_events()
    with Blocker(entered, release, restart_backoff=0.05) as ml:
        for _ in range(3):
            wait_until(lambda: ml.ready, what="ready")
            entered.clear()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                fut = pool.submit(ml, "block", timeout=20)
                assert entered.wait(10)
                os.kill(ml.pids[0], signal.SIGKILL)
                with pytest.raises(WorkerCrashedError, match=r"killed by signal 9 \(SIGKILL\)"):
                    fut.result(5)


def test_segments_of_a_dead_ml_process_are_removed() -> None:
    with Misbehaver(restart_backoff=0.05) as ml:
        pid = ml("pid")
        with pytest.raises(WorkerCrashedError):
            ml("shm-then-exit")
        wait_until(lambda: ml.ready, what="the restart")
        assert glob.glob(f"/dev/shm/ipcserve-{pid}-*") == []


@pytest.mark.parametrize("how", ["sigkill", "shutdown"])
def test_processes_a_model_starts_die_with_its_ml_process(how: str) -> None:
    ml = Misbehaver(restart_backoff=0.05).start()
    try:
        child = ml("child")
        assert _alive(child)
        if how == "sigkill":
            os.kill(ml.pids[0], signal.SIGKILL)
            wait_until(lambda: not _alive(child), timeout=5, what="the grandchild to die")
            wait_until(lambda: ml.ready, what="the restart")
            child = ml("child")
    finally:
        ml.shutdown()
    wait_until(lambda: not _alive(child), timeout=5, what="the grandchild to die at shutdown")
