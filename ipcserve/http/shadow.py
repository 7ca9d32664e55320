"""The shadow version: a copy of the traffic, answers compared and discarded. No Flask import.

::

    request answered 200 by a version ──► Shadow.submit(inputs, answer)   (never waits)
                                             │ bounded queue: full ──► counted "dropped"
                                             ▼
                              thread ipcserve-shadow-<model>: the shadow's MLProcess.call()
                                             │
                               agree / disagree (JSON, floats within the tolerance) / error

The copy is sent after the client's answer is made, from a thread of its own, so a slow or
failing shadow never delays or changes an answer; its answers are only compared. Streamed
answers are not copied (a stream is compared item by item by nobody): they count as
"skipped", like requests that came while the shadow version was not loaded.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Any

from ..engine.errors import ConfigError, IPCServeError
from .encode import to_jsonable
from .versions import Split

__all__ = ["RESULTS", "Shadow", "agree"]

logger = logging.getLogger(__name__)

#: How a copy ended: the ``result`` label of ipcserve_shadow_results_total.
RESULTS = ("agree", "disagree", "error", "dropped", "skipped")
# Copies waiting for the shadow; past this they are dropped (and counted), never queued
# without bound behind a slow shadow.
_QUEUE = 64
# At most one disagreement logged per this many seconds, with the count since.
_LOG_EVERY = 10.0


def agree(a: Any, b: Any, tolerance: float = 0.0) -> bool:
    """Whether two JSON-ready answers are the same: equal, numbers within ``tolerance``
    (relative or absolute), lists and objects element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(agree(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(agree(x, y, tolerance) for x, y in zip(a, b))
    return bool(a == b)


class Shadow:
    """Sends copies of a model's answered requests to its shadow version.

    Args:
        split: the model's versions (``split.shadow`` names the shadow).
        tolerance: how far numbers may differ and still agree (0: exactly equal).
    """

    def __init__(self, split: Split, tolerance: float = 1e-6) -> None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
                or not math.isfinite(tolerance) or tolerance < 0:
            raise ConfigError(f"shadow_tolerance must be a number >= 0, got {tolerance!r}")
        self.split = split
        self.tolerance = float(tolerance)
        self._queue: queue.Queue[tuple[str, Any, Any, Any] | None] = queue.Queue(_QUEUE)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._unlogged = 0
        self._logged_at = 0.0

    def submit(self, how: str, inputs: Any, answer: Any, streamed: bool = False) -> None:
        """Queue a copy of one answered request.

        Args:
            how: ``call`` (inputs: ``(args, kwargs)``) or ``batch`` (inputs: the items).
            inputs: what the answering version was given.
            answer: what it answered.
            streamed: the answer was a stream (not copied: counted as skipped).
        """
        version = self.split.versions.get(self.split.shadow or "")
        if version is None:
            return
        if streamed or self._stopped or not version.ml.started:
            self._count(version, "skipped")
            return
        try:
            self._queue.put_nowait((how, inputs, answer, version))
        except queue.Full:
            self._count(version, "dropped")
            self._log(f"a copy for the shadow version {version.label} was dropped: "
                      f"{_QUEUE} copies are already waiting for it")
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stopped:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name=f"ipcserve-shadow-{self.split.model}")
                    self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            how, inputs, answer, version = item
            try:
                if how == "batch":
                    got = version.ml.call_batch(inputs).value
                else:
                    got = version.ml.call(inputs[0], inputs[1]).value
                same = agree(to_jsonable(answer), to_jsonable(got), self.tolerance)
            except (IPCServeError, TypeError, ValueError) as exc:
                self._count(version, "error")
                self._log(f"the shadow version {version.label} failed: "
                          f"{type(exc).__name__}: {exc}")
                continue
            except Exception:  # a bug: say so, keep comparing
                self._count(version, "error")
                logger.exception("model %s: comparing the shadow's answer failed",
                                 self.split.model)
                continue
            self._count(version, "agree" if same else "disagree")
            if not same:
                self._log(f"the shadow version {version.label} answered differently: "
                          f"{_short(got)} instead of {_short(answer)}")

    def _count(self, version: Any, result: str) -> None:
        with self._lock:  # request threads and this one count: += is not atomic
            version.shadow_results[result] += 1

    def _log(self, message: str) -> None:
        """One line per ``_LOG_EVERY`` seconds at most (disagreements, failures and drops
        together), with the count since."""
        now = time.monotonic()
        with self._lock:
            self._unlogged += 1
            if now - self._logged_at < _LOG_EVERY:
                return
            more = self._unlogged - 1
            self._logged_at, self._unlogged = now, 0
        logger.warning("model %s: %s%s", self.split.model, message,
                       f" ({more} more since the last line)" if more else "")

    def stop(self) -> None:
        """Drop the copies not sent yet and tell the thread to end after the copy it is
        sending (a drain; :meth:`join` waits for it)."""
        with self._lock:
            self._stopped = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # a submit raced the flag; the thread ends at the sentinel anyway
            self._queue.put(None, timeout=1.0)

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the thread to end (after :meth:`stop`)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
