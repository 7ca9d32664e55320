"""Pure batch policy: which pending requests form the next batch, and how long the ML
process keeps collecting before it runs one. No I/O; the clock is injectable.

A request is one item (one call), or several: a batch request (``Request.items``) hands
each of its items to ``predict_batch`` as one call would, and gets one result per item
back. ``max_batch_size`` counts items, not requests. :func:`items_of` says what a request
hands to the model, :func:`answer` turns the outcomes of its items back into its one answer.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from .errors import IPCServeError

__all__ = ["BatchWait", "Outcome", "answer", "failed_item", "item_of", "items_of", "size_of",
           "take"]

#: What one item came to: its result, or the error that failed it, and how many items the
#: model call that answered it held (0: not computed, its request had already failed).
Outcome = tuple[Any, "IPCServeError | None", int]


class _HasRequest(Protocol):
    @property
    def request(self) -> Any: ...


T = TypeVar("T", bound=_HasRequest)


def item_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The value handed to ``predict_batch`` for one call ``(*args, **kwargs)``.

    A call with one positional argument batches that argument; a call with keyword
    arguments only batches the keyword dict.
    """
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args:
        return dict(kwargs)
    raise TypeError("a batching model takes one positional argument or keyword arguments, "
                    f"got {len(args)} positional and {len(kwargs)} keyword")


def items_of(request: Any) -> list[Any]:
    """The items ``request`` hands to ``predict_batch``: a batch request's items, or the one
    item of a call (:func:`item_of`).

    Raises:
        TypeError: a call that a batch cannot carry (see :func:`item_of`).
    """
    items: list[Any] | None = getattr(request, "items", None)
    if items is not None:
        return items
    return [item_of(request.args, request.kwargs)]


def size_of(request: Any) -> int:
    """How many items a request contributes to a batch: a batch request's item count, 1 for
    a call."""
    items = getattr(request, "items", None)
    return 1 if items is None else len(items)


def failed_item(index: int, error: IPCServeError) -> IPCServeError:
    """The answer of a batch request whose item ``index`` (from 0) failed with ``error``.

    The same class and attributes (an InputError stays a 400, a ModelError keeps its remote
    type and traceback), the message prefixed with ``"item <index>: "``.
    """
    try:
        renamed = copy.copy(error)  # through __reduce__, as the pipe would carry it
    except Exception:
        return error  # a subclass that cannot be rebuilt: its own message is still right
    renamed.args = (f"item {index}: {error.message}", *error.args[1:])
    return renamed


def answer(request: Any, outcomes: Sequence[Outcome]) -> Outcome:
    """One request's answer from the outcomes of its items, in order.

    A call answers with its one item's outcome. A batch request answers with the list of
    its items' results, or, if an item failed, with the first failing item's error
    (:func:`failed_item`); items after it need no outcome. The size is that of the largest
    model call that answered the request.
    """
    size = max((outcome[2] for outcome in outcomes), default=0)
    if getattr(request, "items", None) is None:
        value, error, _ = outcomes[0]
        return value, error, size
    for index, (_, error, _) in enumerate(outcomes):
        if error is not None:
            return None, failed_item(index, error), size
    return [outcome[0] for outcome in outcomes], None, size


def take(pending: Sequence[T], max_items: int) -> tuple[list[T], list[T]]:
    """Split ``pending`` (oldest first) into the next batch and the rest, keeping order.

    The batch holds at most ``max_items`` items: a request with more items than the room
    left starts the next batch. A request with more than ``max_items`` items on its own
    still forms a batch, alone (the worker hands it to the model in several calls).
    """
    batch: list[T] = []
    count = 0
    for index, item in enumerate(pending):
        size = size_of(item.request)
        if batch and count + size > max_items:
            return batch, list(pending[index:])
        batch.append(item)
        count += size
    return batch, []


class BatchWait:
    """How long to keep collecting once a batch has started to form.

    With ``max_batch_wait == 0`` (the default) a batch runs as soon as the ML process has
    read whatever is queued: at low load a request never waits for company. With a wait,
    the batch runs when it is full, when its oldest item has waited ``max_batch_wait``, or
    as soon as no further request is known to be on its way: callers publish how many calls
    they have admitted (``coming`` is that count minus the items already read), so a
    lone request never waits for company that is not coming.

    Args:
        max_batch_size: items that make a batch full.
        max_batch_wait: seconds the oldest item may wait for the batch to fill.
        clock: ``time.monotonic`` or a fake for tests.
    """

    def __init__(self, max_batch_size: int, max_batch_wait: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_wait = max_batch_wait
        self.clock = clock

    def remaining(self, items: int, oldest_arrival: float, coming: int = 1) -> float:
        """Seconds to keep collecting before running ``items`` items (0: run now).

        ``coming``: requests admitted by callers and not read yet (0 or less: none is on
        its way, run now)."""
        if self.max_batch_wait <= 0 or items <= 0 or items >= self.max_batch_size or coming <= 0:
            return 0.0
        return max(0.0, oldest_arrival + self.max_batch_wait - self.clock())
