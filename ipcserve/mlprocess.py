"""MLProcess: a model loaded once in its own process, callable from any thread.

Two sides, kept apart on purpose:

* the ML-process side: ``load()``, ``warmup()``, ``predict()`` / ``predict_batch()`` - you
  override these; they run inside the ML process only;
* the caller side: ``ml(x)``, ``start()``, ``shutdown()``, ``status`` - these run wherever
  you hold the object. Calling the object never runs your ``predict`` in your process.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from .channel import Caller
from .config import Config
from .errors import ConfigError, WorkerUnavailableError
from .protocol import new_token
from .status import StatusBlock
from .supervisor import Supervisor

__all__ = ["MLProcess"]

logger = logging.getLogger(__name__)

_live: weakref.WeakSet[MLProcess] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    """At interpreter exit (Ctrl-C included), stop every MLProcess still running."""
    for ml in list(_live):
        try:
            ml.shutdown(grace=min(2.0, ml.config.shutdown_grace))
        except Exception:  # pragma: no cover - best effort at exit
            logger.exception("shutdown at exit failed")


class _Runtime:
    """Caller-side state; never pickled into the ML process."""

    def __init__(self, owner: MLProcess) -> None:
        config = owner.config
        self.ctx = multiprocessing.get_context(config.start_method)
        self.queue = self.ctx.SimpleQueue()
        self.status = StatusBlock(self.ctx, config.workers)
        self.token = new_token()
        self.caller = Caller(self.ctx, self.queue, self.status, config, owner.name)
        self.supervisor = Supervisor(owner, config, self.ctx, self.queue, self.status,
                                     self.token, owner.name)
        self.owner_pid = os.getpid()


class MLProcess:
    """A model served from a long-lived process. Subclass it or use :meth:`from_factory`.

    Example::

        class Doubler(MLProcess):
            def load(self):          # once, inside the ML process
                self.k = 2
            def predict(self, x):    # inside the ML process
                return x * self.k

        with Doubler(timeout=5.0) as ml:
            ml(21)                   # 42, from any thread

    Args:
        name: the model's name (URL segment, metrics label); defaults to the class name.
        config: a :class:`Config`; keyword settings override its fields.
        **settings: any :class:`Config` field, e.g. ``timeout=5.0, max_batch_size=16``.

    Raises:
        ConfigError: a setting is invalid.
    """

    def __init__(self, *, name: str | None = None, config: Config | None = None,
                 **settings: Any) -> None:
        base = config if config is not None else Config()
        self.config = base.replace(**settings) if settings else base
        self.name = name or type(self).__name__.lower()
        if not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        self._ipc: _Runtime | None = None
        self._ipc_lock = threading.Lock()

    # -- ML-process side: override these ---------------------------------------------
    def load(self) -> None:
        """Load the model. Runs once, inside the ML process, before any request."""

    def warmup(self) -> None:
        """Optional: run a dummy input through the model after load(), before ready."""

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """Answer one request. Runs inside the ML process.

        The default calls :meth:`predict_batch` with a batch of one.
        """
        if type(self).predict_batch is MLProcess.predict_batch:
            raise NotImplementedError(f"{type(self).__name__} must override predict() or predict_batch()")
        from .batching import item_of

        return self.predict_batch([item_of(args, kwargs)])[0]

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        """Answer a batch of requests, one result per input, in order. Runs in the ML process.

        Override it to let ipcserve batch concurrent requests (up to ``max_batch_size``).
        """
        return [self.predict(x) for x in xs]

    def _is_batching(self) -> bool:
        return type(self).predict_batch is not MLProcess.predict_batch

    # -- pickling into the ML process --------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ipc"] = None
        state.pop("_ipc_lock", None)
        state.pop("_loading", None)
        state.pop("_starting", None)
        state.pop("_abort_requested", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ipc_lock = threading.Lock()

    # -- caller side -------------------------------------------------------------------
    def _runtime(self) -> _Runtime:
        runtime: _Runtime | None = self.__dict__.get("_ipc")
        if runtime is None:
            if "config" not in self.__dict__:
                raise ConfigError(f"{type(self).__name__}.__init__ must call super().__init__()")
            if self.__dict__.get("_loading"):
                raise WorkerUnavailableError(f"model {self.name!r} is loading; retry shortly")
            raise WorkerUnavailableError(
                f"MLProcess {self.name!r} is not started. Did you call start() or use it as a "
                "context manager?")
        return runtime

    def __call__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run ``predict(*args, **kwargs)`` in the ML process and return its result.

        Args:
            timeout: this call's deadline in seconds (default: ``config.timeout``).

        Raises:
            InputError: the input cannot be sent (not picklable) or the model rejected it.
            OverloadedError: ``max_inflight`` calls are already waiting.
            QueueDeadlineError / ResultDeadlineError: the deadline passed.
            WorkerCrashedError: the ML process died with this call in flight.
            WorkerUnavailableError: not started, shutting down, or the circuit is open.
            ModelError: predict raised; the remote traceback is its ``__cause__``.
        """
        return self._runtime().caller.call(args, kwargs, timeout)

    def start(self) -> MLProcess:
        """Start the ML process(es) and wait until the model is loaded and warmed up.

        Raises:
            ModelError: load() or warmup() raised (no restart loop follows).
            WorkerUnavailableError: the process died or timed out while loading.
            RuntimeError: already started.
        """
        if "config" not in self.__dict__:
            raise ConfigError(f"{type(self).__name__}.__init__ must call super().__init__()")
        with self._ipc_lock:
            if self._ipc is not None:
                raise RuntimeError(f"MLProcess {self.name!r} is already started")
            runtime = _Runtime(self)
            self._loading = True  # callers meanwhile get "loading", not "not started"
            self._starting: _Runtime | None = runtime  # lets shutdown() abort a long load
            if self.__dict__.get("_abort_requested"):  # shutdown() is waiting for the lock
                runtime.supervisor.abort_start()
            # Tracked from now on: ML processes ignore SIGTERM, so multiprocessing's own exit
            # handler (terminate, then join) would wait forever on a loading one.
            _live.add(self)
            try:
                runtime.supervisor.start()
            except BaseException:
                _live.discard(self)
                raise
            finally:
                self._loading = False
                self._starting = None
            self._ipc = runtime
        return self

    def shutdown(self, grace: float | None = None) -> None:
        """Stop admitting calls, let in-flight ones finish (up to ``grace`` seconds), then
        send the Shutdown sentinel, join the process(es) and kill what is left.

        Safe to call twice and from a signal handler's thread. While start() is still
        loading the model, the loading processes are killed and start() raises.
        """
        # Flag first, then look: start() sets _starting, then looks at the flag, so one of
        # the two always sees the other and a load in progress is aborted.
        self._abort_requested = True
        try:
            starting = self.__dict__.get("_starting")
            if starting is not None:
                starting.supervisor.abort_start()
            with self._ipc_lock:
                runtime = self._ipc
                if runtime is None or runtime.owner_pid != os.getpid():
                    return
                self._ipc = None
        finally:
            self._abort_requested = False
        _live.discard(self)
        grace = self.config.shutdown_grace if grace is None else grace
        runtime.status.set_draining(True)
        if not runtime.caller.wait_idle(grace):
            logger.warning("model %s: %d calls still in flight after %.1fs; stopping anyway",
                           self.name, runtime.caller.inflight, grace)
        runtime.supervisor.stop(timeout=max(1.0, grace))
        runtime.caller.close_thread_channel()
        runtime.queue.close()

    def __enter__(self) -> MLProcess:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    @property
    def started(self) -> bool:
        return self.__dict__.get("_ipc") is not None

    @property
    def ready(self) -> bool:
        """True when every ML process is loaded and heartbeating and none is draining."""
        runtime = self.__dict__.get("_ipc")
        if runtime is None or runtime.status.draining or runtime.status.circuit_open:
            return False
        import time

        status = runtime.status
        now = time.monotonic()
        limit = max(3 * self.config.heartbeat_interval, 1.0)
        return all(
            status.state(s).name == "READY" and (status.busy_since(s) or now - status.heartbeat(s) < limit)
            for s in range(status.workers))

    @property
    def status(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: per-process pid, generation, state, heartbeat age,
        in-flight count, restarts; crash and hang counters; circuit and draining flags."""
        runtime = self.__dict__.get("_ipc")
        if runtime is None:
            return {"name": self.name, "started": False, "ready": False,
                    "loading": bool(self.__dict__.get("_loading"))}
        snap: dict[str, Any] = runtime.status.snapshot()
        snap.update(name=self.name, started=True, ready=self.ready,
                    inflight=runtime.caller.inflight)
        return snap

    @property
    def pids(self) -> list[int]:
        """PIDs of the live ML processes (for tests and operators)."""
        runtime = self._runtime()
        return [p for p in (runtime.status.pid(s) for s in range(runtime.status.workers)) if p]

    # -- factories ---------------------------------------------------------------------
    @classmethod
    def from_factory(cls, factory: Callable[[], Any], *, name: str | None = None,
                     **settings: Any) -> MLProcess:
        """An MLProcess whose ML process calls ``factory()`` once and serves what it returns.

        The returned model is used as ``model.predict_batch(xs)`` if it has that method
        (batching on), else ``model.predict(x)``, else ``model(x)``. ``factory`` must be
        picklable (a module-level function or class) for the spawn start method.
        """
        return _FactoryMLProcess(factory, name=name or getattr(factory, "__name__", None),
                                 **settings)


class _FactoryMLProcess(MLProcess):
    def __init__(self, factory: Callable[[], Any], **kwargs: Any) -> None:
        if not callable(factory):
            raise ConfigError(f"factory must be callable, got {type(factory).__name__}")
        name = kwargs.pop("name", None)
        super().__init__(name=name.lower() if name else None, **kwargs)
        self.factory = factory
        self.model: Any = None
        self._batching = False

    def load(self) -> None:
        self.model = self.factory()
        self._batching = callable(getattr(self.model, "predict_batch", None))

    def warmup(self) -> None:
        warm = getattr(self.model, "warmup", None)
        if callable(warm):
            warm()

    def _is_batching(self) -> bool:
        return self._batching

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.model, "predict", None)
        if callable(fn):
            return fn(*args, **kwargs)
        if self._batching:
            return super().predict(*args, **kwargs)
        return self.model(*args, **kwargs)

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        if self._batching:
            return list(self.model.predict_batch(xs))
        return [self.predict(x) for x in xs]
