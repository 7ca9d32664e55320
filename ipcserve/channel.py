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
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any

from . import shm
from .config import Config
from .errors import (
    InputError,
    ModelError,
    OverloadedError,
    QueueDeadlineError,
    ResultDeadlineError,
    WorkerCrashedError,
    WorkerUnavailableError,
)
from .protocol import Attach, Attached, Reply, Request
from .status import State, StatusBlock

__all__ = ["Caller", "CallStats"]

logger = logging.getLogger(__name__)


class RemoteTraceback(Exception):
    """Carries the ML process's formatted traceback as the ``__cause__`` of a ModelError."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.tb}\"\"\""


class _Channel:
    """One thread's persistent pipe to whichever ML process took its other end."""

    __slots__ = ("conn", "poller", "pid", "slot", "generation", "ids")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        # A poll object made once: Connection.poll() builds a new selector on every call.
        self.poller = select.poll()
        self.poller.register(conn.fileno(), select.POLLIN)
        self.pid = os.getpid()
        self.slot: int | None = None  # set by the ML process's Attached message
        self.generation = -1
        self.ids = itertools.count(1)


class CallStats:
    """Timings of one answered call, for metrics."""

    __slots__ = ("queue_wait", "inference_time", "batch_size")

    def __init__(self, reply: Reply) -> None:
        self.queue_wait = reply.queue_wait
        self.inference_time = reply.inference_time
        self.batch_size = reply.batch_size


_after_fork: weakref.WeakSet[Caller] = weakref.WeakSet()


def _reset_callers_after_fork() -> None:
    for caller in list(_after_fork):
        caller._reset_after_fork()


os.register_at_fork(after_in_child=_reset_callers_after_fork)


def describe_exit(exitcode: int | None) -> str:
    """A readable cause for a process exit code."""
    if exitcode is None:
        return "exited (exit code not yet known)"
    if exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-exitcode} ({name})"
    return f"exited with code {exitcode}"


class Caller:
    """Client side of one MLProcess inside one (web) process. Thread-safe."""

    def __init__(self, ctx: Any, queue: Any, status: StatusBlock, config: Config, name: str) -> None:
        self._ctx = ctx
        self._queue = queue
        self._status = status
        self._config = config
        self._name = name
        self._channel_ids = itertools.count(1)
        self._reset_after_fork()  # the per-process state: locks, counters, channels
        # A web process forked after start() (gunicorn with preload_app) shares the queue
        # and the status block, but must not inherit this process's locks, counters or
        # channels: a lock held by another thread at fork time would never be released.
        _after_fork.add(self)

    def _reset_after_fork(self) -> None:
        self._local = threading.local()
        self.last_stats: threading.local = threading.local()
        self._cond = threading.Condition()
        self._inflight = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    # -- channels ----------------------------------------------------------------------
    def _channel(self) -> _Channel:
        channel: _Channel | None = getattr(self._local, "channel", None)
        if channel is not None and channel.pid == os.getpid():
            return channel
        mine, theirs = self._ctx.Pipe(duplex=True)
        try:
            self._queue.put(Attach(theirs, f"{os.getpid()}-{next(self._channel_ids)}"))
        finally:
            # Pickling dup'ed the end; keep no copy, or we would never see EOF from it.
            theirs.close()
        channel = _Channel(mine)
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
        if getattr(self._local, "channel", None) is channel:
            self._local.channel = None

    def close_thread_channel(self) -> None:
        """Close this thread's channel (the next call makes a new one)."""
        channel = getattr(self._local, "channel", None)
        if channel is not None:
            self._discard(channel)

    # -- admission ---------------------------------------------------------------------
    def _admit(self) -> None:
        status = self._status
        if status.draining:
            raise WorkerUnavailableError(f"model {self._name!r} is shutting down")
        if status.circuit_open:
            wait = max(0.0, status.next_start - time.monotonic())
            error = WorkerUnavailableError(
                f"model {self._name!r} is unavailable: its ML process crashed "
                f"{status.consecutive_crashes} times in a row; the next restart is in {wait:.1f}s")
            error.retry_after = max(1.0, wait)
            raise error
        if status.all_stopped():
            raise WorkerUnavailableError(
                f"model {self._name!r} is not running. Did you call start() or use the "
                "MLProcess as a context manager?")
        with self._cond:
            if self._inflight >= self._config.max_inflight:
                raise OverloadedError(
                    f"model {self._name!r} has {self._inflight} requests in flight "
                    f"(max_inflight={self._config.max_inflight}); retry later")
            self._inflight += 1

    def _release(self) -> None:
        with self._cond:
            self._inflight -= 1
            if self._inflight == 0:
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no call is in flight (True) or ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._inflight == 0, timeout)

    # -- the call ----------------------------------------------------------------------
    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        timeout = self._config.timeout if timeout is None else timeout
        if timeout <= 0:
            raise InputError(f"timeout must be > 0, got {timeout!r}")
        deadline = time.monotonic() + timeout
        self._admit()
        try:
            return self._call(args, kwargs, deadline)
        finally:
            self._release()

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float) -> Any:
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
        request = Request(next(channel.ids), deadline, args, kwargs)
        try:
            data, segment = shm.dumps(request, self._config.shm_threshold)
        except Exception as exc:
            raise InputError(f"the input cannot be sent to the ML process: it is not "
                             f"picklable ({type(exc).__name__}: {exc})") from None
        try:
            try:
                channel.conn.send_bytes(data)
            except (BrokenPipeError, OSError):
                # The process that held this channel is gone; nothing was sent. A new
                # channel reaches whichever process serves the queue now.
                self._discard(channel)
                channel = self._channel()
                channel.conn.send_bytes(data)
            return self._wait(channel, request, deadline)
        finally:
            shm.discard(segment)  # the ML process unlinked it already, unless it never read it

    def _should_move(self, slot: int) -> bool:
        status = self._status
        if not status.busy_since(slot):
            return False
        return any(other != slot and not status.busy_since(other) and status.state(other) is State.READY
                   for other in range(status.workers))

    def _crashed(self, channel: _Channel) -> WorkerCrashedError | WorkerUnavailableError:
        self._discard(channel)
        if self._status.draining:
            return WorkerUnavailableError(f"model {self._name!r} is shutting down")
        slot = channel.slot if channel.slot is not None else 0
        exitcode = self._status.exitcode(slot) if self._status.generation(slot) != channel.generation else None
        return WorkerCrashedError(
            f"the ML process of model {self._name!r} {describe_exit(exitcode)} while this "
            "request was in flight; it is being restarted, retry shortly", exitcode)

    def _wait(self, channel: _Channel, request: Request, deadline: float) -> Any:
        conn = channel.conn
        status = self._status
        slice_ = self._config.poll_interval
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._discard(channel)  # a late reply must never answer a later request
                if channel.slot is None:
                    raise QueueDeadlineError(
                        "the request's deadline passed before an ML process took it")
                raise ResultDeadlineError(
                    "the request's deadline passed before the ML process answered")
            try:
                readable = channel.poller.poll(min(remaining, slice_) * 1000.0)
                message = shm.loads(conn.recv_bytes()) if readable else None
            except (EOFError, OSError):
                raise self._crashed(channel) from None
            if message is None:
                if channel.slot is not None and status.generation(channel.slot) != channel.generation:
                    raise self._crashed(channel)
                if channel.slot is None and status.all_stopped():
                    self._discard(channel)
                    raise WorkerUnavailableError(f"model {self._name!r} stopped before an ML "
                                                 "process took the request")
                continue
            if isinstance(message, Attached):
                channel.slot = message.slot
                channel.generation = message.generation
                continue
            if not isinstance(message, Reply) or message.id not in (request.id, None):
                logger.warning("dropped a stale or unexpected message on a channel: %r",
                               type(message).__name__)
                continue
            self.last_stats.value = CallStats(message)
            if message.error is not None:
                error = message.error
                if isinstance(error, ModelError) and error.remote_traceback:
                    raise error from RemoteTraceback(error.remote_traceback)
                raise error
            return message.value
