"""MLProcess with real processes: answers, model errors, pickling errors, overload, batching,
shutdown, start methods.

Deadlines are in test_deadlines.py; crashes, hangs, the watchdog and the circuit breaker in
test_crash.py; the pinned public API in test_public_api.py.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading

import pytest
from conftest import spawn_events, wait_until
from models import Batcher, BatchTripler, Blocker, Doubler, FailsToLoad, make_tripler

from ipcserve import (
    InputError,
    MLProcess,
    ModelError,
    OverloadedError,
    WorkerUnavailableError,
)
from ipcserve.engine.protocol import Shutdown


def test_call_returns_the_models_answer_and_per_call_timeout() -> None:
    with Doubler(timeout=5.0) as ml:
        assert ml(21) == 42
        assert ml(21, timeout=1.0) == 42
        assert ml(a=3, b=4) == {"a": 6, "b": 8}
        assert ml.ready
        assert ml.status["workers"][0]["state"] == "ready"


def test_calling_the_object_never_runs_predict_in_the_caller() -> None:
    with Doubler() as ml:
        assert ml("pid") != os.getpid()
        assert ml("pid") == ml.pids[0]


def test_many_threads_each_get_their_own_answer() -> None:
    with Doubler(max_inflight=64) as ml:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(ml, range(400)))
    assert results == [2 * i for i in range(400)]


def test_call_before_start_says_what_to_do() -> None:
    ml = Doubler()
    with pytest.raises(WorkerUnavailableError, match="start()"):
        ml(1)


def test_model_exception_comes_back_with_type_message_and_remote_traceback() -> None:
    with Doubler() as ml:
        pid = ml.pids[0]
        with pytest.raises(ModelError) as info:
            ml("raise")
        err = info.value
        assert err.remote_type == "ValueError"
        assert "does not like 'raise'" in str(err)
        assert "Traceback" in err.remote_traceback and "in predict" in err.remote_traceback
        assert "in predict" in str(err.__cause__)
        assert err.http_status == 500
        assert ml(1) == 2 and ml.pids == [pid]  # the process lived on


def test_model_can_reject_input_with_an_input_error() -> None:
    with Doubler() as ml:
        with pytest.raises(InputError, match="must not be 'input-error'") as info:
            ml("input-error")
        assert info.value.http_status == 400
        assert ml(2) == 4


def test_unpicklable_input_is_an_input_error_and_the_process_lives() -> None:
    with Doubler() as ml:
        pid = ml.pids[0]
        with pytest.raises(InputError, match="not picklable"):
            ml(threading.Lock())
        with pytest.raises(InputError, match="not picklable"):
            ml(lambda: 1)
        assert ml(5) == 10 and ml.pids == [pid]


def test_unpicklable_result_is_a_model_error_and_the_process_lives() -> None:
    with Doubler() as ml:
        pid = ml.pids[0]
        with pytest.raises(ModelError, match="could not be sent back"):
            ml("unpicklable")
        assert ml(5) == 10 and ml.pids == [pid]


def test_a_forged_shutdown_is_just_data() -> None:
    with Doubler() as ml:
        with pytest.raises(ModelError):
            ml(Shutdown(b"guess"))  # travels inside a Request: the model gets it as input
        ml._runtime().queue.put(Shutdown(b"wrong token"))  # even on the queue: ignored
        assert ml(1) == 2
        assert ml.status["workers"][0]["generation"] == 0


def test_load_failure_raises_from_start_without_a_restart_loop() -> None:
    ml = FailsToLoad()
    with pytest.raises(ModelError, match="failed to load: RuntimeError: weights file") as info:
        ml.start()
    assert "Traceback" in info.value.remote_traceback
    assert not ml.started
    assert multiprocessing.active_children() == []


def test_overload_is_refused_at_once() -> None:
    entered, release = spawn_events()
    with Blocker(entered, release, max_inflight=2) as ml:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(ml, "block")
            assert entered.wait(5)
            second = pool.submit(ml, "queued")
            wait_until(lambda: ml.status["inflight"] == 2, what="two calls in flight")
            with pytest.raises(OverloadedError) as info:
                ml("third")
            assert info.value.http_status == 503 and info.value.retry_after
            release.set()
            assert first.result(5) == "block" and second.result(5) == "queued"
        assert ml("fourth") == "fourth"


def test_shutdown_drains_in_flight_and_refuses_new_calls() -> None:
    entered, release = spawn_events()
    ml = Blocker(entered, release).start()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(ml, "block")
        assert entered.wait(5)
        stopper = pool.submit(ml.shutdown, 10.0)
        wait_until(lambda: ml.status.get("draining", True), what="draining")
        with pytest.raises(WorkerUnavailableError):
            ml("new")
        release.set()
        assert in_flight.result(10) == "block"
        stopper.result(15)
    assert not ml.started
    assert multiprocessing.active_children() == []
    ml.shutdown()  # twice is fine


def test_shutdown_kills_a_process_that_will_not_stop() -> None:
    entered, release = spawn_events()
    ml = Blocker(entered, release).start()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(ml, "hang", timeout=30)
        assert entered.wait(5)
        ml.shutdown(grace=0.2)
        with pytest.raises(WorkerUnavailableError):
            stuck.result(5)
    assert multiprocessing.active_children() == []


def test_from_factory_serves_a_callable_and_a_batching_model() -> None:
    with MLProcess.from_factory(make_tripler) as ml:
        assert ml.name == "make_tripler"
        assert ml(3) == 9
    with MLProcess.from_factory(BatchTripler, name="bt", max_batch_size=4) as ml:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ml, range(32))) == [3 * i for i in range(32)]


def test_batches_form_under_load_keep_order_and_isolate_poison() -> None:
    entered, release = spawn_events()
    with Batcher(entered, release, max_batch_size=4) as ml:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            first = pool.submit(ml, "block")
            assert entered.wait(5)
            # Six more arrive while the first batch computes: they form batches of <= 4.
            rest = [pool.submit(ml, i) for i in (1, 2, "poison", 4, 5, 6)]
            wait_until(lambda: ml.status["inflight"] == 7, what="all calls in flight")
            release.set()
            assert first.result(5) == "block"
            outcomes = []
            for fut in rest:
                try:
                    outcomes.append(fut.result(5))
                except ModelError as exc:
                    outcomes.append(exc.remote_type)
        assert outcomes == [10, 20, "ValueError", 40, 50, 60]
        batches = ml("batches")
        assert max(len(b) for b in batches) <= 4
        assert any(len(b) > 1 for b in batches), batches


def test_a_batch_wait_waits_only_for_requests_on_their_way() -> None:
    """max_batch_wait holds a batch open only while callers have admitted requests the ML
    process has not read: a lone request never pays the wait (it would be 3 s here)."""
    with MLProcess.from_factory(BatchTripler, name="bw", max_batch_size=8, max_batch_wait=3.0) as ml:
        for i in range(3):
            alone = ml.call((i,), {})
            assert alone.value == 3 * i and alone.batch_size == 1
            assert alone.queue_wait < 1.5, alone
        with ml.admit() as on_its_way, concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(ml.call, (1,), {})
            # Both admitted before either is sent: otherwise "second" may be read while
            # "first" is not yet known to be coming, and rightly runs alone.
            wait_until(lambda: ml.inflight == 2, what="both calls admitted")
            second = on_its_way.call((2,), {})
            # Whichever the ML process read first waited for the other, known to be coming.
            assert (first.result(10).batch_size, second.batch_size) == (2, 2)
            assert (first.result().value, second.value) == (3, 6)


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_every_start_method_serves(method: str) -> None:
    with Doubler(start_method=method) as ml:
        assert ml(4) == 8
        assert ml("pid") != os.getpid()


def test_in_flight_counts_of_dead_callers_are_forgotten() -> None:
    """A web process killed with calls in flight (a gunicorn worker) must not leave its
    count behind: batches would wait for answers nobody will ask for."""
    from ipcserve.engine.statusblock import StatusBlock

    status = StatusBlock(multiprocessing.get_context("spawn"), 1)
    dead = multiprocessing.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join(10)
    lock = threading.Lock()  # the request queue's write lock, in MLProcess
    mine = status.claim_caller(os.getpid(), lock)
    field = status.claim_caller(dead.pid, lock)  # as if it had claimed while alive
    assert mine is not None and field is not None and mine != field
    status.set_caller_inflight(mine, 2)
    status.set_caller_inflight(field, 5)
    assert status.callers_inflight() == 7
    status.sweep_callers(lock)  # the supervisor does this on every tick
    assert status.callers_inflight() == 2
    assert status.claim_caller(os.getpid(), lock) == mine  # one field per process
