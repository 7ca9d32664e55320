"""The caller's side: send a request to the ML process and wait for its one answer.

Shape (fixed): a caller creates a ``Pipe``, sends one end through the shared ``SimpleQueue``
to the ML process, and waits on its own end with poll-based timeouts.

Price: passing a fresh pipe end through a queue costs ~800 µs (the fd travels through
multiprocessing's resource sharer with an authentication handshake) - more than a whole
HTTP request. So each thread makes its Pipe once and reuses it; a channel whose request
timed out or failed is closed and replaced, and every reply carries its request id, so a
late answer can never answer a later request.

Waiting: ``poll()`` in slices of ``poll_interval``. Between slices the caller re-checks the
shared status block: a channel whose end the ML process never took gives no EOF when that
process dies, and with the fork start method a dead process's pipe end may live on in a
sibling, so EOF alone is not a liveness signal.

Admission comes first (:meth:`Caller.admit`): past ``max_inflight`` a call is refused at
once, before its input is even decoded, and the one in-flight counter here is what
``shutdown()`` and the HTTP layer's drain wait on. A call admitted with its deadline is also
refused at once when the queue ahead of it is too long for it to be answered in time
(:mod:`ipcserve.engine.admission`).
"""

from __future__ import annotations

import array
import dataclasses
import fcntl
import itertools
import logging
import os
import select
import termios
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from multiprocessing.connection import Connection
from typing import Any

from . import shm
from .admission import Gate
from .errors import (
    InputError,
    ModelError,
    OverloadedError,
    QueueDeadlineError,
    RemoteTraceback,
    RequestCancelledError,
    ResultDeadlineError,
    WorkerCrashedError,
    WorkerUnavailableError,
    describe_exit,
)
from .protocol import Attach, Attached, Cancel, Reply, Request, StreamEnd, StreamItem
from .runtime import Plumbing
from .statusblock import State

__all__ = ["Admission", "CallResult", "Caller", "Stream"]

logger = logging.getLogger(__name__)

# How long a caller that saw its ML process die waits for the supervisor to record the
# exit code, so the error can say "killed by signal 9" rather than "not yet known".
_EXITCODE_WAIT = 0.5
# Channels one call may lose in a row because the ML process could not take them (their
# pipe end failed to arrive) before it answers WorkerUnavailableError instead of looping.
_HANDOVER_TRIES = 3


@dataclasses.dataclass(frozen=True)
class CallResult:
    """The answer to one call, with where its time went.

    Attributes:
        value: what ``predict`` (or ``predict_batch``, for this item) returned; for a batch
            request, the list of its items' results, in order.
        queue_wait: seconds the request waited in the ML process before its batch started.
        inference_time: seconds the model call that answered it took (for a batch request,
            all of its model calls).
        batch_size: items in that model call (for a batch request, in the largest of its
            model calls).
        started: when that model call started (``time.monotonic()``); 0.0 if unknown.
        links: for a traced call, the W3C traceparents of the other traced requests that
            shared its model call.
    """

    value: Any
    queue_wait: float = 0.0
    inference_time: float = 0.0
    batch_size: int = 0
    started: float = 0.0
    links: tuple[str, ...] = ()


class _Channel:
    """One thread's persistent pipe to whichever ML process took its other end."""

    __slots__ = ("conn", "poller", "pid", "slot", "generation", "ids", "crashes_at_attach",
                 "handovers_at_attach", "handover_failed", "mailbox")

    def __init__(self, conn: Connection, crashes: int, handovers: int = 0) -> None:
        self.conn = conn
        # A poll object made once: Connection.poll() builds a new selector on every call.
        self.poller = select.poll()
        self.poller.register(conn.fileno(), select.POLLIN)
        self.pid = os.getpid()
        self.slot: int | None = None  # set by the ML process's Attached message
        self.generation = -1
        self.ids = itertools.count(1)
        # ML-process deaths seen when the Attach was queued: a death after that may have
        # taken our pipe end with it (see Caller._wait).
        self.crashes_at_attach = crashes
        # Queue messages the ML processes could not decode, as of the Attach: a new one may
        # have been ours (a failed fd transfer), so we send again (see Caller._wait).
        self.handovers_at_attach = handovers
        self.handover_failed = False  # set when _wait gave this channel up for that reason
        self.mailbox = shm.Mailbox()  # large arrays, both ways, through reused shared memory

    def unread(self) -> bool:
        """Whether bytes we sent still sit unread in the pipe (Linux: TIOCOUTQ/SIOCOUTQ on
        the socketpair). True means no ML process has read our request."""
        outq = array.array("i", [0])
        try:
            fcntl.ioctl(self.conn.fileno(), termios.TIOCOUTQ, outq, True)
        except OSError:
            return self.slot is None  # elsewhere: what we know from the Attached message
        return outq[0] > 0


_after_fork: weakref.WeakSet[Caller] = weakref.WeakSet()


def _reset_callers_after_fork() -> None:
    for caller in list(_after_fork):
        caller._reset_after_fork()


os.register_at_fork(after_in_child=_reset_callers_after_fork)


class Admission:
    """A place among the ``max_inflight`` calls in flight; release it with ``with`` or
    :meth:`release`. Made by :meth:`Caller.admit` (``MLProcess.admit()``)."""

    __slots__ = ("_caller", "_released")

    def __init__(self, caller: Caller) -> None:
        self._caller = caller
        self._released = False

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any], *,
             timeout: float | None = None, deadline: float | None = None,
             cancel_if: Callable[[], bool] | None = None, trace: str | None = None
             ) -> CallResult:
        """Run one call in the ML process; see :meth:`MLProcess.call`. ``trace``: the W3C
        traceparent of a traced request (see :attr:`CallResult.links`)."""
        if self._released:
            raise RuntimeError("this admission was released; admit() again")
        return self._caller._call(args, kwargs, self._caller._deadline(timeout, deadline),
                                  cancel_if, trace=trace)

    def call_batch(self, items: list[Any], *, timeout: float | None = None,
                   deadline: float | None = None,
                   cancel_if: Callable[[], bool] | None = None,
                   trace: str | None = None) -> CallResult:
        """Run one batch request in the ML process (its value: one result per item); see
        :meth:`MLProcess.call_batch`.

        Raises:
            InputError: ``items`` is not a non-empty list (nothing is sent); and the errors
                of :meth:`call`.
        """
        if self._released:
            raise RuntimeError("this admission was released; admit() again")
        if not isinstance(items, list) or not items:
            got = "an empty list" if isinstance(items, list) else type(items).__name__
            raise InputError(f"a batch request needs a non-empty list of items, got {got}")
        return self._caller._call((), {}, self._caller._deadline(timeout, deadline), cancel_if,
                                  items, trace=trace)

    def stream(self, args: tuple[Any, ...], kwargs: dict[str, Any], *,
               timeout: float | None = None, deadline: float | None = None,
               idle_timeout: float | None = None, cancel_if: Callable[[], bool] | None = None,
               release_at_end: bool = False, trace: str | None = None) -> Stream:
        """The items of one call as they are made; see :meth:`MLProcess.stream`.

        ``release_at_end``: this admission is released when the stream ends or is closed
        (for a stream that outlives the code that opened it, e.g. an HTTP response).
        """
        if self._released:
            raise RuntimeError("this admission was released; admit() again")
        caller = self._caller
        idle = caller._config.timeout if idle_timeout is None else idle_timeout
        if not idle > 0:
            raise InputError(f"idle_timeout must be > 0, got {idle_timeout!r}")
        return Stream(caller, args, kwargs, caller._deadline(timeout, deadline), idle, cancel_if,
                      self.release if release_at_end else None, trace)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._caller._release()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


class Caller:
    """Client side of one MLProcess inside one (web) process. Thread-safe."""

    def __init__(self, ctx: Any, plumbing: Plumbing) -> None:
        self._ctx = ctx
        self._queue = plumbing.queue
        self._status = plumbing.status
        self._config = plumbing.config
        self._name = plumbing.name
        self._channel_ids = itertools.count(1)
        self._gate = Gate(self._config.estimate_factor)
        self._reset_after_fork()  # the per-process state: locks, counters, channels
        # A web process forked after start() (gunicorn with preload_app) shares the queue
        # and the status block, but must not inherit this process's locks, counters or
        # channels: a lock held by another thread at fork time would never be released.
        _after_fork.add(self)

    def _reset_after_fork(self) -> None:
        self._local = threading.local()
        self._cond = threading.Condition()
        self._inflight = 0
        self._stop_waiting = False
        self._count_field: int | None = None  # this process's field in the status block
        self._count_pid = 0

    @property
    def inflight(self) -> int:
        """Admitted calls not yet released, in this process."""
        return self._inflight

    # -- channels ----------------------------------------------------------------------
    def _channel(self) -> _Channel:
        channel: _Channel | None = getattr(self._local, "channel", None)
        if channel is not None and channel.pid == os.getpid():
            return channel
        mine, theirs = self._ctx.Pipe(duplex=True)
        crashes = self._status.crashes
        handovers = self._status.handovers_failed
        try:
            self._queue.put(Attach(theirs, f"{os.getpid()}-{next(self._channel_ids)}"))
        finally:
            # Pickling dup'ed the end; keep no copy, or we would never see EOF from it.
            theirs.close()
        channel = _Channel(mine, crashes, handovers)
        self._local.channel = channel
        return channel

    def _discard(self, channel: _Channel) -> None:
        # A reply that arrived but will never be read may name a shared-memory segment.
        try:
            while channel.conn.poll(0):
                shm.discard(shm.segment_of(channel.conn.recv_bytes()))
        except (EOFError, OSError):
            pass
        channel.conn.close()
        channel.mailbox.close()
        if getattr(self._local, "channel", None) is channel:
            self._local.channel = None

    def close_thread_channel(self) -> None:
        """Close this thread's channel (the next call makes a new one)."""
        channel = getattr(self._local, "channel", None)
        if channel is not None:
            self._discard(channel)

    # -- admission ---------------------------------------------------------------------
    def _unavailable(self, admitting: bool = True) -> WorkerUnavailableError | None:
        """Why no call can be taken now, or None. Draining refuses new calls only
        (``admitting``): calls admitted before it began are answered."""
        status = self._status
        if admitting and status.draining:
            return WorkerUnavailableError(f"model {self._name!r} is shutting down")
        if status.circuit_open:
            wait = max(0.0, status.next_start - time.monotonic())
            error = WorkerUnavailableError(
                f"model {self._name!r} is unavailable: its ML process crashed "
                f"{status.consecutive_crashes} times in a row; the next restart is in {wait:.1f}s")
            error.retry_after = max(1.0, wait)
            return error
        if status.all_stopped():
            return WorkerUnavailableError(
                f"model {self._name!r} is not running. Did you call start() or use the "
                "MLProcess as a context manager?")
        return None

    def admit(self, deadline: float | None = None) -> Admission:
        """Take a place among the calls in flight.

        Args:
            deadline: the call's ``time.monotonic()`` deadline, if known: a call that the
                estimate says would be answered after it is refused now rather than
                timing out later. None: only the ``max_inflight`` cap applies.

        Raises:
            OverloadedError: ``max_inflight`` calls are in flight already (``reason``
                ``"inflight"``), or the calls ahead would take it past its deadline
                (``"estimate"``, with ``retry_after`` the estimated time until there is room).
            WorkerUnavailableError: shutting down, stopped, or the circuit is open.
        """
        error = self._unavailable()
        if error is not None:
            raise error
        with self._cond:
            # The cap first: it is the hard bound, costs one comparison, and under a flood it
            # refuses without reading the status block.
            if self._inflight >= self._config.max_inflight:
                raise OverloadedError(
                    f"model {self._name!r} has {self._inflight} requests in flight "
                    f"(max_inflight={self._config.max_inflight}); retry later")
            # Counted and published before the estimate: an ML process gathering a batch
            # learns this call is coming as early as without one, and an admission racing in
            # another web process sees it.
            self._inflight += 1
            self._publish_inflight()
            if deadline is not None and self._gate.enabled:
                # Under the lock: a burst of threads must each see the calls admitted before
                # it, or all of them would see the same short queue.
                ahead = self._ahead()
                if ahead:  # nothing ahead is never refused: skip reading the paces
                    refusal = self._gate.check(ahead, self._status.paces(), deadline)
                    if refusal is not None:
                        self._release()  # (the lock is re-entrant)
                        raise refusal.error(self._name)
        return Admission(self)

    def _ahead(self) -> int:
        """Calls in flight before the one just counted: every web process's (the status
        block), at least this process's own (its count is not published when no field was
        free)."""
        return max(self._inflight, self._status.callers_inflight()) - 1

    def deadline(self, timeout: float | None = None, deadline: float | None = None) -> float:
        """The ``time.monotonic()`` deadline of a call given ``timeout`` seconds from now
        (default ``config.timeout``) or an absolute ``deadline``.

        Raises:
            InputError: ``timeout`` is not > 0.
        """
        return self._deadline(timeout, deadline)

    def _publish_inflight(self) -> None:
        """Store this process's in-flight count where the ML processes read it (their
        batch waits only for calls known to be on their way). Called under ``_cond``."""
        pid = os.getpid()
        if self._count_pid != pid:
            self._count_pid = pid
            lock = getattr(self._queue, "_wlock", None)  # shared by every caller process
            self._count_field = None if lock is None else self._status.claim_caller(pid, lock)
        if self._count_field is not None:
            self._status.set_caller_inflight(self._count_field, self._inflight)

    def _release(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._publish_inflight()
            if self._inflight == 0:
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no call is in flight (True), or ``timeout`` passes or
        :meth:`stop_waiting` is called (False)."""
        with self._cond:
            self._cond.wait_for(lambda: self._inflight == 0 or self._stop_waiting, timeout)
            return self._inflight == 0

    def stop_waiting(self) -> None:
        """Make :meth:`wait_idle` return now (a forced stop)."""
        with self._cond:
            self._stop_waiting = True
            self._cond.notify_all()

    def _deadline(self, timeout: float | None, deadline: float | None) -> float:
        if deadline is not None:
            return deadline
        timeout = self._config.timeout if timeout is None else timeout
        if not timeout > 0:
            raise InputError(f"timeout must be > 0, got {timeout!r}")
        return time.monotonic() + timeout

    # -- the call ----------------------------------------------------------------------
    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float,
              cancel_if: Callable[[], bool] | None = None,
              items: list[Any] | None = None, trace: str | None = None) -> CallResult:
        channel, request, message = self._open(args, kwargs, deadline, cancel_if, items, trace)
        if isinstance(message, Reply):
            return _result(message)
        # A streaming model called for one answer: the answer is the list of its items.
        items = []
        while isinstance(message, StreamItem):
            items.append(message.value)
            message = self._next(channel, request, time.monotonic() + self._config.timeout, cancel_if)
        _raise_end(message)
        return CallResult(items)

    def _next(self, channel: _Channel, request: Request, deadline: float,
              cancel_if: Callable[[], bool] | None) -> Any:
        """The next message of a request whose first message came (its channel is attached)."""
        message = self._wait(channel, request, deadline, cancel_if)
        assert message is not None  # only an unattached channel can be lost unread
        return message

    def _open(self, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float,
              cancel_if: Callable[[], bool] | None,
              items: list[Any] | None = None, trace: str | None = None
              ) -> tuple[_Channel, Request, Any]:
        """Send one request (a batch request when ``items`` is given); its channel, the
        request and the first message about it (a Reply, a StreamItem or a StreamEnd)."""
        if deadline <= time.monotonic():
            raise QueueDeadlineError("the request's deadline passed before it was sent to "
                                     "the ML process; it was not computed")
        error = self._unavailable(admitting=False)
        if error is not None:  # e.g. the circuit opened while this call was being decoded
            raise error
        channel = self._channel()
        if channel.slot is not None and self._status.generation(channel.slot) != channel.generation:
            # The process behind this channel died since our last call: nothing of ours
            # was in flight there, so take a new channel instead of failing this call.
            self._discard(channel)
            channel = self._channel()
        elif channel.slot is not None and self._status.workers > 1 and self._should_move(channel.slot):
            # Our channel's process is busy while another sits idle: a new channel goes
            # through the shared queue, where the idle process is waiting to take it.
            self._discard(channel)
            channel = self._channel()
        lost_handovers = 0  # fresh channels in a row that no ML process could take
        while True:
            request = Request(next(channel.ids), deadline, args, kwargs, items, trace)
            try:
                data = channel.mailbox.dumps(request, self._config.shm_threshold, request.id)
            except Exception as exc:
                raise InputError(f"the input cannot be sent to the ML process: it is not "
                                 f"picklable ({type(exc).__name__}: {exc})") from None
            message = None
            try:
                try:
                    channel.conn.send_bytes(data)
                except (BrokenPipeError, OSError):
                    # The process that held this channel is gone; nothing was sent. A new
                    # channel reaches whichever process serves the queue now (the message
                    # again, through the new channel's own shared memory).
                    self._discard(channel)
                    channel = self._channel()
                    request = Request(next(channel.ids), deadline, args, kwargs, items, trace)
                    channel.conn.send_bytes(channel.mailbox.dumps(
                        request, self._config.shm_threshold, request.id))
                message = self._wait(channel, request, deadline, cancel_if)
            finally:
                if message is None:
                    # No answer: the ML process may still read this request later, so the
                    # next one must not overwrite its shared memory.
                    channel.mailbox.abandon()
            if message is not None:
                return channel, request, message
            # Our channel was lost with an ML process before any process read it, or the
            # ML process could not take it: send the request again on a fresh channel (it
            # was never computed), a bounded number of times for a failed hand-over.
            lost_handovers = lost_handovers + 1 if channel.handover_failed else 0
            if lost_handovers >= _HANDOVER_TRIES:
                raise WorkerUnavailableError(
                    f"model {self._name!r}: the ML process could not take this request's "
                    f"channel {lost_handovers} times in a row (the pipe hand-over failed; see "
                    "the server log); it was not computed, retry shortly")
            channel = self._channel()

    def _should_move(self, slot: int) -> bool:
        status = self._status
        if not status.busy_since(slot):
            return False
        return any(other != slot and not status.busy_since(other) and status.state(other) is State.READY
                   for other in range(status.workers))

    def _crashed(self, channel: _Channel) -> WorkerCrashedError:
        """The error of a call whose ML process ended with it in flight: 502 whether the
        process crashed or was stopped after the grace of a shutdown or reload (the call
        reached it and may have been computed in part; 503 is only for calls no ML process
        took, which a balancer may send elsewhere)."""
        self._discard(channel)
        if self._status.stopping:
            return WorkerCrashedError(
                f"model {self._name!r} was stopped (a reload or a shutdown, after its grace "
                "period) while this request was in flight; it may have been computed in part. "
                "Retry if a second run does no harm")
        slot = channel.slot if channel.slot is not None else 0
        # EOF can reach us before the supervisor has reaped the process: give it a moment
        # to record the exit code (it bumps the generation after writing the code).
        give_up = time.monotonic() + _EXITCODE_WAIT
        tick = threading.Event()
        while self._status.generation(slot) == channel.generation and time.monotonic() < give_up:
            tick.wait(0.005)
        exitcode = self._status.exitcode(slot) if self._status.generation(slot) != channel.generation else None
        error = WorkerCrashedError(
            f"the ML process of model {self._name!r} {describe_exit(exitcode)} while this "
            "request was in flight; it is being restarted, retry shortly", exitcode)
        if self._status.circuit_open:
            error.retry_after = max(1.0, self._status.next_start - time.monotonic())
        return error

    def _lost_unattached(self, channel: _Channel, patience: float = 0.0) -> bool:
        """Whether a channel no ML process attached may be lost, so its request (never read)
        is to be sent again on a fresh channel; if so the channel is closed. Lost when, since
        its Attach was queued, an ML process took a queue message it could not decode (a
        failed fd transfer: if it was ours, no process will ever serve the channel) or an ML
        process died (it may have taken our end with it). If our end is still queued, the
        process that takes it later finds our side closed and drops it.

        ``patience``: seconds to wait for either count to change (after an EOF: the ML
        process or the supervisor counts it just after our end was closed)."""
        status = self._status
        give_up = time.monotonic() + patience
        tick: threading.Event | None = None  # made only to wait (this runs every poll slice)
        while True:
            if status.handovers_failed != channel.handovers_at_attach:
                channel.handover_failed = True  # bounded by the caller (_HANDOVER_TRIES)
                break
            if status.crashes != channel.crashes_at_attach:
                break
            if time.monotonic() >= give_up:
                return False
            tick = tick or threading.Event()
            tick.wait(0.005)
        self._discard(channel)
        return True

    def _cancel(self, channel: _Channel, request: Request, reason: str) -> None:
        """Tell the ML process nobody waits for ``request``; the channel stays usable (a
        late reply carries the old id and is dropped)."""
        try:
            channel.conn.send_bytes(ForkingPickler.dumps(Cancel(request.id, reason)))
        except (BrokenPipeError, OSError):
            self._discard(channel)

    def _timed_out(self, channel: _Channel, request: Request) -> QueueDeadlineError | ResultDeadlineError:
        # Ask the pipe, not our bookkeeping: a request on a reused channel that the ML process
        # never read was never taken, even though the channel was attached long ago.
        unread = channel.unread()
        self._cancel(channel, request, "deadline")  # the ML process stops working on it
        if unread:
            return QueueDeadlineError("the request's deadline passed before an ML process took "
                                      "it; it was not computed")
        return ResultDeadlineError("the request's deadline passed before the ML process "
                                   "answered; its work there was cancelled")

    def _wait(self, channel: _Channel, request: Request, deadline: float,
              cancel_if: Callable[[], bool] | None) -> Any:
        """The next message about ``request`` (Reply, StreamItem or StreamEnd); None when
        the channel was lost unread with a dead ML process and the request should be sent
        again."""
        conn = channel.conn
        status = self._status
        slice_ = self._config.poll_interval
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out(channel, request)
            if cancel_if is not None and cancel_if():
                self._cancel(channel, request, "disconnect")
                raise RequestCancelledError("the client stopped waiting; the request was "
                                            "cancelled")
            try:
                readable = channel.poller.poll(min(remaining, slice_) * 1000.0)
                data = conn.recv_bytes() if readable else None
            except (EOFError, OSError):
                # EOF before any Attached: no ML process read our request (a process sends
                # Attached before it reads a channel). Our end was lost on its way to one.
                if channel.slot is None and self._lost_unattached(channel, _EXITCODE_WAIT):
                    return None
                raise self._crashed(channel) from None
            if data is None:
                if channel.slot is not None:
                    if status.generation(channel.slot) != channel.generation:
                        raise self._crashed(channel)
                    continue
                # Not attached yet: our Attach is still queued, or a process took it off the
                # queue and died before it could attach (no EOF comes then: the resource
                # sharer keeps a copy of the end). After a death, send again; the stale end,
                # if still queued, is dropped by the ML process that attaches it, because we
                # close our side.
                error = self._unavailable(admitting=False)
                if error is not None:
                    self._discard(channel)
                    if status.stopping:  # admitted, then the model stopped: say so
                        error = WorkerUnavailableError(
                            f"model {self._name!r} was stopped before an ML process took this "
                            "request; it was not computed, retry shortly")
                    raise error
                if self._lost_unattached(channel):
                    return None
                continue
            try:
                message = channel.mailbox.loads(data, expect=request.id)
            except FileNotFoundError:
                # The reply's shared-memory segment was swept: its ML process died right
                # after sending it (the supervisor removes a dead process's segments).
                raise self._crashed(channel) from None
            except Exception as exc:
                self._discard(channel)
                raise ModelError(f"the model's result could not be read in the web process: "
                                 f"{type(exc).__name__}: {exc}", remote_type=type(exc).__name__) from None
            if isinstance(message, Attached):
                channel.slot = message.slot
                channel.generation = message.generation
                continue
            if not isinstance(message, (Reply, StreamItem, StreamEnd)) or \
                    message.id not in (request.id, None):
                # Normal after a cancel: the reply to a request nobody waited for any more.
                logger.debug("dropped a stale or unexpected message on a channel: %r",
                             type(message).__name__)
                continue
            return message


def _raise(failure: BaseException) -> None:
    if isinstance(failure, ModelError) and failure.remote_traceback:
        raise failure from RemoteTraceback(failure.remote_traceback)
    raise failure


def _result(reply: Reply) -> CallResult:
    if reply.error is not None:
        _raise(reply.error)
    return CallResult(reply.value, reply.queue_wait, reply.inference_time, reply.batch_size,
                      reply.started, reply.links)


def _raise_end(end: StreamEnd) -> None:
    if end.error is not None:
        _raise(end.error)


class Stream:
    """The items of one call, as the ML process makes them; made by :meth:`Admission.stream`
    (``MLProcess.stream()``).

    Iterate it. A model whose ``predict`` returns a generator streams every item; any other
    model gives one item, its answer (``streaming`` is False). The stream ends exactly once:
    after the last item, or with the error that ended it (a crash, the model raising, the
    deadline for the first item or the idle time between items). :meth:`close` before the
    end cancels the rest in the ML process (the generator stops at its next ``yield``).
    """

    def __init__(self, caller: Caller, args: tuple[Any, ...], kwargs: dict[str, Any],
                 deadline: float, idle_timeout: float, cancel_if: Callable[[], bool] | None,
                 on_end: Callable[[], None] | None = None, trace: str | None = None) -> None:
        self._caller = caller
        self._args, self._kwargs = args, kwargs
        self._trace = trace
        self._deadline = deadline
        self._idle = idle_timeout
        self._cancel_if = cancel_if
        self._on_end = on_end
        self._channel: _Channel | None = None
        self._request: Request | None = None
        self._done = False
        self._unary: Reply | None = None
        #: None until the first item came; then whether the model streams.
        self.streaming: bool | None = None
        #: items received so far
        self.count = 0

    def __iter__(self) -> Stream:
        return self

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        try:
            if self._request is None:
                self._channel, self._request, message = self._caller._open(
                    self._args, self._kwargs, self._deadline, self._cancel_if,
                    trace=self._trace)
            elif self._unary is not None:
                raise StopIteration  # the one answer was given
            else:
                assert self._channel is not None
                message = self._caller._next(self._channel, self._request,
                                             time.monotonic() + self._idle, self._cancel_if)
        except BaseException:
            self._finish()
            raise
        if isinstance(message, StreamItem):
            self.streaming = True
            self.count += 1
            return message.value
        if isinstance(message, Reply):
            self.streaming = False
            self._unary = message
            try:
                value = _result(message).value
            except BaseException:
                self._finish()
                raise
            self.count = 1
            return value
        self.streaming = bool(self.streaming)
        self._finish()
        _raise_end(message)
        raise StopIteration

    @property
    def result(self) -> CallResult | None:
        """For a model that does not stream, after its item came: the answer with its
        timings (as :meth:`MLProcess.call` gives it); None for a streaming model."""
        return None if self._unary is None else _result(self._unary)

    def close(self) -> None:
        """Stop early: the rest is cancelled in the ML process. Safe to call twice."""
        if self._done:
            return
        if self._request is not None and self._unary is None and self._channel is not None:
            self._caller._cancel(self._channel, self._request, "disconnect")
        self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            if self._on_end is not None:
                self._on_end()
