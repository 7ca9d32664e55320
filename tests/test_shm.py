"""Large arrays through shared memory: correct, and no segment is ever left in /dev/shm."""

from __future__ import annotations

import concurrent.futures
import os
import signal

import numpy as np
import pytest
from conftest import spawn_events
from models import ArrayModel

from ipcserve import ResultDeadlineError, WorkerCrashedError
from ipcserve import shm


def segments() -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith("ipcserve-")}


@pytest.fixture(autouse=True)
def no_leaked_segments() -> None:
    before = segments()
    yield
    assert segments() - before == set(), "shared-memory segments leaked"


def test_dumps_loads_round_trip_without_pipe() -> None:
    big = np.arange(1 << 18, dtype=np.float32)
    data, name = shm.dumps({"a": big, "small": np.ones(3)}, threshold=1024)
    assert name is not None and name in segments() and len(data) < 2048
    out = shm.loads(data)
    assert name not in segments()  # the receiver unlinked it at once
    np.testing.assert_array_equal(out["a"], big)
    assert out["a"].flags.writeable


def test_small_messages_stay_in_the_pipe() -> None:
    data, name = shm.dumps(np.ones(10), threshold=1024)
    assert name is None


@pytest.mark.parametrize("threshold", [0, 1 << 20])
def test_large_arrays_both_ways_match(threshold: int) -> None:
    x = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)  # 8 MB
    with ArrayModel(shm_threshold=threshold) as ml:
        y = ml(x, scale=2.0)
        np.testing.assert_array_equal(y, x * 2)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda i: ml(x[i:i + 600], scale=float(i)), range(4)))
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out, x[i:i + 600] * i)


X = np.ones((1024, 1024), dtype=np.float64)  # 8 MB


def test_no_segment_left_when_the_ml_process_crashes_mid_request() -> None:
    # (Never set an Event a killed process was waiting on: multiprocessing's Condition
    # waits for the dead sleeper to acknowledge.)
    entered, release = spawn_events()
    with ArrayModel(entered, release, restart_backoff=0.05) as ml:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(ml, X, block=True)
            assert entered.wait(5)
            os.kill(ml.pids[0], signal.SIGKILL)
            with pytest.raises(WorkerCrashedError):
                fut.result(10)


def test_no_segment_left_when_a_call_times_out() -> None:
    entered, release = spawn_events()
    with ArrayModel(entered, release) as ml:
        with pytest.raises(ResultDeadlineError):
            ml(X, block=True, timeout=0.5)
        release.set()
        np.testing.assert_array_equal(ml(X), X)
