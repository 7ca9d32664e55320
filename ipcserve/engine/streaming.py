"""Streams inside the ML process: a ``predict`` that returns a generator.

Each yielded item is sent to the caller as a :class:`~ipcserve.protocol.StreamItem` as soon
as it is made, and exactly one :class:`~ipcserve.protocol.StreamEnd` closes the stream (with
the error if the generator raised). Three rules keep one ML process fair and bounded:

* **round robin**: the serving loop advances every active stream by *one* item per turn and
  reads its channels between turns, so a short request (or a second stream) is served while
  a long generation goes on; time to first item does not wait for other streams to end;
* **back-pressure**: a stream advances only while its pipe can take more (``POLLOUT``): a
  caller that reads slowly pauses its own generator instead of making the ML process buffer
  without bound (at most one socket buffer per stream);
* **cancellation**: a ``Cancel`` for the stream, or its caller closing the channel, closes
  the generator at its next ``yield`` (``GeneratorExit`` inside it); a long step is
  interrupted like any model call nobody waits for.

The deadline of a streaming request covers its first item; after it, the caller enforces
the idle time between items and sends ``Cancel`` when it runs out.

A model that steps many streams at once (``stepping``) runs its streams in a
:class:`~ipcserve.engine.stepping.StepRunner` instead, which this runner holds: the serving
loop cancels, advances and closes both through it.
"""

from __future__ import annotations

import collections.abc
import logging
import math
import select
import time
import types
from typing import Any

from .cancel import Cancelled, CancelWatch
from .protocol import StreamEnd, StreamItem
from .reply import model_error, send
from .statusblock import StatusBlock
from .stepping import StepRunner

__all__ = ["StreamRunner", "is_stream"]

logger = logging.getLogger(__name__)


def is_stream(result: Any) -> bool:
    """Whether a ``predict`` result is a stream: a generator or another iterator (not a
    container such as a list, dict, str or array, which are answers of their own)."""
    if isinstance(result, types.GeneratorType):
        return True
    return isinstance(result, collections.abc.Iterator) and not isinstance(
        result, (str, bytes, bytearray, memoryview, dict, list, tuple))


class _Stream:
    __slots__ = ("item", "gen", "sent", "writable")

    def __init__(self, item: Any, gen: collections.abc.Iterator[Any]) -> None:
        self.item = item  # the request's _Pending: .conn, .request
        self.gen = gen
        self.sent = 0
        self.writable = select.poll()
        self.writable.register(item.conn.fileno(), select.POLLOUT)

    def can_send(self) -> bool:
        return bool(self.writable.poll(0))


class StreamRunner:
    """The active streams of one ML process (``steps``: those of a stepping model)."""

    def __init__(self, status: StatusBlock, slot: int, watch: CancelWatch, threshold: int,
                 steps: StepRunner | None = None) -> None:
        self.status = status
        self.slot = slot
        self.watch = watch
        self.threshold = threshold
        self.streams: list[_Stream] = []
        self.steps = steps

    def __bool__(self) -> bool:
        return bool(self.streams) or bool(self.steps)

    def __len__(self) -> int:
        return len(self.streams) + (len(self.steps) if self.steps is not None else 0)

    def join(self, item: Any) -> bool:
        """Start request ``item`` in the step scheduler, if the model steps; False if not
        (then the caller runs ``predict`` as for any model)."""
        if self.steps is None or item.request.items is not None:
            return False
        self.steps.start(item)
        return True

    def add(self, item: Any, gen: collections.abc.Iterator[Any]) -> None:
        self.streams.append(_Stream(item, gen))

    def _end(self, stream: _Stream, error: Any = None, notify: bool = True) -> None:
        self.streams.remove(stream)
        if notify:
            send(stream.item.conn, StreamEnd(stream.item.request.id, error, stream.sent),
                 self.threshold)
        close = getattr(stream.gen, "close", None)
        if close is not None:
            try:
                close()  # GeneratorExit at the yield: the model's finally blocks run
            except BaseException as exc:  # a generator that misbehaves while closing
                logger.warning("closing a stream raised %r", exc)

    def cancel(self, conn: Any, request_id: int | None, reason: str) -> bool:
        """Stop the stream of (``conn``, ``request_id``) — every stream of ``conn`` when
        ``request_id`` is None — without a StreamEnd: nobody waits for it."""
        found = self.steps is not None and self.steps.cancel(conn, request_id, reason)
        for stream in [s for s in self.streams if s.item.conn is conn and
                       (request_id is None or s.item.request.id == request_id)]:
            self._end(stream, notify=False)
            self.status.count_cancelled(self.slot, "running", reason)
            logger.debug("stream %s cancelled after %d items (%s)", stream.item.request.id,
                         stream.sent, reason)
            found = True
        return found

    def close_all(self, error: Any) -> None:
        for stream in list(self.streams):
            self._end(stream, error)
        if self.steps is not None:
            self.steps.close_all(error)

    def advance(self) -> bool:
        """One item from every stream whose caller can take it, and one step of the
        stepping model's streams. True if any advanced."""
        advanced = self.steps is not None and self.steps.advance()
        for stream in list(self.streams):
            if stream in self.streams and stream.can_send():
                self._step(stream)
                advanced = True
        return advanced

    def _step(self, stream: _Stream) -> None:
        item = stream.item
        started = time.monotonic()
        self.status.set_busy(self.slot, started)
        cancelled: dict[int, str] = {}
        self.watch.begin([item])
        try:
            try:
                value = next(stream.gen)
            finally:
                cancelled = self.watch.end()
        except StopIteration:
            self._end(stream)
            return
        except Cancelled:
            cancelled = cancelled or self.watch.end()
            self._end(stream, notify=False)
            self.status.count_cancelled(self.slot, "running", cancelled.get(id(item), "deadline"))
            return
        except BaseException as exc:  # the generator raised: the stream ends with that error
            self._end(stream, model_error(exc))
            return
        finally:
            self.status.set_busy(self.slot, 0.0)
            self.status.beat(self.slot)
        if cancelled:
            self._end(stream, notify=False)
            self.status.count_cancelled(self.slot, "running", cancelled[id(item)])
            return
        if not send(item.conn, StreamItem(item.request.id, value), self.threshold):
            # Caller gone, or the item would not pickle (then send() ended the stream).
            self._end(stream, notify=False)
            return
        stream.sent += 1
        if stream.sent == 1:
            # The request's deadline was for the first item; from here the caller watches
            # the time between items and cancels when it runs out.
            item.request.deadline = math.inf
