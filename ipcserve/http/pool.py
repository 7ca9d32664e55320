"""The model pool: versions loaded on demand, evicted when the pool is full, unloaded when
idle. No Flask import.

A version the pool manages (a lazy one, or one with ``idle_unload``) goes through::

    unloaded ──first request──► loading ──► loaded ──evicted / idle──► unloading ──► unloaded
                  (queued FIFO       │ failed                              (in-flight requests
                   while the pool    ▼                                       answered first)
                   is full)        failed ──after a backoff, the next request──► loading

* **Load on demand.** A request for a version that is not loaded waits (bounded by its own
  deadline: 504 when it passes, never admitted into a half-loaded model) while one thread
  loads it; requests that come meanwhile wait for the same load.
* **Eviction.** Before a load that would pass ``max_loaded_models`` (loaded, loading and
  unloading versions all count, those loaded at start too) or ``max_loaded_memory`` (the
  resident memory of the ML processes, read from ``/proc``), the least recently used *idle*
  lazy version is unloaded: no request in flight and none waiting for it. Its processes
  stop only after that, so no request is ever cut; while nothing is idle, loads wait in
  arrival order. Versions loaded at start (``load = "eager"``) count but are never evicted.
* **Idle unload.** A thread unloads a version nobody called for ``idle_unload`` seconds.

Requests are admitted under the pool's lock (:meth:`Pool.using`), so a version is never
evicted between the check that it is idle and a new admission. The lock is held only to
read the state and admit; loads and unloads run in their own threads.

Everything here is per web process: under gunicorn each worker would load its own copies,
so lazy models and eviction are for one web process (``ipcserve serve``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from ..engine import events
from ..engine.errors import (ConfigError, ConflictError, QueueDeadlineError,
                             WorkerUnavailableError)
from ..engine.mlprocess import MLProcess
from .versions import FAILED, LOADED, LOADING, UNLOADED, UNLOADING, Version

__all__ = ["Pool", "resident_bytes"]

logger = logging.getLogger(__name__)

# A waiting request re-checks the pool at least this often: a request that finished
# elsewhere may have made a version idle (finishing requests also notify at once).
_SLICE = 0.05
# After a failed load the next request tries again after this, doubling per failure in a
# row up to the maximum: a model that cannot load is not reloaded in a loop by traffic.
_RETRY_FIRST, _RETRY_MAX = 1.0, 60.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pids: Iterable[int]) -> int:
    """The resident memory of ``pids`` (``/proc/PID/statm``), in bytes; a process that is
    gone counts 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


class Pool:
    """Which versions are loaded, for the whole app."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.max_models: int | None = None
        self.max_memory: int | None = None
        self.versions: list[Version] = []
        self._pending: collections.deque[Version] = collections.deque()  # waiting for room
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def configure(self, max_models: int | None, max_memory: int | None) -> None:
        """Set the pool's limits (``max_loaded_models``, ``max_loaded_memory`` in bytes).

        Raises:
            ConfigError: a limit below 1.
        """
        for name, value in (("max_loaded_models", max_models), ("max_loaded_memory", max_memory)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 or none, got {value!r}")
        self.max_models, self.max_memory = max_models, max_memory

    def register(self, version: Version) -> None:
        """Track ``version`` (every version of every model is registered)."""
        with self._cond:
            self.versions.append(version)

    def managed(self, version: Version) -> bool:
        """True when the pool loads and unloads ``version``: a lazy one, or one with
        ``idle_unload`` (False: started at start and kept)."""
        return version.lazy or version.idle_unload is not None

    def check_start(self) -> None:
        """Before the eager versions start: they fit in ``max_loaded_models``.

        Raises:
            ConfigError: more versions load at start than the pool holds.
        """
        if self.max_models is None:
            return
        eager = [f"{v.model}/{v.label}" for v in self.versions if not v.lazy]
        # The lazy versions need at least one slot to take turns in.
        lazy = any(v.lazy for v in self.versions)
        if len(eager) > self.max_models - lazy:
            raise ConfigError(f"max_loaded_models is {self.max_models} but {len(eager)} model "
                              f"versions load at start and are kept ({', '.join(eager)})"
                              f"{', with no slot left for the lazy ones' if lazy else ''}; "
                              "make some lazy (load = \"lazy\") or raise the limit")

    # -- admission -----------------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, version: Version, deadline: float | None) -> Iterator[MLProcess]:
        """The version's MLProcess, loaded: admit inside the block (the pool's lock is held,
        so it cannot be evicted before the admission counts).

        Raises:
            QueueDeadlineError: ``deadline`` passed while it was loading or waiting for room.
            WorkerUnavailableError: its last load failed (retried after a backoff), or the
                server is shutting down.
        """
        if not self.managed(version):
            yield version.ml
            return
        with self._cond:
            version.waiting += 1
            try:
                while version.state != LOADED:
                    now = time.monotonic()
                    if self._closed:
                        raise WorkerUnavailableError("the server is shutting down")
                    if version.state == FAILED and now < version.retry_at:
                        error = WorkerUnavailableError(
                            f"model {version.model!r} (version {version.label}) failed to load "
                            f"({version.last_error}); the next try is in "
                            f"{version.retry_at - now:.0f} s")
                        error.retry_after = version.retry_at - now
                        raise error
                    if version.state in (UNLOADED, FAILED) and version not in self._pending:
                        self._pending.append(version)
                    self._schedule()
                    if version.state == LOADED:
                        break
                    if deadline is not None and now >= deadline:
                        raise QueueDeadlineError(
                            f"model {version.model!r} (version {version.label}) was "
                            f"{'loading' if version.state == LOADING else 'waiting for room in the model pool'}"
                            " when the request's deadline passed")
                    self._cond.wait(_SLICE if deadline is None else min(_SLICE, deadline - now))
                version.last_used = time.monotonic()
                yield version.ml
            finally:
                version.waiting -= 1

    def released(self, version: Version) -> None:
        """A request of ``version`` finished: it may be idle now (a load may be waiting)."""
        if not self.managed(version):
            return
        with self._cond:
            version.last_used = time.monotonic()
            if self._pending:
                self._schedule()
            self._cond.notify_all()

    def pin(self, version: Version) -> bool:
        """Keep ``version`` loaded (not evicted, not unloaded) until :meth:`unpin` (a
        reload replacing its ML processes). Returns True.

        Raises:
            ConflictError: the pool is loading or unloading it now.
        """
        with self._cond:
            if version.state in (LOADING, UNLOADING):
                raise ConflictError(f"model {version.model!r}: version {version.label} is being "
                                    f"{'loaded' if version.state == LOADING else 'unloaded'} by "
                                    "the model pool; try again when it is done")
            version.pinned += 1
            return True

    def unpin(self, version: Version) -> None:
        """Undo one :meth:`pin`."""
        with self._cond:
            version.pinned -= 1
            self._cond.notify_all()

    # -- loads and evictions (under the lock) ----------------------------------------------
    def _schedule(self) -> None:
        """Start the loads that fit, in arrival order, evicting idle versions for room."""
        while self._pending and not self._closed:
            version = self._pending[0]
            if version.state not in (UNLOADED, FAILED) or version.waiting == 0:
                self._pending.popleft()  # loaded meanwhile, or nobody waits for it any more
                continue
            if not self._fits(version):
                self._evict_for(version)
                return  # room comes when an unload finishes (it notifies)
            self._pending.popleft()
            version.state = LOADING
            self._spawn(self._load, version, f"ipcserve-load-{version.model}")

    def _slots(self) -> list[Version]:
        return [v for v in self.versions if v.state in (LOADING, LOADED, UNLOADING)]

    def _expected(self, version: Version) -> int:
        if version.rss is not None:
            return version.rss
        known = [v.rss for v in self.versions if v.rss is not None]
        return sum(known) // len(known) if known else 0

    def _need(self, version: Version) -> tuple[int, int]:
        """(versions, bytes) to free before ``version`` fits; 0 where it fits."""
        slots = self._slots()
        count = 0 if self.max_models is None else len(slots) + 1 - self.max_models
        memory = 0
        # Only lazy versions are ever evicted: with none loaded there is nothing to free, and
        # a version that does not fit in what the kept ones leave loads all the same.
        if self.max_memory is not None and any(v.lazy for v in slots):
            used = sum(self._expected(v) for v in slots)
            memory = used + self._expected(version) - self.max_memory
        return max(0, count), max(0, memory)

    def _fits(self, version: Version) -> bool:
        return self._need(version) == (0, 0)

    def _evict_for(self, version: Version) -> None:
        count, memory = self._need(version)
        unloading = [v for v in self.versions if v.state == UNLOADING]
        count -= len(unloading)
        memory -= sum(self._expected(v) for v in unloading)
        while count > 0 or memory > 0:
            victim = self._victim(version)
            if victim is None:
                return  # every loaded version is busy: wait until one is idle
            self._unload(victim, "evicted")
            count -= 1
            memory -= self._expected(victim)

    def _victim(self, wanted: Version) -> Version | None:
        idle = [v for v in self.versions if v is not wanted and v.lazy and v.state == LOADED
                and v.ml.started and not v.waiting and not v.pinned and not v.ml.inflight]
        return min(idle, key=lambda v: v.last_used, default=None)

    def _unload(self, version: Version, reason: str) -> None:
        version.state = UNLOADING
        version.ml.stop_admitting()
        self._spawn(self._stop_version, (version, reason), f"ipcserve-unload-{version.model}")

    def _spawn(self, target: Any, arg: Any, name: str) -> None:
        args = arg if isinstance(arg, tuple) else (arg,)
        thread = threading.Thread(target=self._run, args=(target, args), name=name, daemon=True)
        self._threads.add(thread)
        thread.start()

    def _run(self, target: Any, args: tuple[Any, ...]) -> None:
        try:
            target(*args)
        except Exception:  # a bug here must not leave waiters hanging: say so, wake them
            logger.exception("model pool: %s failed", getattr(target, "__name__", target))
        finally:
            with self._cond:
                self._threads.discard(threading.current_thread())
                self._cond.notify_all()

    # -- in their own threads ------------------------------------------------------------
    def _load(self, version: Version) -> None:
        ml = version.ml
        began = time.monotonic()
        try:
            ml.start()
        except BaseException as exc:
            with self._cond:
                closed = self._closed
                version.state = FAILED
                version.load_failures += 1
                streak = version.load_failures
                version.retry_at = time.monotonic() + min(_RETRY_MAX,
                                                          _RETRY_FIRST * 2 ** (streak - 1))
                version.last_error = str(exc)
                version.ml = ml.fresh()
                self._schedule()
                self._cond.notify_all()
            if closed:
                logger.info("model %s: %sload stopped by the shutdown", version.model,
                            version.named)
                return
            cause = getattr(exc, "remote_traceback", "")
            logger.error("model %s: %sfailed to load on demand: %s%s", version.model,
                         version.named, exc, f"\n{cause}" if cause else "")
            events.record("load-failed", version.model, f"{version.named}failed to load on "
                          f"demand: {exc}", version=version.label)
            return
        seconds = time.monotonic() - began
        rss = resident_bytes(ml.pids)
        with self._cond:
            version.state = LOADED
            version.unloaded_by = None
            version.loads["demand"] += 1
            version.load_failures = 0
            version.last_error = None
            version.rss = rss
            version.last_used = time.monotonic()
            self._cond.notify_all()
        logger.info("model %s: %sloaded on demand in %.2fs (%d MiB)", version.model,
                    version.named, seconds, rss >> 20)
        events.record("loaded", version.model, f"{version.named}loaded on demand in "
                      f"{seconds:.2f}s ({rss >> 20} MiB)", version=version.label,
                      seconds=round(seconds, 3), memory_bytes=rss)

    def _stop_version(self, version: Version, reason: str) -> None:
        ml = version.ml
        idle_for = time.monotonic() - version.last_used
        ml.shutdown(grace=ml.config.shutdown_grace)
        with self._cond:
            version.ml = ml.fresh()
            version.state = UNLOADED
            version.unloads[reason] += 1
            version.unloaded_by = reason
            self._schedule()
            self._cond.notify_all()
        if reason == "evicted":
            message = (f"{version.named}evicted to make room (least recently used, "
                       f"idle for {idle_for:.1f}s); it loads again on its next request")
            kind = "evicted"
        else:
            message = (f"{version.named}unloaded: no request for {idle_for:.1f}s "
                       f"(idle_unload {version.idle_unload:g}s); it loads again on its next "
                       "request")
            kind = "unloaded"
        logger.info("model %s: %s", version.model, message)
        events.record(kind, version.model, message, version=version.label)

    # -- idle unload -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the idle-unload thread if a version has ``idle_unload``."""
        idle = [v.idle_unload for v in self.versions if v.idle_unload is not None]
        if not idle or self._reaper is not None:
            return
        tick = min(5.0, max(_SLICE, min(idle) / 4))
        self._reaper = threading.Thread(target=self._reap, args=(tick,), daemon=True,
                                        name="ipcserve-idle-unload")
        self._reaper.start()

    def _reap(self, tick: float) -> None:
        while not self._stop.wait(tick):
            try:
                with self._cond:
                    now = time.monotonic()
                    for version in self.versions:
                        if version.idle_unload is not None and version.state == LOADED \
                                and version.ml.started and not version.waiting \
                                and not version.pinned and not version.ml.inflight \
                                and now - version.last_used > version.idle_unload:
                            self._unload(version, "idle")
            except Exception:  # the next tick tries again; say why this one failed
                logger.exception("model pool: the idle-unload check failed")

    # -- the end ---------------------------------------------------------------------------
    def close(self) -> list[threading.Thread]:
        """Stop loading and unloading: waiting requests get 503, the idle-unload thread
        ends. Returns the load and unload threads still running (a drain stops their
        MLProcesses, then joins them)."""
        self._stop.set()
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        if self._reaper is not None:
            self._reaper.join(10.0)
        return threads

    def counts(self) -> dict[str, Any]:
        """JSON-ready: the limits and what is loaded now."""
        with self._cond:
            slots = self._slots()
            loaded = [v for v in slots if v.state == LOADED and v.ml.started]
            return {"max_loaded_models": self.max_models, "max_loaded_memory": self.max_memory,
                    "loaded": len(loaded), "loading": sum(v.state == LOADING for v in slots),
                    "unloading": sum(v.state == UNLOADING for v in slots),
                    "waiting": len(self._pending),
                    "memory_bytes": resident_bytes(p for v in loaded for p in v.ml.pids)}
