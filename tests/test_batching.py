"""``ipcserve.engine.batching``: the pure batch policy. Plain objects, no processes, no I/O.

How batches form under real load (with a real ML process) is tested in test_mlprocess.py;
this file tests only the policy functions.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import pytest

from ipcserve import InputError, ModelError, QueueDeadlineError
from ipcserve.engine import batching
from ipcserve.engine.protocol import Request


@dataclass
class Pending:
    """What the worker keeps per request: only ``.request`` matters to the policy."""

    request: Request


def pending(n: int) -> list[Pending]:
    return [Pending(Request(i, 0.0, (i,), {})) for i in range(n)]


def ids(items: list[Pending]) -> list[int]:
    return [p.request.id for p in items]


# -- size policy: take() and size_of() -------------------------------------------------------
def test_take_splits_at_max_items_and_keeps_order() -> None:
    batch, rest = batching.take(pending(5), 2)
    assert ids(batch) == [0, 1] and ids(rest) == [2, 3, 4]


@pytest.mark.parametrize("n, max_items, batch_ids, rest_ids", [
    (0, 4, [], []),
    (3, 4, [0, 1, 2], []),
    (4, 4, [0, 1, 2, 3], []),
    (5, 1, [0], [1, 2, 3, 4]),
])
def test_take_boundaries(n: int, max_items: int, batch_ids: list[int], rest_ids: list[int]) -> None:
    batch, rest = batching.take(pending(n), max_items)
    assert ids(batch) == batch_ids and ids(rest) == rest_ids


def test_taking_repeatedly_serves_everything_once_in_order() -> None:
    rest = pending(10)
    batches = []
    while rest:
        batch, rest = batching.take(rest, 4)
        batches.append(ids(batch))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_take_does_not_change_its_input() -> None:
    items = pending(3)
    batching.take(items, 1)
    assert ids(items) == [0, 1, 2]


def test_a_call_is_one_item_and_a_batch_request_its_item_count() -> None:
    assert batching.size_of(Request(1, 0.0, (1,), {})) == 1
    assert batching.size_of(Request(2, 0.0, (), {"a": 1, "b": 2})) == 1
    assert batching.size_of(Request(3, 0.0, (), {}, items=[1, 2, 3])) == 3


def sized(*sizes: int) -> list[Pending]:
    """Pending requests of the given sizes (1: a call; more: a batch request)."""
    return [Pending(Request(i, 0.0, (i,), {}) if n == 1
                    else Request(i, 0.0, (), {}, list(range(n)))) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes, max_items, batch_ids", [
    ((2, 3, 1), 8, [0, 1, 2]),        # 6 items fit
    ((3, 5, 1), 8, [0, 1]),           # exactly full; the call waits for the next batch
    ((3, 6, 1), 8, [0]),              # no room for the 6: it starts the next batch
    ((1, 20, 1), 8, [0]),             # the oversized request does not join a forming batch ...
    ((20, 1, 1), 8, [0]),             # ... and goes alone when it comes first
    ((1, 1, 4), 4, [0, 1]),
])
def test_take_counts_items_of_batch_requests(sizes: tuple[int, ...], max_items: int,
                                             batch_ids: list[int]) -> None:
    batch, rest = batching.take(sized(*sizes), max_items)
    assert ids(batch) == batch_ids
    assert ids(rest) == [i for i in range(len(sizes)) if i not in batch_ids]


def test_taking_batch_requests_repeatedly_serves_everything_once_in_order() -> None:
    rest = sized(3, 1, 64, 2, 2, 1, 5)
    batches = []
    while rest:
        batch, rest = batching.take(rest, 8)
        batches.append(ids(batch))
    assert batches == [[0, 1], [2], [3, 4, 5], [6]]


def test_items_of_a_call_and_of_a_batch_request() -> None:
    assert batching.items_of(Request(1, 0.0, (5,), {})) == [5]
    assert batching.items_of(Request(2, 0.0, (), {"a": 1})) == [{"a": 1}]
    assert batching.items_of(Request(3, 0.0, (), {}, items=[{"a": 1}, 7])) == [{"a": 1}, 7]
    with pytest.raises(TypeError):
        batching.items_of(Request(4, 0.0, (1, 2), {}))


# -- one answer per request from its items' outcomes: answer() --------------------------------
def test_a_call_answers_with_its_one_outcome() -> None:
    error = InputError("bad")
    assert batching.answer(Request(1, 0.0, (1,), {}), [(10, None, 4)]) == (10, None, 4)
    assert batching.answer(Request(1, 0.0, (1,), {}), [(None, error, 1)]) == (None, error, 1)


def test_a_batch_request_answers_with_its_results_in_order_and_the_largest_call() -> None:
    request = Request(1, 0.0, (), {}, items=[1, 2, 3])
    assert batching.answer(request, [(10, None, 2), (20, None, 2), (30, None, 1)]) == (
        [10, 20, 30], None, 2)


def test_a_batch_request_fails_with_its_first_failing_item_named() -> None:
    request = Request(1, 0.0, (), {}, items=[1, 2, 3, 4])
    first = InputError("field 'x' is bad")
    second = ModelError("ValueError: later", remote_type="ValueError", remote_traceback="tb")
    value, error, size = batching.answer(
        request, [(10, None, 4), (20, None, 4), (None, first, 1), (None, second, 1)])
    assert value is None and size == 4
    assert type(error) is InputError and error.http_status == 400
    assert str(error) == "item 2: field 'x' is bad"
    assert str(first) == "field 'x' is bad"  # the item's own error is left alone


def test_a_failed_item_keeps_its_class_and_attributes() -> None:
    error = ModelError("ValueError: no", remote_type="ValueError", remote_traceback="Traceback ...")
    error.retry_after = 3.0
    renamed = batching.failed_item(7, error)
    assert type(renamed) is ModelError and renamed.message == "item 7: ValueError: no"
    assert (renamed.remote_type, renamed.remote_traceback, renamed.retry_after) == (
        "ValueError", "Traceback ...", 3.0)
    again = pickle.loads(pickle.dumps(renamed))  # it crosses the pipe
    assert again.message == "item 7: ValueError: no" and again.remote_type == "ValueError"
    assert batching.failed_item(0, QueueDeadlineError("late")).args == ("item 0: late",)


# -- what one call contributes to predict_batch: item_of() ------------------------------------
def test_item_of_one_positional_argument_is_that_argument() -> None:
    assert batching.item_of((5,), {}) == 5
    assert batching.item_of(([1, 2],), {}) == [1, 2]


def test_item_of_keyword_arguments_is_their_dict() -> None:
    kwargs = {"a": 1}
    item = batching.item_of((), kwargs)
    assert item == {"a": 1}
    assert item is not kwargs  # the model may mutate its item; the request's kwargs stay


@pytest.mark.parametrize("args, kwargs", [((1, 2), {}), ((1,), {"a": 2})])
def test_item_of_refuses_calls_a_batch_cannot_carry(args: tuple, kwargs: dict) -> None:
    with pytest.raises(TypeError, match="one positional argument or keyword arguments"):
        batching.item_of(args, kwargs)


# -- max_batch_wait policy -------------------------------------------------------------------
# batching.BatchWait: how long to hold a forming batch open, with an injected clock (never a
# sleep); its end-to-end effect stays in test_mlprocess.py.
class _FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_wait_runs_at_once() -> None:
    policy = batching.BatchWait(max_batch_size=8, max_batch_wait=0.0, clock=_FakeClock())
    assert policy.remaining(1, oldest_arrival=100.0) == 0.0


def test_a_forming_batch_waits_from_its_oldest_item() -> None:
    clock = _FakeClock()
    policy = batching.BatchWait(max_batch_size=8, max_batch_wait=0.010, clock=clock)
    assert policy.remaining(1, oldest_arrival=100.0) == pytest.approx(0.010)
    clock.now = 100.004
    assert policy.remaining(3, oldest_arrival=100.0) == pytest.approx(0.006)
    clock.now = 100.011
    assert policy.remaining(3, oldest_arrival=100.0) == 0.0  # waited long enough


def test_a_full_batch_or_nothing_never_waits() -> None:
    policy = batching.BatchWait(max_batch_size=4, max_batch_wait=1.0, clock=_FakeClock())
    assert policy.remaining(4, oldest_arrival=100.0) == 0.0
    assert policy.remaining(9, oldest_arrival=100.0) == 0.0
    assert policy.remaining(0, oldest_arrival=100.0) == 0.0


def test_nothing_on_its_way_never_waits() -> None:
    """Callers publish their admitted calls: with none beyond those read, a lone request
    runs at once however long the configured wait."""
    policy = batching.BatchWait(max_batch_size=8, max_batch_wait=1.0, clock=_FakeClock())
    assert policy.remaining(1, oldest_arrival=100.0, coming=0) == 0.0
    assert policy.remaining(3, oldest_arrival=100.0, coming=-2) == 0.0  # e.g. a sibling's
    assert policy.remaining(1, oldest_arrival=100.0, coming=1) == pytest.approx(1.0)
