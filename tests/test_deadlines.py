"""Deadlines with real processes: a request's deadline passing in the queue (skipped, never
computed) or after the ML process took it (504), made deterministic by tiny timeouts against
a model blocked on an Event, never by slow work.

A hung ``predict`` (deadline, then the watchdog) is in test_crash.py; the HTTP 504 mapping is
in test_http.py.
"""

from __future__ import annotations

import concurrent.futures

import pytest
from conftest import spawn_events
from models import Batcher, Blocker, Doubler

from ipcserve import DeadlineError, InputError, QueueDeadlineError, ResultDeadlineError

TINY = 1e-3  # seconds: passes long before a blocked ML process could look at the request
# The admission estimate is off in these tests: with a call ahead and a deadline of a
# millisecond, the gate may refuse the call (503) before it is queued, which is right for a
# server but not the phase these tests are about.
NO_GATE = dict(estimate_factor=0)


def test_deadline_passed_in_queue_is_skipped_without_computing() -> None:
    entered, release = spawn_events()
    with Blocker(entered, release, **NO_GATE) as ml:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            blocked = pool.submit(ml, "block")
            assert entered.wait(5)
            # A new thread's channel waits in the queue: the blocked process cannot take it.
            late = pool.submit(ml, "late", timeout=TINY)
            with pytest.raises(QueueDeadlineError) as info:
                late.result(5)
            assert info.value.http_status == 504 and isinstance(info.value, TimeoutError)
            release.set()
            assert blocked.result(5) == "block"
        assert "late" not in ml("computed")


def test_a_batch_never_includes_a_request_whose_deadline_passed() -> None:
    entered, release = spawn_events()
    with Batcher(entered, release, max_batch_size=8, **NO_GATE) as ml:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(ml, "block")
            assert entered.wait(5)
            late = pool.submit(ml, 7, timeout=TINY)
            on_time = pool.submit(ml, 8, timeout=10)
            with pytest.raises(QueueDeadlineError):
                late.result(5)
            release.set()
            assert first.result(5) == "block" and on_time.result(5) == 80
        batches = ml("batches")
        assert all(7 not in b for b in batches), batches


@pytest.mark.parametrize("where", ["per-call", "config"])
def test_deadline_passed_after_the_ml_process_took_the_channel(where: str) -> None:
    entered, release = spawn_events()
    default = TINY if where == "config" else 30.0
    with Blocker(entered, release, timeout=default, **NO_GATE) as ml:
        # The ML process takes this thread's channel now, while it is idle ...
        assert ml("attach", timeout=5) == "attach"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            blocked = pool.submit(ml, "block", timeout=20)
            assert entered.wait(5)
            # ... but a request on it that runs out of time while the process is busy was
            # never read: the error names the true phase, the queue (issue: phase truth).
            with pytest.raises(QueueDeadlineError) as info:
                if where == "config":
                    ml("late")
                else:
                    ml("late", timeout=TINY)
            assert info.value.http_status == 504 and isinstance(info.value, DeadlineError)
            assert ml.status["inflight"] == 1  # the late call is no longer counted
            release.set()
            assert blocked.result(5) == "block"
        # The channel that timed out stays usable: the next call on this thread is answered,
        # and the late request, cancelled before it was read, was never computed.
        assert ml("computed", timeout=5) == ["attach", "block"]
        assert ml.status["workers"][0]["restarts"] == 0


def test_a_timeout_must_be_positive() -> None:
    with Doubler() as ml:
        for bad in (0, -1.0):
            with pytest.raises(InputError, match="timeout must be > 0"):
                ml(1, timeout=bad)
        assert ml.status["inflight"] == 0  # refused before it was admitted
        assert ml(1, timeout=5) == 2
