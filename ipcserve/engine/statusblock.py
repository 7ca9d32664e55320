"""The shared status block: what every ML process is doing, readable from any process.

(Not the status *page*: that is ``static/index.html``, served by ``flask_ext``.)

It is a ``RawArray`` of doubles created before the ML processes start, so the supervisor,
the ML processes and web processes forked later (gunicorn with preload) all see the same
memory. Single aligned 8-byte stores are atomic on the platforms we support, and every
field has a single writer, so no lock is taken on the hot path.

Writers: the ML process writes ``heartbeat``, ``busy_since``, ``served``, the cancellation
counters, its count of queue messages it could not decode (failed channel hand-overs) and
``state=READY``; each calling (web) process writes its own caller field; the supervisor
writes everything else (its own failures and ``stopping`` included).

Pace fields (after the caller fields, three per slot): the moving averages of seconds per
batch and requests per batch that the slot's ML process keeps of its own batches, and the
most requests a batch can take (that process is their single writer), for admission's
estimate (:mod:`ipcserve.engine.admission`). A restarted
process keeps its predecessor's: it runs the same model.

Step fields (after the caller fields): per slot, the figures of the step scheduler
(:mod:`.stepping`), written by the ML process: the rows of its last step (0 when idle),
counters of steps, rows and tokens, and histograms of the time to first item and between
items (bucket counts, sum, count; the buckets are :data:`STEP_BUCKETS`).

Caller fields: every process that calls the model claims one ``(pid, in flight)`` pair
(under a lock, once per process) and stores its count of admitted calls there. The ML
processes read their sum to tell requests known to be on their way (admitted, not yet
read) from hypothetical ones: a batch waits only for the former.
"""

from __future__ import annotations

import enum
import os
import time
from typing import Any

from . import admission
from .admission import Pace

__all__ = ["STEP_BUCKETS", "State", "StatusBlock"]


class State(enum.IntEnum):
    STOPPED = 0
    STARTING = 1
    READY = 2
    RESTARTING = 3
    DRAINING = 4
    FAILED = 5


# Per-worker slot layout.
_PID, _GENERATION, _STATE, _HEARTBEAT, _BUSY_SINCE, _SERVED, _EXITCODE, _RESTARTS = range(8)
# Cancellations counted by the ML process (its single writer): by stage and reason.
_CANCELLED = {("queued", "disconnect"): 8, ("queued", "deadline"): 9,
              ("running", "disconnect"): 10, ("running", "deadline"): 11}
_SAVED = 12  # estimated seconds of model time saved by cancelling
# Queue messages this slot's ML processes took and could not decode (a channel whose pipe
# end did not arrive): a caller waiting on an unattached channel that sees the sum change
# sends its request again at once, instead of waiting out its deadline (issue 24).
_UNDECODABLE = 13
_SLOT = 14
CANCEL_STAGES = ("queued", "running")
CANCEL_REASONS = ("disconnect", "deadline")
# Shared fields after the slots.
_CRASHES, _CONSECUTIVE, _HANGS_KILLED, _CIRCUIT_OPEN, _NEXT_START, _DRAINING, _BACKOFF = range(7)
# The supervisor thread's failures (total, and > 0 while its last tick failed: the model is
# then not ready, because nobody restarts or watches its processes), and whether stop()
# began: a call cut off after that was stopped, not crashed.
_SUPERVISOR_FAILURES, _SUPERVISOR_FAILING, _STOPPING = range(7, 10)
_COMMON = 10
_NO_EXITCODE = -1000.0
CALLER_FIELDS = 64  # web processes that can report their in-flight count (gunicorn workers)
# Pace fields per slot, after the caller fields: seconds per batch, requests per batch, the
# most requests per batch.
_PACE_FIELDS = 3
# Each new batch weighs 1/5 in the moving averages: steady enough not to follow one odd
# batch, quick enough to follow a change of load within a few batches.
_PACE_WEIGHT = 0.2

# Step figures per slot, after the pace fields (the ML process of each slot writes its own).
#: Upper bounds (seconds) of the step histograms' buckets; one more bucket counts the rest.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROWS, _STEPS, _ROWS_TOTAL, _TOKENS, _FIRST, _BETWEEN = 0, 1, 2, 3, 4, 4 + len(STEP_BUCKETS) + 3
_STEP_SLOT = _BETWEEN + len(STEP_BUCKETS) + 3  # per histogram: buckets + overflow, sum, count


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StatusBlock:
    """Named access to the shared array. Picklable for the spawn start method."""

    def __init__(self, ctx: Any, workers: int) -> None:
        self.workers = workers
        self._array = ctx.RawArray("d", workers * _SLOT + _COMMON + 2 * CALLER_FIELDS
                                   + _PACE_FIELDS * workers + workers * _STEP_SLOT)
        for slot in range(workers):
            self._set(slot, _EXITCODE, _NO_EXITCODE)

    def __getstate__(self) -> dict[str, Any]:
        return {"workers": self.workers, "_array": self._array}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- raw access ------------------------------------------------------------------
    def _get(self, slot: int, field: int) -> float:
        return float(self._array[slot * _SLOT + field])

    def _set(self, slot: int, field: int, value: float) -> None:
        self._array[slot * _SLOT + field] = value

    def _common(self, field: int) -> float:
        return float(self._array[self.workers * _SLOT + field])

    def _set_common(self, field: int, value: float) -> None:
        self._array[self.workers * _SLOT + field] = value

    # -- per worker --------------------------------------------------------------------
    def pid(self, slot: int) -> int:
        return int(self._get(slot, _PID))

    def generation(self, slot: int) -> int:
        return int(self._get(slot, _GENERATION))

    def state(self, slot: int) -> State:
        return State(int(self._get(slot, _STATE)))

    def heartbeat(self, slot: int) -> float:
        return self._get(slot, _HEARTBEAT)

    def busy_since(self, slot: int) -> float:
        return self._get(slot, _BUSY_SINCE)

    def served(self, slot: int) -> int:
        return int(self._get(slot, _SERVED))

    def exitcode(self, slot: int) -> int | None:
        value = self._get(slot, _EXITCODE)
        return None if value == _NO_EXITCODE else int(value)

    def restarts(self, slot: int) -> int:
        return int(self._get(slot, _RESTARTS))

    def set_state(self, slot: int, state: State) -> None:
        self._set(slot, _STATE, int(state))

    def begin_incarnation(self, slot: int, pid: int) -> int:
        """Supervisor: a new process for ``slot`` was started; returns its generation."""
        self._set(slot, _PID, pid)
        self._set(slot, _BUSY_SINCE, 0.0)
        self._set(slot, _HEARTBEAT, time.monotonic())
        return self.generation(slot)

    def end_incarnation(self, slot: int, exitcode: int | None, state: State) -> None:
        """Supervisor: the process in ``slot`` is gone. Bumping the generation tells every
        caller waiting on a channel of that process that its answer will never come."""
        # The generation last: a caller that sees it change reads the exit code next.
        self._set(slot, _EXITCODE, _NO_EXITCODE if exitcode is None else exitcode)
        self._set(slot, _STATE, int(state))
        self._set(slot, _PID, 0)
        self._set(slot, _BUSY_SINCE, 0.0)
        self._set(slot, _GENERATION, self.generation(slot) + 1)

    def count_restart(self, slot: int) -> None:
        self._set(slot, _RESTARTS, self.restarts(slot) + 1)

    def beat(self, slot: int) -> None:
        """ML process: it made progress now."""
        self._set(slot, _HEARTBEAT, time.monotonic())

    def set_busy(self, slot: int, since: float) -> None:
        """ML process: a batch started at ``since`` (0: idle)."""
        self._set(slot, _BUSY_SINCE, since)

    def add_served(self, slot: int, n: int) -> None:
        self._set(slot, _SERVED, self.served(slot) + n)

    def count_cancelled(self, slot: int, stage: str, reason: str, saved: float = 0.0) -> None:
        """ML process: a request was cancelled at ``stage`` (queued / running) for
        ``reason`` (disconnect / deadline), saving about ``saved`` seconds of model time."""
        field = _CANCELLED.get((stage, reason), _CANCELLED[(stage, "disconnect")])
        self._set(slot, field, self._get(slot, field) + 1)
        if saved > 0:
            self._set(slot, _SAVED, self._get(slot, _SAVED) + saved)

    def count_undecodable(self, slot: int) -> None:
        """ML process: it took a queue message off the shared queue that it could not decode
        (a channel whose pipe end failed to arrive); that message is lost."""
        self._set(slot, _UNDECODABLE, self._get(slot, _UNDECODABLE) + 1)

    @property
    def handovers_failed(self) -> int:
        """Queue messages that ML processes took and could not decode, over every slot."""
        array, workers = self._array, self.workers
        return int(sum(array[s * _SLOT + _UNDECODABLE] for s in range(workers)))

    def cancelled(self) -> dict[tuple[str, str], int]:
        """Cancellations over every slot, by ``(stage, reason)``."""
        return {key: sum(int(self._get(s, field)) for s in range(self.workers))
                for key, field in _CANCELLED.items()}

    @property
    def saved_seconds(self) -> float:
        """Estimated model time saved by cancellations, over every slot."""
        return sum(self._get(s, _SAVED) for s in range(self.workers))

    # -- shared ------------------------------------------------------------------------
    @property
    def crashes(self) -> int:
        return int(self._common(_CRASHES))

    @property
    def consecutive_crashes(self) -> int:
        return int(self._common(_CONSECUTIVE))

    @property
    def hangs_killed(self) -> int:
        return int(self._common(_HANGS_KILLED))

    @property
    def circuit_open(self) -> bool:
        return bool(self._common(_CIRCUIT_OPEN))

    @property
    def next_start(self) -> float:
        """``time.monotonic()`` of the next restart attempt (0: none scheduled)."""
        return self._common(_NEXT_START)

    @property
    def draining(self) -> bool:
        return bool(self._common(_DRAINING))

    def record_crash(self, hang: bool, backoff: float) -> None:
        """Count a crash; ``backoff`` (the delay before its restart) is written first, so a
        reader that sees crash n also sees its delay."""
        self._set_common(_BACKOFF, backoff)
        self._set_common(_CRASHES, self.crashes + 1)
        self._set_common(_CONSECUTIVE, self.consecutive_crashes + 1)
        if hang:
            self._set_common(_HANGS_KILLED, self.hangs_killed + 1)

    def reset_consecutive(self) -> None:
        if self._common(_CONSECUTIVE):
            self._set_common(_CONSECUTIVE, 0)

    def set_circuit(self, is_open: bool) -> None:
        self._set_common(_CIRCUIT_OPEN, float(is_open))

    @property
    def backoff(self) -> float:
        """The delay before the last scheduled restart, in seconds."""
        return self._common(_BACKOFF)

    def set_next_start(self, when: float, delay: float | None = None) -> None:
        self._set_common(_NEXT_START, when)
        if delay is not None:
            self._set_common(_BACKOFF, delay)

    def set_draining(self, draining: bool) -> None:
        self._set_common(_DRAINING, float(draining))

    @property
    def stopping(self) -> bool:
        """The supervisor's stop() began: the ML processes are being stopped (after the
        drain's grace, or at once)."""
        return bool(self._common(_STOPPING))

    def set_stopping(self) -> None:
        self._set_common(_STOPPING, 1.0)

    @property
    def supervisor_failures(self) -> int:
        """Ticks of the supervisor thread that raised, in total."""
        return int(self._common(_SUPERVISOR_FAILURES))

    @property
    def supervisor_failing(self) -> bool:
        """The supervisor thread's last tick raised: restarts and the watchdog are not
        running, so the model must not say it is ready."""
        return bool(self._common(_SUPERVISOR_FAILING))

    def record_supervisor_failure(self) -> None:
        """Supervisor: a tick raised; the model is not ready until one completes."""
        self._set_common(_SUPERVISOR_FAILURES, self.supervisor_failures + 1)
        self._set_common(_SUPERVISOR_FAILING, 1.0)

    def supervisor_recovered(self) -> None:
        """Supervisor: a tick completed after failures."""
        self._set_common(_SUPERVISOR_FAILING, 0.0)

    # -- callers' in-flight counts ----------------------------------------------------------
    def _caller_base(self) -> int:
        return self.workers * _SLOT + _COMMON

    def claim_caller(self, pid: int, lock: Any) -> int | None:
        """A calling process takes a field for its in-flight count (a field of a process
        that no longer exists is reused). None if none is free or the lock is stuck (a
        process died holding it): that process's calls are then not counted, which only
        makes batches form without waiting for them.

        ``lock``: a lock every calling process shares (the request queue's write lock: no
        semaphore of its own, so no more work for multiprocessing's resource tracker)."""
        if not lock.acquire(timeout=0.5):
            return None
        try:
            base = self._caller_base()
            for index in range(CALLER_FIELDS):
                owner = int(self._array[base + 2 * index])
                if owner == pid:
                    return index
                if owner == 0 or not _alive(owner):
                    self._array[base + 2 * index + 1] = 0.0
                    self._array[base + 2 * index] = pid
                    return index
            return None
        finally:
            lock.release()

    def set_caller_inflight(self, index: int, count: int) -> None:
        """The claiming process's admitted calls (its single writer)."""
        self._array[self._caller_base() + 2 * index + 1] = count

    def release_caller(self, index: int, pid: int) -> None:
        base = self._caller_base() + 2 * index
        if int(self._array[base]) == pid:
            self._array[base + 1] = 0.0
            self._array[base] = 0.0

    def sweep_callers(self, lock: Any) -> None:
        """Supervisor: forget the counts of calling processes that died (a gunicorn worker
        killed with calls in flight), so batches do not wait for their answers."""
        if not lock.acquire(timeout=0):
            return
        try:
            base = self._caller_base()
            for index in range(CALLER_FIELDS):
                owner = int(self._array[base + 2 * index])
                if owner and not _alive(owner):
                    self._array[base + 2 * index + 1] = 0.0
                    self._array[base + 2 * index] = 0.0
        finally:
            lock.release()

    def callers_inflight(self) -> int:
        """Calls admitted by every calling process and not yet answered to them."""
        base = self._caller_base()
        array = self._array
        return int(sum(array[base + 1:base + 2 * CALLER_FIELDS:2]))

    # -- pace: what recent batches took, for admission's estimate ---------------------------
    def _pace_base(self, slot: int) -> int:
        return self._caller_base() + 2 * CALLER_FIELDS + _PACE_FIELDS * slot

    def record_batch(self, slot: int, seconds: float, requests: int, capacity: int = 1) -> None:
        """ML process: it answered ``requests`` requests in one batch that took ``seconds``
        (its model calls for them); a batch can take ``capacity`` requests at most. The first
        batch is taken as it is, not averaged with 0."""
        base = self._pace_base(slot)
        self._array[base + 2] = float(capacity)
        old_seconds, old_requests = self._array[base], self._array[base + 1]
        if old_seconds > 0:
            seconds = old_seconds + _PACE_WEIGHT * (seconds - old_seconds)
            requests = old_requests + _PACE_WEIGHT * (requests - old_requests)
        # Requests first: a reader that sees the new seconds sees a batch size as recent.
        self._array[base + 1] = float(requests)
        self._array[base] = max(float(seconds), 1e-9)  # > 0 marks "timed"

    def pace(self, slot: int) -> Pace:
        """The moving averages of ``slot``'s batches (0, 0: none timed yet)."""
        base = self._pace_base(slot)
        return Pace(float(self._array[base]), float(self._array[base + 1]),
                    max(1.0, float(self._array[base + 2])))

    def paces(self) -> list[Pace]:
        """The pace of every ML process that is ready (those take calls off the queue)."""
        array, ready = self._array, float(State.READY)
        found = []
        for slot in range(self.workers):  # a loop over raw values: on every admission
            if array[slot * _SLOT + _STATE] == ready:
                base = self._pace_base(slot)
                found.append(Pace(array[base], array[base + 1], max(1.0, array[base + 2])))
        return found

    def estimated_wait(self) -> float | None:
        """Seconds until a call admitted now would be answered (admission's estimate, without
        its margin), or None before any batch was timed."""
        found = admission.estimate(self.callers_inflight(), self.paces())
        return None if found is None else found.wait

    # -- step figures (the ML process of each slot writes its own) ---------------------------
    def _step_base(self, slot: int) -> int:
        return (self._caller_base() + 2 * CALLER_FIELDS + _PACE_FIELDS * self.workers
                + slot * _STEP_SLOT)

    def record_step(self, slot: int, rows: int, tokens: int) -> None:
        """ML process: a step of ``rows`` batch rows made ``tokens`` tokens (rows 0: idle)."""
        base, array = self._step_base(slot), self._array
        array[base + _ROWS] = rows
        if rows:
            array[base + _STEPS] += 1
            array[base + _ROWS_TOTAL] += rows
            array[base + _TOKENS] += tokens

    def _observe(self, slot: int, histogram: int, seconds: float) -> None:
        base, array = self._step_base(slot) + histogram, self._array
        bucket = next((i for i, bound in enumerate(STEP_BUCKETS) if seconds <= bound),
                      len(STEP_BUCKETS))
        array[base + bucket] += 1
        array[base + len(STEP_BUCKETS) + 1] += seconds
        array[base + len(STEP_BUCKETS) + 2] += 1

    def record_first_item(self, slot: int, seconds: float) -> None:
        """ML process: a stream's first items went out ``seconds`` after it read the request."""
        self._observe(slot, _FIRST, seconds)

    def record_between_items(self, slot: int, seconds: float) -> None:
        """ML process: a stream's items of one step went out ``seconds`` after its last."""
        self._observe(slot, _BETWEEN, seconds)

    def _histogram(self, histogram: int) -> dict[str, Any]:
        n = len(STEP_BUCKETS) + 3
        totals = [0.0] * n
        for slot in range(self.workers):
            base = self._step_base(slot) + histogram
            for i in range(n):
                totals[i] += self._array[base + i]
        return {"buckets": [int(c) for c in totals[:len(STEP_BUCKETS) + 1]],
                "sum": round(totals[-2], 6), "count": int(totals[-1])}

    def steps(self) -> dict[str, Any]:
        """The step figures over every slot: ``rows`` (of the steps running now), counters
        ``steps``, ``rows_total``, ``tokens``, and histograms ``first_item`` and
        ``between_items`` (``buckets``: counts per :data:`STEP_BUCKETS` bound, then above;
        ``sum``; ``count``)."""
        totals = [0.0] * 4
        for slot in range(self.workers):
            base = self._step_base(slot)
            for i in range(4):
                totals[i] += self._array[base + i]
        return {"rows": int(totals[_ROWS]), "steps": int(totals[_STEPS]),
                "rows_total": int(totals[_ROWS_TOTAL]), "tokens": int(totals[_TOKENS]),
                "first_item": self._histogram(_FIRST),
                "between_items": self._histogram(_BETWEEN)}

    # -- summaries -----------------------------------------------------------------------
    def all_stopped(self) -> bool:
        """No ML process is running, starting or about to restart."""
        for slot in range(self.workers):  # a loop, not all(genexpr): on every admission
            if self._array[slot * _SLOT + _STATE] not in (State.STOPPED, State.FAILED):
                return False
        return True

    def ready_slots(self) -> list[int]:
        return [s for s in range(self.workers) if self.state(s) is State.READY]

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable view for /readyz, the status page and tests."""
        now = time.monotonic()
        workers = []
        for slot in range(self.workers):
            busy = self.busy_since(slot)
            pace = self.pace(slot)
            workers.append({
                "slot": slot,
                "pid": self.pid(slot) or None,
                "generation": self.generation(slot),
                "state": self.state(slot).name.lower(),
                "heartbeat_age": round(max(0.0, now - self.heartbeat(slot)), 3),
                "busy_for": round(now - busy, 3) if busy else 0.0,
                "served": self.served(slot),
                "restarts": self.restarts(slot),
                "last_exitcode": self.exitcode(slot),
                "batch_seconds": round(pace.seconds, 6),
                "batch_requests": round(pace.requests, 3),
            })
        wait = self.estimated_wait()
        return {
            "workers": workers,
            "cancelled": {f"{stage}_{reason}": count
                          for (stage, reason), count in self.cancelled().items()},
            "cancel_saved_seconds": round(self.saved_seconds, 3),
            "crashes": self.crashes,
            "consecutive_crashes": self.consecutive_crashes,
            "hangs_killed": self.hangs_killed,
            "circuit_open": self.circuit_open,
            "restart_backoff": round(self.backoff, 3),
            "draining": self.draining,
            "handovers_failed": self.handovers_failed,
            "supervisor_failures": self.supervisor_failures,
            "supervisor_failing": self.supervisor_failing,
            "estimated_wait": None if wait is None else round(wait, 6),
            "steps": self.steps(),
        }
