"""Cancellation inside the ML process: work nobody waits for is not done.

A caller that stops waiting (its HTTP client disconnected, or the deadline passed) sends
:class:`~ipcserve.protocol.Cancel` on its channel. The ML process then:

* drops the request if it is still queued (read but not computed): it is never computed;
* interrupts a running ``predict`` / ``predict_batch`` whose *every* request is cancelled
  or past its deadline: :class:`Cancelled` is raised inside the model's Python code at the
  next bytecode boundary (the :class:`CancelWatch` thread signals the ML process's main
  thread with SIGUSR1, in the spirit of Cog). Inside a long native call it takes effect when
  control returns to Python; the watchdog stays the backstop. A batch with one live member
  is never interrupted: the cancelled members' results are discarded.

The watch thread looks at the running batch only after it has run for ``_FIRST_LOOK``
seconds, so short requests pay nothing: no wake-up, no syscall, no GIL hand-off.
A model that must not be interrupted sets ``interruptible = False``; any model can ask
``self.cancelled()`` and stop early on its own.
"""

from __future__ import annotations

import logging
import selectors
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from .protocol import Cancel

__all__ = ["CancelWatch", "Cancelled"]

logger = logging.getLogger(__name__)

# The watch thread's tick while a batch runs, and how long a batch runs before it looks.
_TICK = 0.005
_FIRST_LOOK = 0.005


class Cancelled(BaseException):
    """Raised inside ``predict`` when every request it computes was cancelled or expired.

    A BaseException, like ``KeyboardInterrupt``: model code that catches ``Exception`` does
    not swallow it. The ML process catches it and serves on.
    """


class _Running:
    """The batch the main thread is computing: what the watch thread may look at."""

    __slots__ = ("items", "started", "seq", "cancelled", "interrupted")

    def __init__(self, items: list[Any], started: float, seq: int) -> None:
        self.items = items  # _Pending objects: .conn, .request (id, deadline)
        self.started = started
        self.seq = seq
        self.cancelled: dict[int, str] = {}  # id(item) -> reason
        self.interrupted = False


class Undecoded:
    """A channel message the watch thread read but left for the main loop to decode."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class CancelWatch:
    """Watches the channels of the running batch for Cancel messages and deadlines.

    Args:
        interruptible: whether a fully cancelled batch may be interrupted (the model's
            ``interruptible`` attribute).
        on_other: called by the main thread (in :meth:`end`) for every other message the
            watch thread read off a running channel meanwhile: ``(conn, message, when)``,
            the message decoded (None for EOF, the exception if it did not decode).
    """

    def __init__(self, interruptible: bool,
                 on_other: Callable[[Connection, Any, float], None]) -> None:
        self.interruptible = interruptible
        self._on_other = on_other
        self._lock = threading.Lock()  # held while the watch thread reads a channel
        self._running: _Running | None = None
        self._armed = False  # the main thread is inside the model call
        self._seq = 0  # numbers the model calls, so a late signal never hits the next one
        self._kill_seq = -1
        self._stashed: list[tuple[Connection, Any, float]] = []
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread: threading.Thread | None = None

    # -- main thread ---------------------------------------------------------------------
    def start(self) -> None:
        if self.interruptible:
            signal.signal(signal.SIGUSR1, self._on_signal)
        self._thread = threading.Thread(target=self._run, name="ipcserve-cancel-watch",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def begin(self, items: list[Any]) -> None:
        """The main thread starts computing ``items``."""
        self._seq += 1
        self._running = _Running(items, time.monotonic(), self._seq)
        self._armed = True

    def end(self) -> dict[int, str]:
        """The model call returned (or raised). Returns ``{id(item): reason}`` of the items
        cancelled meanwhile, and hands stashed messages back to the main loop."""
        self._armed = False
        with self._lock:
            running, self._running = self._running, None
            stashed, self._stashed = self._stashed, []
        for conn, message, when in stashed:
            self._on_other(conn, message, when)
        return {} if running is None else running.cancelled

    def cancelled(self) -> bool:
        """For ``MLProcess.cancelled()``: every request of the running call is cancelled or
        past its deadline."""
        running = self._running
        return running is not None and self._all_gone(running, time.monotonic())

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs in the main thread between bytecodes; only inside the model call.
        if self._armed and self._kill_seq == self._seq:
            self._armed = False
            raise Cancelled("every request of this model call was cancelled")

    # -- watch thread --------------------------------------------------------------------
    @staticmethod
    def _all_gone(running: _Running, now: float) -> bool:
        return all(id(item) in running.cancelled or item.request.deadline <= now
                   for item in running.items)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        # id(conn) -> (conn, its fd), registered in the selector by fd with conn as data
        watched: dict[int, tuple[Connection, int]] = {}
        try:
            while not self._stop.wait(_TICK):
                running = self._running
                if running is None or time.monotonic() - running.started < _FIRST_LOOK:
                    continue
                try:
                    self._look(running, selector, watched)
                except Exception:  # never let one bad look end cancellation for good
                    logger.exception("the cancel watch failed to look at the running call")
                    selector.close()
                    selector, watched = selectors.DefaultSelector(), {}
        finally:
            selector.close()

    def _look(self, running: _Running, selector: selectors.BaseSelector,
              watched: dict[int, tuple[Connection, int]]) -> None:
        conns = {id(item.conn): item.conn for item in running.items}
        for key in list(watched):
            if key not in conns or watched[key][0] is not conns[key]:
                # By fd: the channel may have been closed since (its caller went away), and
                # a closed Connection has no fileno() to unregister it by.
                try:
                    selector.unregister(watched.pop(key)[1])
                except (KeyError, ValueError):
                    pass
        for key, conn in conns.items():
            if key not in watched:
                try:
                    fd = conn.fileno()
                    try:
                        selector.register(fd, selectors.EVENT_READ, conn)
                    except KeyError:  # a closed channel's fd, reused by this one
                        selector.unregister(fd)
                        selector.register(fd, selectors.EVENT_READ, conn)
                except (KeyError, ValueError, OSError):
                    continue
                watched[key] = (conn, fd)
        ready = selector.select(0)
        with self._lock:
            if self._running is not running:
                return  # the call ended meanwhile; the main loop reads the channels now
            now = time.monotonic()
            for selected, _ in ready:
                self._read(running, selected.data, now)
            if (self.interruptible and self._armed and not running.interrupted
                    and self._all_gone(running, now)):
                running.interrupted = True
                self._kill_seq = running.seq
                assert self._main is not None
                signal.pthread_kill(self._main, signal.SIGUSR1)

    def _read(self, running: _Running, conn: Connection, now: float) -> None:
        from . import shm

        while True:
            try:
                if not conn.poll(0):
                    return
                data = conn.recv_bytes()
            except (EOFError, OSError):
                # The caller closed its channel: nobody waits for its request any more.
                for item in running.items:
                    if item.conn is conn:
                        running.cancelled.setdefault(id(item), "disconnect")
                self._stashed.append((conn, None, now))
                return
            try:
                message: Any = ForkingPickler.loads(data)
            except Exception as exc:
                message = exc
            if isinstance(message, shm.Segment):
                # A request with large buffers: the main loop decodes it later, through the
                # channel's mailbox (mapping it here would unlink a segment it reuses).
                message = Undecoded(data)
            if isinstance(message, Cancel):
                for item in running.items:
                    if item.conn is conn and item.request.id == message.id:
                        running.cancelled.setdefault(id(item), message.reason)
            else:
                self._stashed.append((conn, message, now))
