"""Every message that crosses the shared queue or a channel's pipe.

The shared ``SimpleQueue`` carries only :class:`Attach` (a channel's ML-side pipe end) and
:class:`Shutdown`. Requests and replies travel on the channel's own pipe. Bytes decoded
from HTTP never travel as a message of their own: they are values inside a
:class:`Request`, built by ipcserve, so no client can forge a Shutdown; the sentinel also
carries a random token that only the owning MLProcess knows.
"""

from __future__ import annotations

import dataclasses
import secrets
from multiprocessing.connection import Connection
from typing import Any

from .errors import IPCServeError

__all__ = ["Attach", "Attached", "Cancel", "Reply", "Request", "Shutdown", "StreamEnd",
           "StreamItem", "new_token"]


def new_token() -> bytes:
    """A fresh random token for the Shutdown sentinel."""
    return secrets.token_bytes(16)


@dataclasses.dataclass
class Attach:
    """Queue message: a new channel. The ML process that takes it serves the pipe end."""

    conn: Connection
    channel_id: str


@dataclasses.dataclass(frozen=True)
class Shutdown:
    """Queue message: the ML process that takes it drains its pending work and exits.

    Tested with ``isinstance`` and a token compare, never with ``==`` on a tuple.
    """

    token: bytes

    def __repr__(self) -> str:  # the token is a secret; keep it out of logs
        return "Shutdown(<token>)"


@dataclasses.dataclass(frozen=True)
class Attached:
    """Pipe message, ML to caller, once per channel: which process serves it."""

    slot: int
    generation: int
    pid: int


@dataclasses.dataclass
class Request:
    """Pipe message, caller to ML: one call, or one batch request.

    Attributes:
        id: unique per channel; the reply carries it back.
        deadline: ``time.monotonic()`` value (system-wide on one host) after which the
            ML process skips the request without computing it.
        args / kwargs: the call's arguments (empty for a batch request).
        items: None for one call; for a batch request, its items (a non-empty list), each
            what ``predict_batch`` receives for one call (``batching.item_of``). The one
            Reply's value is then a list with one result per item, in order.
        trace: the caller's W3C ``traceparent`` when it traces the request (the reply then
            names the other traced requests of its model call), else None.
    """

    id: int
    deadline: float
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    items: list[Any] | None = None
    trace: str | None = None


@dataclasses.dataclass(frozen=True)
class Cancel:
    """Pipe message, caller to ML: nobody waits for request ``id`` any more.

    No reply follows. The ML process never computes it if it is still queued, and
    interrupts the model call if every request of that call is cancelled or expired.

    Attributes:
        id: the request's id on this channel.
        reason: ``"disconnect"`` (the HTTP client went away) or ``"deadline"``.
    """

    id: int
    reason: str


@dataclasses.dataclass
class Reply:
    """Pipe message, ML to caller: exactly one per Request.

    ``id`` is None only when the ML process could not even decode the request; the
    channel has one request outstanding at a time, so it answers that one.
    """

    id: int | None
    value: Any = None
    error: IPCServeError | None = None
    # Seconds the request waited in the ML process before its batch started, and the
    # batch's compute time; the caller feeds them to metrics.
    queue_wait: float = 0.0
    inference_time: float = 0.0
    batch_size: int = 0
    # When its model call started (time.monotonic(), system-wide on one host), and the
    # traceparents of the other traced requests of that call (only for a traced request).
    started: float = 0.0
    links: tuple[str, ...] = ()


@dataclasses.dataclass
class StreamItem:
    """Pipe message, ML to caller: one item of a streaming request (``predict`` returned a
    generator). Any number of them, then exactly one :class:`StreamEnd`."""

    id: int
    value: Any


@dataclasses.dataclass
class StreamEnd:
    """Pipe message, ML to caller: the stream of request ``id`` is over; ``error`` is why it
    ended early (the generator raised, or its item could not be sent), or None."""

    id: int
    error: IPCServeError | None = None
    items: int = 0
