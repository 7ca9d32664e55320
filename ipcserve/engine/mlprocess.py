"""MLProcess: a model loaded once in its own process, callable from any thread.

Two sides, kept apart on purpose:

* the ML-process side: ``load()``, ``warmup()``, ``predict()`` / ``predict_batch()`` - you
  override these; they run inside the ML process only;
* the caller side: ``ml(x)``, ``ml.call(args, kwargs)``, ``ml.admit()``, ``start()``,
  ``shutdown()``, ``status`` - these run wherever you hold the object. Calling the object
  never runs your ``predict`` in your process.

Lifecycle (caller side): new -> loading (``start()`` running, in this thread or in the
background) -> started -> stopped (``shutdown()``); a failed load goes back to new.
"""

from __future__ import annotations

import atexit
import copy
import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .channel import Admission, Caller, CallResult, Stream
from .config import Config
from .errors import ConfigError, WorkerUnavailableError
from .protocol import new_token
from .runtime import Plumbing
from .statusblock import State, StatusBlock
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
        self.plumbing = Plumbing(owner.name, config, self.queue, self.status, new_token())
        self.caller = Caller(self.ctx, self.plumbing)
        self.supervisor = Supervisor(owner, self.plumbing, self.ctx)
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
        self._keywords = frozenset(settings)  # settings given here win over configure(keep_keywords=True)
        self.name = name or type(self).__name__.lower()
        if not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        # Caller-side lifecycle state; none of it is pickled into the ML process.
        self._ipc: _Runtime | None = None  # set once started
        self._ipc_lock = threading.Lock()
        self._starting: _Runtime | None = None  # while start() loads: lets shutdown() abort it
        self._loading = False  # callers get "loading" rather than "not started"
        self._abort_requested = False  # shutdown() came while start() held the lock
        self._start_thread: threading.Thread | None = None  # start(wait=False)
        self._start_error: BaseException | None = None
        self._stopping: _Runtime | None = None  # while shutdown() drains: lets a second call hurry it
        #: When the last start() finished (``time.time()``) and how long it took, or None.
        self.loaded_at: float | None = None
        self.load_seconds: float | None = None

    # -- ML-process side: override these ---------------------------------------------
    def load(self) -> None:
        """Load the model. Runs once, inside the ML process, before any request."""

    def warmup(self) -> None:
        """Optional: run a dummy input through the model after load(), before ready."""

    #: Example requests, each the keyword arguments of one call (a JSON request body's
    #: fields): after :meth:`load` and :meth:`warmup`, every ML process runs each one through
    #: the model as a request would go (``predict_batch`` with a batch of one for a batching
    #: model; a stream is read to its end) before it reports ready, so the first real
    #: request does not pay the one-time costs (allocators, lazy kernels, caches). Set it
    #: on the class, on an instance, or with ``warmup = "FILE"`` in a config file.
    warmup_requests: tuple[dict[str, Any], ...] | list[dict[str, Any]] = ()

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """Answer one request. Runs inside the ML process.

        The default calls :meth:`predict_batch` with a batch of one.
        """
        if type(self).predict_batch is MLProcess.predict_batch:
            raise NotImplementedError(f"{type(self).__name__} must override predict() or predict_batch()")
        from .batching import item_of

        return self.predict_batch([item_of(args, kwargs)])[0]

    @property
    def batching(self) -> bool:
        """True when concurrent calls are handed to :meth:`predict_batch` together (the class
        overrides it)."""
        return type(self).predict_batch is not MLProcess.predict_batch

    #: A model call whose every request was cancelled (client gone, deadline passed) is
    #: interrupted: ``ipcserve.cancel.Cancelled`` is raised inside predict at the next
    #: Python bytecode. Set False in a subclass whose predict must never be interrupted.
    interruptible: bool = True

    def cancelled(self) -> bool:
        """Inside ``predict``: True when nobody waits for any request of this call any
        more (a long model can check it between steps and return early)."""
        probe = self.__dict__.get("_cancel_probe")
        return bool(probe()) if probe is not None else False

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        """Answer a batch of requests, one result per input, in order. Runs in the ML process.

        Override it to let ipcserve batch concurrent requests (up to ``max_batch_size``).
        """
        return [self.predict(x) for x in xs]

    # -- pickling into the ML process --------------------------------------------------
    _CALLER_SIDE = ("_ipc", "_ipc_lock", "_starting", "_loading", "_abort_requested",
                    "_start_thread", "_start_error", "_stopping", "loaded_at", "load_seconds")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self._CALLER_SIDE:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ipc = None
        self._ipc_lock = threading.Lock()
        self._starting = None
        self._loading = False
        self._abort_requested = False
        self._start_thread = None
        self._start_error = None
        self._stopping = None
        self.loaded_at = None
        self.load_seconds = None

    def fresh(self) -> MLProcess:
        """An unstarted copy: the same class, name, settings and attributes, none of this
        one's processes. Its :meth:`start` loads the model afresh in new ML processes; under
        the spawn and forkserver start methods they import the model's code afresh too
        (fork copies the caller's modules as they are). How a reload makes the next version.
        """
        clone = type(self).__new__(type(self))
        clone.__setstate__(copy.copy(self.__getstate__()))
        return clone

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

        A keyword named ``timeout`` is this call's deadline, never the model's input; use
        :meth:`call` to pass arbitrary keyword names through.

        Args:
            timeout: this call's deadline in seconds (default: ``config.timeout``).

        Raises:
            the errors of :meth:`call`.
        """
        return self.call(args, kwargs, timeout=timeout).value

    def call(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
             timeout: float | None = None, deadline: float | None = None,
             cancel_if: Callable[[], bool] | None = None) -> CallResult:
        """Run ``predict(*args, **kwargs)`` in the ML process; the value and its timings.

        Every key of ``kwargs`` reaches the model, ``timeout`` and ``self`` included.

        Args:
            args, kwargs: the model call's arguments.
            timeout: seconds from now (default: ``config.timeout``).
            deadline: an absolute ``time.monotonic()`` deadline instead, e.g. measured from
                when the HTTP request arrived.
            cancel_if: checked while waiting (every ``poll_interval``); when it returns True
                the call is cancelled in the ML process (never computed, or its model call
                interrupted if nobody waits for any of its requests) and
                ``RequestCancelledError`` is raised. E.g. waitress's
                ``environ["waitress.client_disconnected"]``.

        Returns:
            a :class:`~ipcserve.CallResult`: ``value``, ``queue_wait``,
            ``inference_time``, ``batch_size``.

        Raises:
            InputError: the input cannot be sent (not picklable) or the model rejected it.
            OverloadedError: ``max_inflight`` calls are already in flight, or the calls
                ahead would take it past its deadline (refused at once; see :meth:`admit`).
            QueueDeadlineError: the deadline passed before an ML process took the call.
            ResultDeadlineError: the ML process took it, but did not answer in time.
            WorkerCrashedError: the ML process died with this call in flight.
            WorkerUnavailableError: not started, loading, shutting down, or the circuit is open.
            ModelError: predict raised; the remote traceback is its ``__cause__``.
            RequestCancelledError: ``cancel_if()`` returned True.
        """
        deadline = self._runtime().caller.deadline(timeout, deadline)
        with self.admit(deadline=deadline) as admission:
            return admission.call(args, kwargs or {}, deadline=deadline, cancel_if=cancel_if)

    def call_batch(self, items: list[Any], *, timeout: float | None = None,
                   deadline: float | None = None,
                   cancel_if: Callable[[], bool] | None = None) -> CallResult:
        """Run several inputs as one request: one admission, one round trip, one result per
        item, in order (e.g. the rows of one Open Inference Protocol request).

        An item is what ``predict_batch`` receives for one call: ``ml.call_batch([a, b])``
        answers as ``[ml(a), ml(b)]`` would. A batching model (one that overrides
        ``predict_batch``) gets the items together with the other calls waiting, in
        ``predict_batch`` calls of at most ``max_batch_size`` items: more items than that
        make several consecutive calls. Any other model runs ``predict(item)`` for each item,
        in order; a streaming ``predict`` cannot answer a batch request (``ModelError``).

        If an item fails, the request fails with that item's error (the first failing
        item's), of the same class, its message prefixed with ``"item <i>: "`` (``i`` counts
        from 0); items after it may not be computed. As with batched calls, a
        ``predict_batch`` call that raises is retried item by item, so only the bad item
        fails. Deadlines and ``cancel_if`` cover the whole request, as for :meth:`call`.

        Args:
            items: a non-empty list of inputs.
            timeout / deadline / cancel_if: as for :meth:`call`.

        Returns:
            a :class:`~ipcserve.CallResult` whose ``value`` is the list of results;
            ``batch_size`` is the size of the largest model call that answered it.

        Raises:
            InputError: ``items`` is not a non-empty list (nothing is sent), an item cannot
                be pickled, or the model rejected an item.
            IPCServeError: the other errors of :meth:`call`.
        """
        deadline = self._runtime().caller.deadline(timeout, deadline)
        with self.admit(deadline=deadline) as admission:
            return admission.call_batch(items, deadline=deadline, cancel_if=cancel_if)

    def stream(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
               timeout: float | None = None, deadline: float | None = None,
               idle_timeout: float | None = None,
               cancel_if: Callable[[], bool] | None = None) -> Stream:
        """Run ``predict(*args, **kwargs)``; its items as the ML process makes them.

        A ``predict`` that returns a generator (or another iterator) streams: each item
        comes as soon as it is yielded. Any other model gives one item, its answer::

            with ml.stream((), {"prompt": "Once"}) as items:
                for item in items:
                    print(item)

        Leave the ``with`` (or call ``close()``) to stop early: the rest is cancelled in
        the ML process. Concurrent streams on one ML process advance together, one item
        each per turn; a reader that falls behind pauses its own generator.

        Args:
            timeout / deadline: for the first item (as for :meth:`call`).
            idle_timeout: most seconds between two items (default ``config.timeout``).
            cancel_if: as for :meth:`call`; checked while waiting for each item.

        Raises:
            the errors of :meth:`call`, when iterating; OverloadedError and
            WorkerUnavailableError at once.
        """
        deadline = self._runtime().caller.deadline(timeout, deadline)
        admission = self.admit(deadline=deadline)
        try:
            return admission.stream(args, kwargs or {}, deadline=deadline,
                                    idle_timeout=idle_timeout, cancel_if=cancel_if,
                                    release_at_end=True)
        except BaseException:
            admission.release()
            raise

    def admit(self, deadline: float | None = None) -> Admission:
        """Take a place among the ``max_inflight`` calls in flight, before preparing a call.

        Use it to refuse work at once under overload, before decoding the input::

            deadline = time.monotonic() + 5
            with ml.admit(deadline=deadline) as admission:   # OverloadedError: refused
                x = expensive_decode(body)
                result = admission.call((x,), {}, deadline=deadline)

        ``shutdown()`` waits for every admission to be released.

        Args:
            deadline: the call's ``time.monotonic()`` deadline. Given, a call that would be
                answered after it, by the estimate from the calls ahead and the model's
                recent pace (``estimate_factor``), is refused now instead of timing out
                later. :meth:`call`, :meth:`call_batch` and :meth:`stream` pass theirs.

        Raises:
            OverloadedError: ``max_inflight`` calls in flight (``reason`` ``"inflight"``),
                or the estimate says the deadline cannot be met (``"estimate"``;
                ``retry_after``: when there should be room).
            WorkerUnavailableError: as for :meth:`call`.
        """
        return self._runtime().caller.admit(deadline)

    def start(self, *, wait: bool = True) -> MLProcess:
        """Start the ML process(es) and wait until the model is loaded and warmed up.

        Args:
            wait: False returns at once and loads in a background thread; calls meanwhile
                get ``WorkerUnavailableError`` ("loading"); :meth:`wait_started` waits and
                raises what the load raised.

        Raises:
            ModelError: load() or warmup() raised (no restart loop follows).
            WorkerUnavailableError: the process died or timed out while loading.
            RuntimeError: already started or starting.
        """
        if "config" not in self.__dict__:
            raise ConfigError(f"{type(self).__name__}.__init__ must call super().__init__()")
        if not wait:
            with self._ipc_lock:
                if self._ipc is not None or self._loading:
                    raise RuntimeError(f"MLProcess {self.name!r} is already started")
                self._loading = True
                self._start_error = None
                self._start_thread = threading.Thread(
                    target=self._start_in_background, name=f"ipcserve-start-{self.name}", daemon=True)
                self._start_thread.start()
            return self
        return self._start()

    def _start_in_background(self) -> None:
        try:
            self._start()
        except BaseException as exc:
            self._start_error = exc

    def wait_started(self, timeout: float | None = None) -> bool:
        """After ``start(wait=False)``: wait for the load; True once started, False if
        ``timeout`` passed first.

        Raises:
            what ``start()`` raised in the background.
        """
        thread = self._start_thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        if self._start_error is not None:
            raise self._start_error
        return self.started

    def _start(self) -> MLProcess:
        with self._ipc_lock:
            if self._ipc is not None:
                raise RuntimeError(f"MLProcess {self.name!r} is already started")
            runtime = _Runtime(self)
            self._loading = True  # callers meanwhile get "loading", not "not started"
            self._starting = runtime  # lets shutdown() abort a long load
            if self._abort_requested:  # shutdown() is waiting for the lock
                runtime.supervisor.abort_start()
            # Tracked from now on: ML processes ignore SIGTERM, so multiprocessing's own exit
            # handler (terminate, then join) would wait forever on a loading one.
            _live.add(self)
            began = time.monotonic()
            try:
                runtime.supervisor.start()
            except BaseException:
                _live.discard(self)
                raise
            finally:
                self._loading = False
                self._starting = None
            self._ipc = runtime
            self.load_seconds = time.monotonic() - began
            self.loaded_at = time.time()
        return self

    def shutdown(self, grace: float | None = None) -> bool:
        """Stop admitting calls, let in-flight ones finish (up to ``grace`` seconds), then
        send the Shutdown sentinel, join the process(es) and kill what is left.

        Safe to call twice and from a signal handler's thread. While start() is still
        loading the model, the loading processes are killed and start() raises. A call
        while another shutdown() drains makes that one stop waiting and kill the ML
        processes at once (a second Ctrl-C).

        Returns:
            True when every call in flight finished within ``grace`` (or none was running).
        """
        # Flag first, then look: start() sets _starting, then looks at the flag, so one of
        # the two always sees the other and a load in progress is aborted.
        self._abort_requested = True
        try:
            starting = self._starting
            if starting is not None:
                starting.supervisor.abort_start()
            with self._ipc_lock:
                runtime = self._ipc
                if runtime is None or runtime.owner_pid != os.getpid():
                    runtime = None
                else:
                    self._ipc = None
                    self._stopping = runtime
        finally:
            self._abort_requested = False
        thread = self._start_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10.0)  # the aborted load ends at once
        if runtime is None:
            stopping = self._stopping
            if stopping is not None:  # another thread drains: make it stop now
                stopping.caller.stop_waiting()
                stopping.supervisor.hurry()
                return False
            return True
        _live.discard(self)
        grace = self.config.shutdown_grace if grace is None else grace
        runtime.status.set_draining(True)
        try:
            idle = runtime.caller.wait_idle(grace)
            if not idle:
                logger.warning("model %s: %d calls still in flight at shutdown; stopping anyway",
                               self.name, runtime.caller.inflight)
            runtime.supervisor.stop(timeout=max(1.0, grace))
            runtime.caller.close_thread_channel()
            runtime.queue.close()
        finally:
            self._stopping = None
        return idle

    def configure(self, *, keep_keywords: bool = False, **settings: Any) -> None:
        """Change settings before :meth:`start`.

        Args:
            keep_keywords: leave alone the settings given as keywords to the constructor
                (how the Flask extension applies ``app.config["IPCSERVE_*"]``).
            **settings: :class:`Config` fields.

        Raises:
            ConfigError: an unknown setting or an invalid value.
            RuntimeError: already started.
        """
        if self._ipc is not None or self._loading:
            raise RuntimeError(f"MLProcess {self.name!r} is started; configure it before start()")
        if keep_keywords:
            settings = {k: v for k, v in settings.items() if k not in self._keywords}
        if settings:
            self.config = self.config.replace(**settings)

    def stop_admitting(self) -> None:
        """Refuse new calls (``WorkerUnavailableError``, "shutting down") while the calls in
        flight go on; :meth:`shutdown` then waits for them. Lets an app stop several models'
        intake at the same moment before draining them one by one."""
        runtime = self._ipc
        if runtime is not None:
            runtime.status.set_draining(True)

    @property
    def inflight(self) -> int:
        """Calls admitted and not yet answered in this process."""
        runtime = self._ipc
        return 0 if runtime is None else runtime.caller.inflight

    def __enter__(self) -> MLProcess:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    @property
    def started(self) -> bool:
        """True from the end of a successful :meth:`start` until :meth:`shutdown`."""
        return self._ipc is not None

    @property
    def owner_pid(self) -> int | None:
        """The pid of the process that started this MLProcess (its ML processes are that
        process's children; only it can stop or replace them), or None when not started.
        A web process forked after start() (a gunicorn worker) sees its master's pid."""
        runtime = self._ipc
        return None if runtime is None else runtime.owner_pid

    @property
    def ready(self) -> bool:
        """True when every ML process is loaded and heartbeating, none is draining, and the
        supervisor thread that restarts and watches them works (its last tick completed)."""
        runtime = self._ipc
        if runtime is None:
            return False
        status = runtime.status
        if status.draining or status.circuit_open or status.supervisor_failing:
            return False
        now = time.monotonic()
        limit = max(3 * self.config.heartbeat_interval, 1.0)
        return all(
            status.state(s) is State.READY and (status.busy_since(s) or now - status.heartbeat(s) < limit)
            for s in range(status.workers))

    @property
    def status(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: per-process pid, generation, state, heartbeat age,
        in-flight count, restarts; crash and hang counters; circuit and draining flags;
        failed channel hand-overs; the supervisor thread's failures and whether it is failing
        now."""
        runtime = self._ipc
        if runtime is None:
            return {"name": self.name, "started": False, "ready": False, "loading": self._loading}
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

    @property
    def batching(self) -> bool:
        return self._batching

    def load(self) -> None:
        self.model = self.factory()
        self._batching = callable(getattr(self.model, "predict_batch", None))

    def warmup(self) -> None:
        warm = getattr(self.model, "warmup", None)
        if callable(warm):
            warm()

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
