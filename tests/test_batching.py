"""``ipcserve.engine.batching``: the pure batch policy. Plain objects, no processes, no I/O.

How batches form under real load (with a real ML process) is tested in test_mlprocess.py;
this file tests only the policy functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

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


def test_every_request_is_one_item_today() -> None:
    assert batching.size_of(Request(1, 0.0, (1,), {})) == 1
    assert batching.size_of(Request(2, 0.0, (), {"a": 1, "b": 2})) == 1


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
