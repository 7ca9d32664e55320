"""Pure batch policy: which pending requests form the next batch. No I/O.

Today every request is exactly one item; ``size_of`` exists so that a multi-item request
type changes only this module. ``max_batch_size`` counts items, not requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

__all__ = ["item_of", "size_of", "take"]


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
