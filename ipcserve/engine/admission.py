"""Admission by estimate: refuse at once a call that cannot be answered before its deadline.

Pure policy: plain numbers in, a verdict out; no I/O, and the clock is injected. The caller
(:meth:`ipcserve.engine.channel.Caller.admit`) reads the inputs from the shared status block:

* ``ahead``: calls admitted and not yet answered, by every web process (their in-flight
  counts in the status block), this process's included;
* one :class:`Pace` per ML process that is ready: the recent seconds per batch (a model
  call, or the calls that answered one batch request) and requests per batch, moving
  averages the ML process keeps of its own batches (each new batch weighs 1/5), and the
  most requests a batch can take (``max_batch_size`` for a model that batches, else 1).

The estimate (``share``: this call's part of the queue, ``(ahead + 1) / processes``)::

    batch  = max(recent requests per batch, min(most per batch, share))
    rounds = ceil((ahead + 1) / (batch × ML processes ready))   batches until this call's is done
    wait   = rounds × recent seconds per batch

(averaged over the processes timed). A batching model fills its batches from the queue (with
``max_batch_wait`` 0 it takes whatever was read), so a longer queue means fuller batches,
whatever size its recent, quieter batches had; each batch is assumed to take the recent
seconds per batch. A model whose batch time grows with the batch is under-estimated at the
start of a burst, until its averages have seen full batches: the estimate errs towards
admitting there, which is what happened before it existed, rather than refusing calls that
a full batch would have answered in time.

The margin: a call is refused when ``wait × factor`` is more than the time left to its
deadline (``estimate_factor``, default 1.25: the estimate may be 25 % short, which covers a
moving average's noise and the time outside the model). The batch running now counts as a
whole one. Never refused:

* with no estimate yet (no batch timed: a cold model, or a model that only streams, since a
  stream's items are not one batch's time) or ``factor`` 0 (turned off);
* when the call would be in the next batch anyway (``rounds == 1``; with nothing ahead, always):
  its wait is then its own model time, and a model slower than the deadline is the
  deadline's problem, not an overload. It is admitted and gets 504, as before.

A refused call was never admitted: it is safe to send again, here or elsewhere, after
``retry_after`` (the estimated time until the queue is short enough for a call with the
same time left).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .errors import OverloadedError

__all__ = ["Estimate", "Gate", "Pace", "Refusal", "estimate"]


class Pace(NamedTuple):
    """What one ready ML process's recent batches took (seconds 0: none timed yet).

    Attributes:
        seconds: seconds per batch (moving average).
        requests: requests answered per batch (moving average).
        capacity: the most requests one batch can take (``max_batch_size`` for a model that
            batches, 1 for one that does not).
    """

    seconds: float
    requests: float
    capacity: float = 1.0


@dataclasses.dataclass(frozen=True)
class Estimate:
    """When a call admitted now would be answered.

    Attributes:
        wait: seconds from now until its answer.
        ahead: calls in flight before it.
        rounds: batches until its own is done.
        seconds: seconds per batch used (averaged over the timed processes).
        requests: requests per batch used: the recent average, or more when the queue
            would fill bigger batches.
        processes: ML processes ready to take from the queue.
    """

    wait: float
    ahead: int
    rounds: int
    seconds: float
    requests: float
    processes: int


def estimate(ahead: int, paces: Sequence[Pace]) -> Estimate | None:
    """When a call admitted now, with ``ahead`` calls in flight before it, would be answered
    by the ready ML processes whose recent batches are ``paces``; None without an estimate
    (no process ready, or none has timed a batch yet)."""
    timed = [p for p in paces if p.seconds > 0]
    if not timed:
        return None
    ahead = max(0, ahead)
    seconds = sum(p.seconds for p in timed) / len(timed)
    recent = max(1.0, sum(p.requests for p in timed) / len(timed))
    most = max(recent, sum(p.capacity for p in timed) / len(timed))
    # A process not timed yet (just restarted) takes its share at the others' pace.
    processes = len(paces)
    batch = max(recent, min(most, (ahead + 1) / processes))
    rounds = max(1, math.ceil((ahead + 1) / (batch * processes) - 1e-9))
    return Estimate(rounds * seconds, ahead, rounds, seconds, batch, processes)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a call is refused: its estimate, the time it had left, when to retry.

    Attributes:
        estimate: when it would have been answered.
        remaining: seconds it had until its deadline.
        factor: the margin the estimate was multiplied by.
        retry_after: seconds until the queue is short enough for a call with as much time
            left to fit.
    """

    estimate: Estimate
    remaining: float
    factor: float
    retry_after: float

    def error(self, model: str) -> OverloadedError:
        """The refusal as the error the caller raises (``reason`` ``"estimate"``)."""
        found = self.estimate
        per_batch = (f"~{found.seconds:.2f} s per model call" if found.requests < 1.05 else
                     f"~{found.seconds:.2f} s per batch of ~{found.requests:.1f} requests")
        processes = f" on {found.processes} ML processes" if found.processes > 1 else ""
        margined = found.wait * self.factor
        return OverloadedError(
            f"model {model!r} would answer this request in ~{found.wait:.2f} s "
            f"({found.ahead} calls ahead, {per_batch}{processes}), ~{margined:.2f} s "
            f"with the estimate's margin (estimate_factor={self.factor:g}): after its deadline "
            f"in {max(0.0, self.remaining):.2f} s. It was not admitted: retry in "
            f"~{max(1, math.ceil(self.retry_after))} s, or elsewhere",
            reason="estimate", retry_after=self.retry_after)


class Gate:
    """Refuses a call whose estimated answer is too late for its deadline.

    Args:
        factor: the margin (``Config.estimate_factor``): refuse when ``wait × factor`` is more
            than the time left; 0 turns the estimate off.
        clock: ``time.monotonic`` or a fake for tests (deadlines are on its scale).
    """

    def __init__(self, factor: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.factor = factor
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def check(self, ahead: int, paces: Sequence[Pace], deadline: float) -> Refusal | None:
        """The refusal of a call due by ``deadline`` with ``ahead`` calls in flight before
        it, or None to admit it."""
        if not self.enabled or ahead <= 0:
            return None
        found = estimate(ahead, paces)
        if found is None or found.rounds <= 1:
            return None
        remaining = deadline - self.clock()
        if found.wait * self.factor <= remaining:
            return None
        # The queue shrinks at the estimate's pace: room comes once what is left of the
        # work fits in the time a call like this one has, margin included.
        retry_after = max(0.0, found.wait - max(0.0, remaining) / self.factor)
        return Refusal(found, remaining, self.factor, retry_after)
