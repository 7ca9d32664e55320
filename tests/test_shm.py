"""Large arrays through shared memory: correct, and no segment is ever left in /dev/shm."""

from __future__ import annotations

import concurrent.futures
import os
import signal

import numpy as np
import pytest
from conftest import spawn_events
from models import ArrayModel, StubbornArrayModel

from ipcserve import DeadlineError, ResultDeadlineError, WorkerCrashedError
from ipcserve.engine import shm


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


def test_a_mailbox_reuses_one_segment_and_receivers_get_their_own_copy() -> None:
    sender, receiver = shm.Mailbox(), shm.Mailbox()
    first = np.full(1 << 18, 1.0, dtype=np.float32)
    before = segments()
    data = sender.dumps({"x": first}, threshold=1024, id=1)
    assert len(segments() - before) == 1
    got1 = receiver.loads(data, expect=1)
    assert segments() - before == set()  # mapped once by the receiver, then unlinked
    data = sender.dumps({"x": first * 2}, threshold=1024, id=2)  # same memory, overwritten
    got2 = receiver.loads(data, expect=2)
    np.testing.assert_array_equal(got1["x"], first)  # the first copy is untouched
    np.testing.assert_array_equal(got2["x"], first * 2)
    assert got2["x"].flags.writeable and not np.shares_memory(got1["x"], got2["x"])
    stale = sender.dumps({"x": first * 3}, threshold=1024, id=3)
    assert receiver.loads(stale, expect=4) is None  # a reply nobody waits for is not read
    bigger = np.arange(1 << 20, dtype=np.float32)  # does not fit: a new, larger segment
    np.testing.assert_array_equal(receiver.loads(sender.dumps(bigger, 1024, 5), expect=5), bigger)
    sender.close()
    receiver.close()


def test_reused_shared_memory_never_mixes_answers() -> None:
    """Consecutive calls on one channel reuse its segments both ways: an answer already
    returned stays intact, and after a call that timed out (its late reply still coming
    through the same memory) the next call gets its own answer."""
    entered, release = spawn_events()
    # One thread, so every call goes through the same channel and the same memory.
    with StubbornArrayModel(entered, release) as ml, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        one = pool.submit(ml, X).result(10)
        three = pool.submit(ml, X, scale=3.0).result(10)
        np.testing.assert_array_equal(one, X)
        np.testing.assert_array_equal(three, X * 3)
        # The ML process takes the call (entered), its caller gives up before the answer,
        # and the model, which cannot be interrupted, answers late through the same memory.
        late = pool.submit(ml, X * 7, block=True, timeout=2.0)
        assert entered.wait(10)
        with pytest.raises(ResultDeadlineError):
            late.result(10)
        release.set()
        for scale in (5.0, 6.0):
            np.testing.assert_array_equal(pool.submit(ml, X, scale=scale).result(10), X * scale)
        np.testing.assert_array_equal(one, X)


def test_a_request_abandoned_unread_never_fails_the_next_call() -> None:
    """A call that times out before the ML process read it gives up its shared memory; when
    the ML process reads the stale request later and finds the segment gone, its error must
    go to that request (dropped as stale), not to the caller's next call (it once did:
    "could not decode the request: FileNotFoundError")."""
    entered, release = spawn_events()
    with ArrayModel(entered, release) as ml, concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(ml, np.ones(4), block=True)  # the only ML process is busy
        assert entered.wait(10)
        with pytest.raises(DeadlineError):
            ml(X * 7, timeout=0.5)  # queued behind the blocker, never read in time
        release.set()
        np.testing.assert_array_equal(blocker.result(10), np.ones(4))
        for scale in (2.0, 3.0):
            np.testing.assert_array_equal(ml(X, scale=scale), X * scale)
