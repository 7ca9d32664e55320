"""Start, watch, restart and stop the ML processes of one MLProcess.

::

    caller threads ──Attach(pipe end)──► SimpleQueue ──► ML process(es) ── worker.py
          ▲   │ poll() slices                               │ heartbeat, busy_since
          │   └──── status block (shared memory) ◄──────────┤
          │                                                 │
          └────────────── Reply on the pipe ◄───────────────┘
                                         supervisor thread ─┘ waits on process sentinels

The supervisor thread (``ipcserve-supervisor-<name>``) blocks in one
``multiprocessing.connection.wait`` over every process's sentinel, every starting
process's ready pipe and a wake-up pipe, with a timeout that is the watchdog's tick. So:

* a death is seen at once; what the process started (its process group) is killed, the
  shared-memory segments it made are removed, the slot's generation is bumped in the status block (callers
  with requests in flight on that process fail fast) and a restart is scheduled with
  exponential backoff; after ``circuit_breaker_threshold`` crashes in a row the circuit
  opens and new requests are refused until a restarted process is ready;
* a process whose heartbeat is older than ``hang_timeout`` is killed (SIGKILL: a hung
  ``predict`` cannot be interrupted) and restarted the same way;
* ``shutdown()`` wakes it through the wake-up pipe; it exits and the caller's thread
  drains, sends one Shutdown sentinel per live process, joins and finally kills.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any

from . import events, shm
from .errors import IPCServeError, ModelError, WorkerUnavailableError, describe_exit
from .protocol import Shutdown
from .runtime import Plumbing, ServedModel
from .statusblock import State
from .worker import worker_main

__all__ = ["Supervisor"]

logger = logging.getLogger(__name__)

# A process that stayed ready this long without a crash resets the crash streak.
_STABLE_AFTER = 30.0
# After a supervisor tick raised: the wait before the next one (doubling, bounded), and
# how often a failure that repeats is logged and recorded as an event.
_FAILURE_BACKOFF = 0.1
_FAILURE_BACKOFF_MAX = 5.0
_FAILURE_LOG_EVERY = 60.0


class _Slot:
    """The supervisor's private view of one ML process slot."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Any = None
        self.ready: Connection | None = None  # open while the process is loading
        self.started = 0.0
        self.ready_at = 0.0
        self.served_at_ready = 0
        self.restart_at = 0.0  # > 0: a restart is scheduled for this monotonic time
        self.killed_for_hang = False


class Supervisor:
    """Owns the ML processes of one MLProcess in the process that called ``start()``."""

    def __init__(self, model: ServedModel, plumbing: Plumbing, ctx: Any) -> None:
        self._model = model
        self._plumbing = plumbing
        self._config = plumbing.config
        self._ctx = ctx
        self._queue = plumbing.queue
        self._status = plumbing.status
        self._token = plumbing.token
        self._name = plumbing.name
        self._slots = [_Slot(i) for i in range(self._config.workers)]
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards process start/kill against shutdown
        self._aborted = False  # set by abort_start(): shutdown() came while loading
        self._hurry = threading.Event()  # set by hurry(): stop() kills without waiting

    # -- starting ----------------------------------------------------------------------
    def _spawn(self, slot: _Slot, restart: bool = False) -> None:
        ready_r, ready_w = self._ctx.Pipe(duplex=False)
        generation = self._status.generation(slot.index)
        proc = self._ctx.Process(
            target=worker_main,
            args=(self._model, self._plumbing, slot.index, generation, ready_w, os.getpid()),
            name=f"ipcserve-worker-{self._name}-{slot.index}",
            daemon=True,
        )
        self._status.set_state(slot.index, State.STARTING)
        proc.start()
        ready_w.close()
        self._status.begin_incarnation(slot.index, proc.pid)
        slot.proc, slot.ready, slot.started = proc, ready_r, time.monotonic()
        slot.killed_for_hang = False
        slot.restart_at = 0.0
        logger.info("model %s: started ML process pid=%d slot=%d generation=%d",
                    self._name, proc.pid, slot.index, generation)
        events.record("restarted" if restart else "started", self._name,
                      f"{'restarted: new' if restart else 'started'} ML process pid={proc.pid} "
                      f"(slot {slot.index})", pid=proc.pid, slot=slot.index)

    def start(self) -> None:
        """Start every ML process and wait until all have loaded.

        Raises:
            ModelError: load() or warmup() raised in an ML process (with its traceback).
            WorkerUnavailableError: an ML process died or timed out while loading.
        """
        for slot in self._slots:
            self._spawn(slot)
        deadline = time.monotonic() + self._config.start_timeout
        try:
            for slot in self._slots:
                self._await_ready(slot, deadline)
        except BaseException:
            self._kill_all()
            for slot in self._slots:
                self._status.end_incarnation(slot.index, self._exitcode(slot), State.FAILED)
            raise
        self._thread = threading.Thread(target=self._run, name=f"ipcserve-supervisor-{self._name}",
                                        daemon=True)
        self._thread.start()

    def _exitcode(self, slot: _Slot) -> int | None:
        return None if slot.proc is None else slot.proc.exitcode

    def _await_ready(self, slot: _Slot, deadline: float) -> None:
        assert slot.ready is not None
        while True:
            if self._aborted:
                raise WorkerUnavailableError(f"model {self._name!r}: stopped while loading")
            remaining = max(0.0, deadline - time.monotonic())
            ready = wait([slot.ready, slot.proc.sentinel, self._wake_r], remaining)
            if not ready:
                raise WorkerUnavailableError(
                    f"model {self._name!r}: load() did not finish within start_timeout="
                    f"{self._config.start_timeout}s")
            if self._wake_r in ready:
                self._wake_r.recv_bytes()
                continue
            break
        self._on_ready_message(slot, raise_errors=True)

    def _on_ready_message(self, slot: _Slot, raise_errors: bool) -> None:
        """Handle the loading process's ready pipe: 'ready', a load error, or EOF."""
        assert slot.ready is not None
        try:
            message = slot.ready.recv() if slot.ready.poll(0) else None
        except (EOFError, OSError):
            message = None
        slot.ready.close()
        slot.ready = None
        if message and message[0] == "ready":
            slot.ready_at = time.monotonic()
            slot.served_at_ready = self._status.served(slot.index)
            if self._status.circuit_open:
                logger.warning("model %s: ML process ready again, closing the circuit", self._name)
                self._status.set_circuit(False)
            return
        if message and message[0] == "error":
            _, kind, text, tb = message
            logger.error("model %s: load() failed in ML process:\n%s", self._name, tb)
            error: IPCServeError = ModelError(f"the model failed to load: {kind}: {text}",
                                              remote_type=kind, remote_traceback=tb)
        else:
            slot.proc.join(5)
            error = WorkerUnavailableError(
                f"model {self._name!r}: the ML process {describe_exit(slot.proc.exitcode)} "
                "while loading")
        if raise_errors:
            raise error
        # A restarted process that fails to load counts as a crash; its exit is seen next.

    # -- watching ----------------------------------------------------------------------
    def _run(self) -> None:
        """Tick until stopped. A tick that raises must not end the thread: nobody would
        restart a crashed ML process or kill a hung one, while the status froze as it was.
        So it is logged, recorded as an event, counted, and makes the model not ready
        (readiness reads the status block) until a tick completes; the loop goes on after a
        short backoff. A failure that repeats every tick is logged once per
        ``_FAILURE_LOG_EVERY`` seconds, with the count since."""
        streak = 0
        unlogged = 0
        logged_at = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    self._tick()
                except Exception as exc:
                    streak += 1
                    unlogged += 1
                    self._status.record_supervisor_failure()
                    now = time.monotonic()
                    if streak == 1 or now - logged_at >= _FAILURE_LOG_EVERY:
                        logger.critical(
                            "model %s: the supervisor thread failed (%d time(s) since the last "
                            "report); the model is not ready until it recovers, retrying:\n%s",
                            self._name, unlogged, traceback.format_exc())
                        events.record("supervisor-failed", self._name,
                                      f"supervisor failed ({type(exc).__name__}: {exc}); not "
                                      "ready until it recovers", failures=unlogged)
                        unlogged, logged_at = 0, now
                    self._stopping.wait(min(_FAILURE_BACKOFF_MAX,
                                            _FAILURE_BACKOFF * 2 ** min(streak - 1, 16)))
                    continue
                if streak:
                    logger.warning("model %s: the supervisor thread recovered after %d failed "
                                   "tick(s)", self._name, streak)
                    events.record("supervisor-recovered", self._name,
                                  f"supervisor recovered after {streak} failed tick(s)",
                                  failures=streak)
                    self._status.supervisor_recovered()
                    streak = unlogged = 0
        except BaseException:  # e.g. SystemExit: still never silent, and never ready
            self._status.record_supervisor_failure()
            logger.critical("model %s: the supervisor thread stopped:\n%s", self._name,
                            traceback.format_exc())
            raise

    def _tick(self) -> None:
        now = time.monotonic()
        timeout = self._config.heartbeat_interval
        waitables: list[Any] = [self._wake_r]
        for slot in self._slots:
            if slot.proc is not None:
                waitables.append(slot.proc.sentinel)
                if slot.ready is not None:
                    waitables.append(slot.ready)
            elif slot.restart_at:
                timeout = min(timeout, max(0.0, slot.restart_at - now))
        ready = set(wait(waitables, timeout))
        if self._stopping.is_set():
            return
        if self._wake_r in ready:
            self._wake_r.recv_bytes()
        with self._lock:
            if self._stopping.is_set():
                return
            now = time.monotonic()
            for slot in self._slots:
                if slot.proc is None:
                    if slot.restart_at and now >= slot.restart_at:
                        self._restart(slot)
                    continue
                if slot.ready is not None and slot.ready in ready:
                    self._on_ready_message(slot, raise_errors=False)
                if slot.proc.sentinel in ready:
                    self._on_exit(slot)
                else:
                    self._watchdog(slot, now)
            lock = getattr(self._queue, "_wlock", None)
            if lock is not None:
                self._status.sweep_callers(lock)

    def _restart(self, slot: _Slot) -> None:
        self._status.count_restart(slot.index)
        self._status.set_next_start(0.0)
        try:
            self._spawn(slot, restart=True)
        except Exception as exc:  # e.g. out of memory or fds: try again later
            logger.error("model %s: could not start an ML process: %r", self._name, exc)
            self._schedule_restart(slot)

    def _on_exit(self, slot: _Slot) -> None:
        proc = slot.proc
        proc.join(1)
        exitcode = proc.exitcode
        self._reap_leftovers(proc.pid)
        hang = slot.killed_for_hang
        if slot.ready is not None:
            slot.ready.close()
            slot.ready = None
        slot.proc = None
        self._status.record_crash(hang, self._backoff(self._status.consecutive_crashes + 1))
        self._status.end_incarnation(slot.index, exitcode, State.RESTARTING)
        cause = "was killed by the watchdog after hanging" if hang else describe_exit(exitcode)
        logger.error("model %s: ML process pid=%d slot=%d %s (crash %d in a row)", self._name,
                     proc.pid, slot.index, cause, self._status.consecutive_crashes)
        events.record("hung-killed" if hang else "crashed", self._name,
                      f"ML process pid={proc.pid} {cause}", pid=proc.pid, slot=slot.index,
                      exitcode=exitcode)
        self._release_queue_lock()
        self._schedule_restart(slot)

    def _schedule_restart(self, slot: _Slot) -> None:
        streak = max(1, self._status.consecutive_crashes)
        delay = self._backoff(streak)
        slot.restart_at = time.monotonic() + delay
        self._status.set_next_start(slot.restart_at, delay)
        if streak >= self._config.circuit_breaker_threshold and not self._status.circuit_open:
            logger.error("model %s: %d crashes in a row, opening the circuit; next restart in %.1fs",
                         self._name, streak, delay)
            self._status.set_circuit(True)
            events.record("circuit-opened", self._name,
                          f"{streak} crashes in a row: circuit opened, next restart in "
                          f"{delay:.1f}s", crashes=streak)

    def _backoff(self, streak: int) -> float:
        """The restart delay after ``streak`` crashes in a row: doubling, capped."""
        return float(min(self._config.max_restart_backoff,
                         self._config.restart_backoff * 2 ** (max(1, streak) - 1)))

    def _release_queue_lock(self) -> None:
        """Free the queue's read lock if the dead process held it.

        Live ML processes hold it only for one non-blocking read (microseconds), so a lock
        still held after a generous wait belongs to the dead one. A SemLock-based Lock may
        be released by any process.
        """
        rlock = self._queue._rlock
        if rlock.acquire(timeout=0.5):
            rlock.release()
        else:
            logger.warning("model %s: the dead ML process held the queue lock; releasing it",
                           self._name)
            rlock.release()

    def _watchdog(self, slot: _Slot, now: float) -> None:
        index = slot.index
        if slot.ready is not None:
            if now - slot.started > self._config.start_timeout:
                logger.error("model %s: ML process pid=%d did not load within %.0fs; killing it",
                             self._name, slot.proc.pid, self._config.start_timeout)
                slot.killed_for_hang = True
                self._kill(slot.proc)
            return
        stalled = now - self._status.heartbeat(index)
        if stalled > self._config.hang_timeout and not slot.killed_for_hang:
            logger.error("model %s: ML process pid=%d made no progress for %.1fs "
                         "(hang_timeout=%.1fs); killing it", self._name, slot.proc.pid, stalled,
                         self._config.hang_timeout)
            slot.killed_for_hang = True
            self._kill(slot.proc)
            return
        if self._status.consecutive_crashes and (
                self._status.served(index) > slot.served_at_ready or now - slot.ready_at > _STABLE_AFTER):
            self._status.reset_consecutive()

    @staticmethod
    def _reap_leftovers(pid: int) -> None:
        """After ML process ``pid`` ended: kill what it started (its process group) and
        remove the shared-memory segments it made that nobody took over."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        swept = shm.sweep(pid)
        if swept:
            logger.info("removed %d shared-memory segment(s) left by ML process pid=%d", swept, pid)

    @staticmethod
    def _kill(proc: Any) -> None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -- stopping ----------------------------------------------------------------------
    def wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"")
        except OSError:
            pass

    def stop(self, timeout: float) -> None:
        """Stop watching, send one Shutdown per live process, join, then kill."""
        # First: a call whose process ends from now on was stopped, not crashed (its error
        # says so; the call may still have been computed in part, so 502 either way).
        self._status.set_stopping()
        with self._lock:
            self._stopping.set()
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(timeout, 1.0))
        live = [s for s in self._slots if s.proc is not None and s.proc.is_alive()]
        for _ in live:
            self._queue.put(Shutdown(self._token))
        deadline = time.monotonic() + timeout
        for slot in live:
            # Wait on the process's sentinel and on hurry()'s wake-up, whichever comes first.
            while not self._hurry.is_set():
                remaining = deadline - time.monotonic()
                ready = wait([slot.proc.sentinel, self._wake_r], max(0.0, remaining))
                if self._wake_r in ready:
                    self._wake_r.recv_bytes()
                if slot.proc.sentinel in ready or remaining <= 0:
                    break
            slot.proc.join(0 if self._hurry.is_set() else 1.0)
        for slot in live:
            if slot.proc.is_alive():
                logger.warning("model %s: ML process pid=%d did not stop in time; killing it",
                               self._name, slot.proc.pid)
                self._kill(slot.proc)  # SIGKILL: ML processes ignore SIGTERM and SIGINT
                slot.proc.join(5.0)
        for slot in self._slots:
            if slot.ready is not None:
                slot.ready.close()
            if slot.proc is not None:
                self._reap_leftovers(slot.proc.pid)
            self._status.end_incarnation(slot.index, self._exitcode(slot), State.STOPPED)
            slot.proc = None
        self._wake_r.close()
        self._wake_w.close()

    def hurry(self) -> None:
        """Make a stop() in progress kill the ML processes now instead of waiting."""
        self._hurry.set()
        self.wake()

    def abort_start(self) -> None:
        """Make a pending or future start() give up at once (its loading processes are
        killed); sticky, so it also works when called before start() spawned anything."""
        self._aborted = True
        self.wake()

    def _kill_all(self) -> None:
        for slot in self._slots:
            if slot.proc is not None and slot.proc.is_alive():
                self._kill(slot.proc)
                slot.proc.join(2.0)
            if slot.proc is not None:
                self._reap_leftovers(slot.proc.pid)
            if slot.ready is not None:
                slot.ready.close()
                slot.ready = None
