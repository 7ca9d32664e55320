"""Pure batch policy: which pending requests form the next batch, and how long the ML
process keeps collecting before it runs one. No I/O; the clock is injectable.

Today every request is exactly one item; ``size_of`` exists so that a multi-item request
type changes only this module. ``max_batch_size`` counts items, not requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

__all__ = ["BatchWait", "item_of", "size_of", "take"]


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


def size_of(request: Any) -> int:
    """How many items a request contributes to a batch."""
    return 1


def take(pending: Sequence[T], max_items: int) -> tuple[list[T], list[T]]:
    """Split ``pending`` (oldest first) into the next batch and the rest, keeping order."""
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
