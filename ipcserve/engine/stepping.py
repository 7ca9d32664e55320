"""Continuous batching inside the ML process: every active stream of a model, one step.

For a model whose ``stepping`` is True (:class:`~ipcserve.engine.runtime.SteppedModel`), a
streaming request does not get a generator of its own. ``model.begin(*args, **kwargs)``
checks it and returns a *state*; then, once per turn of the serving loop, one
``model.step(states)`` advances the states of every active stream together (a text model
runs them as one forward pass), and each stream's items go out on its own pipe as
:class:`~ipcserve.protocol.StreamItem` messages. A request that arrives joins at the next
step; one that ends (done, cancelled, expired, failed) leaves at once and frees its rows.

Every promise of a one-generator stream (:mod:`.streaming`) holds per stream:

* **first item within the deadline**: a stream whose deadline passes before its first item
  leaves the batch (its caller has stopped waiting: a 504); after it, the caller watches the
  time between items;
* **cancellation within one step**: a ``Cancel`` (or a closed channel) read between steps
  takes the stream out before the next; one read during a step drops that step's items; a
  step whose every stream is cancelled or expired is interrupted like any model call nobody
  waits for (:mod:`.cancel`);
* **back-pressure per stream**: a stream whose pipe is full (a slow reader) sits out the
  steps until it drains; the others go on;
* **exactly one end**: a :class:`~ipcserve.protocol.StreamEnd` (with the error if the step
  raised: every stream of that step ends with it), or none for a stream nobody waits for;
  ``model.finish(state)`` exactly once per state.

At most ``max_batch_size`` rows run per step (a state's ``rows`` attribute, 1 by default),
oldest streams first; the rest wait for a free row. What one step costs beyond that (how
many prompt tokens it prefills) is the model's to bound.

The figures of each step (rows, tokens, time to first item, time between items) go to the
status block for ``/metrics`` and the status page.
"""

from __future__ import annotations

import logging
import math
import select
import time
from typing import Any

from .cancel import Cancelled, CancelWatch
from .errors import IPCServeError, ModelError
from .protocol import Reply, StreamEnd, StreamItem
from .reply import model_error, send, signature_error
from .runtime import Made, SteppedModel
from .statusblock import StatusBlock

__all__ = ["StepRunner", "steps_of"]

logger = logging.getLogger(__name__)


def steps_of(model: Any) -> bool:
    """Whether ``model`` takes streaming requests through its step hook."""
    try:
        return bool(getattr(model, "stepping", False))
    except Exception:  # a property that fails: the one-generator path
        logger.exception("the model's 'stepping' property raised; streams use predict()")
        return False


class _Active:
    """One stream in the step scheduler."""

    __slots__ = ("item", "state", "sent", "writable", "last")

    def __init__(self, item: Any, state: Any) -> None:
        self.item = item  # the request's _Pending: .conn, .request, .arrived
        self.state = state
        self.sent = 0
        self.last = 0.0  # when its last items went out
        self.writable = select.poll()
        self.writable.register(item.conn.fileno(), select.POLLOUT)

    @property
    def rows(self) -> int:
        rows = getattr(self.state, "rows", 1)
        return rows if isinstance(rows, int) and rows > 0 else 1


class StepRunner:
    """The active streams of one stepping model in one ML process.

    Args:
        model: the model (its ``begin``, ``step`` and ``finish``).
        status: the shared status block (heartbeat, busy, cancellations, step figures).
        slot: this ML process's slot.
        watch: the cancel watch that interrupts a step nobody waits for.
        threshold: the shared-memory threshold for items.
        max_rows: most batch rows per step (``max_batch_size``).
    """

    def __init__(self, model: SteppedModel, status: StatusBlock, slot: int,
                 watch: CancelWatch, threshold: int, max_rows: int) -> None:
        self.model = model
        self.status = status
        self.slot = slot
        self.watch = watch
        self.threshold = threshold
        self.max_rows = max_rows
        self.active: list[_Active] = []
        self.shown_rows = -1  # the rows last written to the status block
        self._show(0)  # a restarted process: the dead one's running rows are gone

    def __bool__(self) -> bool:
        return bool(self.active)

    def __len__(self) -> int:
        return len(self.active)

    def start(self, item: Any) -> None:
        """Start the stream of request ``item``; a request the model refuses gets its
        error as the one Reply."""
        request = item.request
        try:
            state = self.model.begin(*request.args, **request.kwargs)
        except Cancelled:
            raise
        except TypeError as exc:
            error = signature_error(self.model.begin, request) or model_error(exc)
            send(item.conn, Reply(request.id, error=error))
            return
        except BaseException as exc:  # SystemExit from a model fails the request, not us
            send(item.conn, Reply(request.id, error=model_error(exc)))
            return
        self.active.append(_Active(item, state))

    def _end(self, stream: _Active, error: IPCServeError | None = None,
             notify: bool = True) -> bool:
        """End ``stream`` once: its StreamEnd (unless nobody waits), then ``finish``. False
        if it had ended already."""
        if stream not in self.active:
            return False
        self.active.remove(stream)
        if notify:
            send(stream.item.conn, StreamEnd(stream.item.request.id, error, stream.sent),
                 self.threshold)
        try:
            self.model.finish(stream.state)
        except Exception:  # the stream is over either way; a leak is the model's to fix
            logger.exception("finish() of stream %s raised", stream.item.request.id)
        return True

    def _cancelled(self, stream: _Active, reason: str) -> None:
        # Counted once: a channel that closes during a step is both a cancellation the
        # watch saw and a disconnect the loop handled when the step ended.
        if not self._end(stream, notify=False):
            return
        self.status.count_cancelled(self.slot, "running", reason)
        logger.debug("stream %s cancelled after %d items (%s)", stream.item.request.id,
                     stream.sent, reason)

    def cancel(self, conn: Any, request_id: int | None, reason: str) -> bool:
        """Stop the stream of (``conn``, ``request_id``), every stream of ``conn`` when
        ``request_id`` is None, without a StreamEnd: nobody waits for it."""
        found = False
        for stream in [s for s in self.active if s.item.conn is conn and
                       (request_id is None or s.item.request.id == request_id)]:
            self._cancelled(stream, reason)
            found = True
        return found

    def close_all(self, error: IPCServeError) -> None:
        for stream in list(self.active):
            self._end(stream, error)

    def _batch(self, now: float) -> list[_Active]:
        """The streams of the next step: oldest first, while their rows fit; a stream
        whose pipe is full sits this step out, one whose first item is overdue leaves."""
        batch: list[_Active] = []
        rows = 0
        for stream in list(self.active):
            if stream.sent == 0 and stream.item.request.deadline <= now:
                self._cancelled(stream, "deadline")  # its caller already answered 504
                continue
            if not stream.writable.poll(0):
                continue
            if batch and rows + stream.rows > self.max_rows:
                continue
            batch.append(stream)
            rows += stream.rows
        return batch

    def advance(self) -> bool:
        """One step of every stream that can take more. True if a step ran."""
        started = time.monotonic()
        batch = self._batch(started)
        if not batch:
            self._show(0)
            return False
        rows = sum(s.rows for s in batch)
        self.status.set_busy(self.slot, started)
        cancelled: dict[int, str] = {}
        self.watch.begin([s.item for s in batch])
        try:
            try:
                made = self.model.step([s.state for s in batch])
                if len(made) != len(batch):
                    raise ModelError(f"step() returned {len(made)} results for "
                                     f"{len(batch)} states")
            finally:
                cancelled = self.watch.end()
        except Cancelled:  # every stream of the step is gone (end() is idempotent)
            cancelled = cancelled or self.watch.end()
            for stream in batch:
                self._cancelled(stream, cancelled.get(id(stream.item), "deadline"))
            return True
        except BaseException as exc:  # the model raised: every stream of the step ends
            error = model_error(exc)
            logger.warning("a step of %d stream(s) failed: %r", len(batch), exc)
            for stream in batch:
                self._end(stream, error)
            return True
        finally:
            self.status.set_busy(self.slot, 0.0)
            self.status.beat(self.slot)
        now = time.monotonic()
        self.status.record_step(self.slot, rows, sum(m.tokens for m in made))
        self.shown_rows = rows
        for stream, result in zip(batch, made):
            if stream not in self.active:
                continue  # ended while the step ran (its channel closed)
            if id(stream.item) in cancelled:
                self._cancelled(stream, cancelled[id(stream.item)])
            else:
                self._deliver(stream, result, now)
        return True

    def _show(self, rows: int) -> None:
        if rows != self.shown_rows:
            self.status.record_step(self.slot, rows, 0)
            self.shown_rows = rows

    def _deliver(self, stream: _Active, made: Made, now: float) -> None:
        """Send what one step made for ``stream``; end it when it is done."""
        item = stream.item
        for value in made.items:
            if not send(item.conn, StreamItem(item.request.id, value), self.threshold):
                # Caller gone, or the item would not pickle (then send() ended the stream).
                self._end(stream, notify=False)
                return
            stream.sent += 1
        if made.items:
            if stream.last == 0.0:
                self.status.record_first_item(self.slot, now - item.arrived)
                # The request's deadline was for the first item; from here the caller
                # watches the time between items and cancels when it runs out.
                item.request.deadline = math.inf
            else:
                self.status.record_between_items(self.slot, now - stream.last)
            stream.last = now
        if made.done:
            self._end(stream)
