"""Batch requests (``MLProcess.call_batch``): several items in one request, one admission and
one round trip, with real ML processes.

A batching model gets the items with whatever else is pending, in ``predict_batch`` calls of
at most ``max_batch_size``; a model that does not batch runs ``predict`` per item. The pure
policy (``size_of``, ``take``, ``answer``) is in test_batching.py.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any

import numpy as np
import pytest
from conftest import spawn_events, wait_until
from measure import STEP, settled, step_counter
from models import (
    ArrayBatcher,
    ArrayModel,
    Batcher,
    BatchStepper,
    Blocker,
    Doubler,
    PickyBatcher,
    Stepper,
    Streamer,
    StubbornStepper,
)

from ipcserve import (
    InputError,
    ModelError,
    QueueDeadlineError,
    RequestCancelledError,
    ResultDeadlineError,
)
from ipcserve.engine import shm

TINY = 1e-3  # seconds: passes long before a blocked ML process could look at the request
def _served(ml: Any) -> int:
    return int(sum(w["served"] for w in ml.status["workers"]))


# -- a batching model ------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch_size, calls", [(64, [64]), (16, [16, 16, 16, 16]),
                                                   (24, [24, 24, 16])])
def test_a_batch_request_is_one_model_call_up_to_max_batch_size(max_batch_size: int,
                                                                calls: list[int]) -> None:
    entered, release = spawn_events()
    with Batcher(entered, release, max_batch_size=max_batch_size) as ml:
        result = ml.call_batch(list(range(64)))
        assert result.value == [10 * i for i in range(64)]  # one result per item, in order
        assert result.batch_size == max(calls)
        batches = ml("batches")
        assert [len(b) for b in batches] == calls
        assert [x for b in batches for x in b] == list(range(64))  # each item once, in order
        wait_until(lambda: _served(ml) == 64 + 1, what="64 items and 1 call served")


def test_a_batch_request_joins_the_calls_pending_with_it() -> None:
    entered, release = spawn_events()
    # The batch wait lets the ML process read every admitted call before the batch starts
    # (admitted is not yet sent); it never waits for calls that are not coming.
    with Batcher(entered, release, max_batch_size=8, max_batch_wait=2.0) as ml, \
            concurrent.futures.ThreadPoolExecutor(5) as pool:
        first = pool.submit(ml, "block")
        assert entered.wait(10)
        singles = [pool.submit(ml.call, (i,), {}) for i in (1, 2)]
        batch = pool.submit(ml.call_batch, [3, 4, 5])
        last = pool.submit(ml.call, (6,), {})
        wait_until(lambda: ml.inflight == 5, what="5 calls in flight")
        release.set()
        assert first.result(10) == "block"
        answers = [f.result(10) for f in (*singles, last)]
        assert [a.value for a in answers] == [10, 20, 60]
        joined = batch.result(10)
        assert joined.value == [30, 40, 50]
        assert {a.batch_size for a in answers} == {6} and joined.batch_size == 6
        batches = ml("batches")
        assert batches[0] == ["block"]
        assert sorted(batches[1]) == [1, 2, 3, 4, 5, 6], batches  # one predict_batch call
        i = batches[1].index(3)
        assert batches[1][i:i + 3] == [3, 4, 5]  # the request's items stay together, in order


def test_a_poison_item_fails_only_its_request_named_and_with_its_class() -> None:
    entered, release = spawn_events()
    with Batcher(entered, release, max_batch_size=8, max_batch_wait=2.0) as ml, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        pid = ml.pids[0]
        first = pool.submit(ml, "block")
        assert entered.wait(10)
        single = pool.submit(ml, 1)
        poisoned = pool.submit(ml.call_batch, [2, "poison", 4, 5])
        wait_until(lambda: ml.inflight == 3, what="3 calls in flight")
        release.set()
        assert first.result(10) == "block"
        assert single.result(10) == 10  # its batchmate's poison did not fail it
        with pytest.raises(ModelError) as info:
            poisoned.result(10)
        err = info.value
        assert str(err) == "item 1: ValueError: poison in batch"
        assert err.remote_type == "ValueError" and err.http_status == 500
        assert "poison in batch" in err.remote_traceback and "poison in batch" in str(err.__cause__)
        batches = ml("batches")
        # The joined call failed, then each item alone up to the poison: the request had
        # failed, so its items after the poison were never computed.
        assert [4] not in batches and [5] not in batches, batches
        assert ml.call_batch([7, 8]).value == [70, 80] and ml.pids == [pid]  # it lives on


def test_an_input_error_of_an_item_stays_an_input_error() -> None:
    entered, release = spawn_events()
    with PickyBatcher(entered, release, max_batch_size=4) as ml:
        with pytest.raises(InputError) as info:
            ml.call_batch([1, 2, 3, 4, 5, -6, 7])  # calls of 4, then 3 (the -6 among them)
        assert str(info.value) == "item 5: inputs must be >= 0" and info.value.http_status == 400
        assert ml("batches") == [[1, 2, 3, 4], [5, -6, 7], [5], [-6]]
        with pytest.raises(InputError, match="^item 0: "):
            ml.call_batch([-1, 2, 3, 4, 5])
        # Once an item failed, the request's other items are never computed: not alone, and
        # not in its next model call ([5]).
        assert ml("batches")[4:] == [[-1, 2, 3, 4], [-1]]
        assert ml.call_batch([1]).value == [10]


# -- a model that does not batch -------------------------------------------------------------
def test_a_model_that_does_not_batch_answers_item_by_item_in_one_round_trip() -> None:
    entered, release = spawn_events()
    with Blocker(entered, release) as ml, concurrent.futures.ThreadPoolExecutor(1) as pool:
        with ml.admit() as admission:
            running = pool.submit(admission.call_batch, ["a", "block", "c"])
            assert entered.wait(10)
            assert ml.inflight == 1  # one admission for the three items
            release.set()
            result = running.result(10)
        assert result.value == ["a", "block", "c"] and result.batch_size == 1
        assert ml("computed") == ["a", "block", "c"]  # in order
        wait_until(lambda: _served(ml) == 3 + 1, what="3 items and 1 call served")


def test_a_failing_item_of_a_model_that_does_not_batch() -> None:
    with Doubler() as ml:
        pid = ml.pids[0]
        with pytest.raises(InputError, match=r"^item 1: field 'x' must not be 'input-error'$"):
            ml.call_batch([1, "input-error", 3])
        with pytest.raises(ModelError, match=r"^item 2: ValueError: the model does not like") \
                as info:
            ml.call_batch([1, 2, "raise", 4])
        err = info.value
        assert err.remote_type == "ValueError" and "in predict" in err.remote_traceback
        with pytest.raises(ModelError, match="the model's result could not be sent back"):
            ml.call_batch(["unpicklable", 1])  # the reply as a whole cannot be pickled
        # The first request stopped at its failing item: 3 was never computed (2 calls), the
        # second at 'raise' (3 calls); then 'unpicklable' and 1 (2 calls), then "count".
        assert ml("count") == 2 + 3 + 2 + 1
        assert ml.call_batch([5, "x"]).value == [10, "xx"]
        assert ml.pids == [pid]


def test_a_streaming_model_cannot_answer_a_batch_request() -> None:
    counter = step_counter()
    with Streamer(counter) as ml:
        assert ml.call_batch([-1, -1]).value == [{"unary": ""}, {"unary": ""}]  # not streams
        with pytest.raises(ModelError, match="^item 1: a streaming model cannot answer a batch"):
            ml.call_batch([-1, 3, -1])
        assert counter.value == 0  # its generator was closed before it made an item
        assert [item["i"] for item in ml(2)] == [0, 1] and counter.value == 2  # still streams


# -- what is refused before anything is sent -------------------------------------------------
@pytest.mark.parametrize("items", [[], (1, 2), "ab", None, {"a": 1}])
def test_items_must_be_a_non_empty_list(items: Any) -> None:
    entered, release = spawn_events()
    with Batcher(entered, release) as ml:
        with pytest.raises(InputError, match="a batch request needs a non-empty list of items"):
            ml.call_batch(items)
        assert ml.inflight == 0
        assert ml("batches") == []  # nothing reached the model
        wait_until(lambda: _served(ml) == 1, what='the "batches" call served')
        assert _served(ml) == 1  # and nothing else was


# -- deadlines and cancellation ---------------------------------------------------------------
def test_a_batch_request_whose_deadline_passes_in_the_queue_is_never_computed() -> None:
    entered, release = spawn_events()
    # estimate_factor=0: the admission gate could refuse a millisecond deadline before queueing.
    with Batcher(entered, release, max_batch_size=8, estimate_factor=0) as ml, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(ml, "block")
        assert entered.wait(10)
        with pytest.raises(QueueDeadlineError):
            ml.call_batch([1, 2, 3], timeout=TINY)
        release.set()
        assert blocked.result(10) == "block"
        wait_until(lambda: ml.status["cancelled"]["queued_deadline"] == 3,
                   what="the 3 items skipped")  # counted as its items
        assert ml("batches") == [["block"]]


@pytest.mark.parametrize("model", ["batching", "not batching"])
def test_a_batch_request_past_its_deadline_while_running_is_interrupted(model: str) -> None:
    entered, release = spawn_events()
    cls = Batcher if model == "batching" else Blocker
    with cls(entered, release, max_batch_size=2) as ml:
        pid = ml.pids[0]
        assert ml("attach") == ("attach" * 10 if model == "batching" else "attach")
        # The request is read at once (its channel is attached and the process idle), then
        # blocks inside the model until its deadline passes.
        with pytest.raises(ResultDeadlineError, match="cancelled"):
            ml.call_batch([1, "block", 3, 4, 5], timeout=1.0)
        assert entered.is_set()
        # Never released: the model call was interrupted, the process serves on.
        assert ml.call_batch([6]).value == [60 if model == "batching" else 6]
        assert ml.pids == [pid]
        assert ml.status["cancelled"]["running_deadline"] == 5
        if model == "batching":  # calls of 2: [1, 'block'] was interrupted, [3, 4] never ran
            assert ml("batches") == [["attach"], [1, "block"], [6]]
        else:
            assert ml("computed") == ["attach", 1, "block", 6]


def test_a_cancelled_batch_request_stops_within_one_step() -> None:
    counter = step_counter()
    gone = threading.Event()
    with Stepper(counter, step=STEP) as ml, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pid = ml.pids[0]
        tags = [f"t{i}" for i in range(100)]  # one step each: 100 steps in one request
        running = pool.submit(ml.call_batch, tags, cancel_if=gone.is_set)
        wait_until(lambda: counter.value >= 5, what="5 items")
        gone.set()
        with pytest.raises(RequestCancelledError):
            running.result(5)
        at_cancel = counter.value
        assert settled(counter) - at_cancel <= 2
        computed = ml.call(("computed",), {}).value
        assert computed == tags[:len(computed)] and len(computed) < 20
        assert ml.pids == [pid]
        assert ml.status["cancelled"]["running_disconnect"] == 100  # counted as its items


def test_a_model_that_opts_out_of_interruption_still_stops_between_items() -> None:
    counter = step_counter()
    gone = threading.Event()
    with StubbornStepper(counter, step=STEP) as ml, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(ml.call_batch, [f"t{i}" for i in range(100)], cancel_if=gone.is_set)
        wait_until(lambda: counter.value >= 3, what="3 items")
        gone.set()
        with pytest.raises(RequestCancelledError):
            running.result(5)
        assert settled(counter) < 20  # each predict ran to its end; no next one started


def test_a_cancelled_oversized_batch_request_stops_between_model_calls() -> None:
    counter = step_counter()
    entered, release = spawn_events()
    gone = threading.Event()
    with BatchStepper(counter, entered, release, max_batch_size=2) as ml, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        items = [{"tag": f"t{i}", "steps": 3} for i in range(40)]  # 20 calls of 3 steps
        running = pool.submit(ml.call_batch, items, cancel_if=gone.is_set)
        wait_until(lambda: counter.value >= 4, what="a second model call")
        gone.set()
        with pytest.raises(RequestCancelledError):
            running.result(5)
        assert settled(counter) < 20
        assert ml.call_batch([{"tag": "next", "steps": 1}]).value == [{"tag": "next", "batch": 1}]


def test_a_long_batch_request_of_quick_items_is_progress_not_a_hang() -> None:
    """The watchdog kills a process without progress for hang_timeout: every item answered
    is progress, however long the whole request takes (here 3x hang_timeout)."""
    counter = step_counter()
    with Stepper(counter, step=0.05, hang_timeout=0.5, heartbeat_interval=0.1) as ml:
        pid = ml.pids[0]
        tags = [f"t{i}" for i in range(30)]
        assert ml.call_batch(tags, timeout=20).value == [{"tag": t, "steps": 1} for t in tags]
        assert ml.pids == [pid] and ml.status["hangs_killed"] == 0


# -- large arrays ------------------------------------------------------------------------------
def _segments() -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith("ipcserve-")}


@pytest.mark.parametrize("cls", [ArrayModel, ArrayBatcher])
def test_large_arrays_travel_through_shared_memory_both_ways(cls: type) -> None:
    before = _segments()
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((512, 1024)).astype(np.float32) for _ in range(3)]  # 2 MB each
    xs.append(np.arange(10.0))  # a small one rides in the pipe
    with cls(shm_threshold=1 << 20) as ml:
        result = ml.call_batch(xs)
        expected = [x * (1 if cls is ArrayModel else 2) for x in xs]
        assert len(result.value) == 4
        for out, want in zip(result.value, expected):
            np.testing.assert_array_equal(out, want)
        # The request went through this thread's shared-memory mailbox, not the pipe.
        channel = ml._runtime().caller._local.channel
        assert channel.mailbox._out is not None
        again = ml.call_batch(xs[:2])  # the mailbox is reused for the next request
        np.testing.assert_array_equal(again.value[1], expected[1])
    assert _segments() - before == set(), "shared-memory segments leaked"
