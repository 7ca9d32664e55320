"""The serving core: one request lifecycle under every HTTP surface.

Every route that runs a model (native predict, the OpenAI routes, V2 infer) goes through
:func:`exchange`, which keeps the promises of DESIGN.md §3 in one place::

    surface view ──► exchange(endpoint) ──► draining? 503 at once (never admitted)
                         │  deadline = arrival (environ[RECEIVED_KEY]) + the model's timeout
                         ├─ admit()          place among the calls in flight, or shed (503/429)
                         ├─ call() / call_batch() / stream()   with cancel_if = client gone
                         ├─ the surface formats the answer (a stream: body() owns the rest)
                         └─ finish: release, metrics + history, recent latency, once

A surface only parses its protocol's request and shapes its answer and error body; what an
error means (status, Retry-After, log level) is decided once, by :func:`failure_of`.
A surface outside Flask (the V2 gRPC service) runs the same lifecycle with
:func:`lifecycle`, giving the arrival time, the "client gone" probe and the client's own
deadline itself; :func:`exchange` is that, read from the Flask request.
Readiness is computed once, by :meth:`Models.readiness`, for ``/readyz``, the V2 health
routes and Ray Serve's health check.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hmac
import logging
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import (Flask, Response, after_this_request, current_app, g, has_request_context,
                   jsonify, request)
from werkzeug.exceptions import HTTPException

from ..engine.channel import Admission, CallResult, Stream
from ..engine.errors import (
    ConfigError,
    DeadlineError,
    IPCServeError,
    ModelError,
    NotFoundError,
    OverloadedError,
    ReloadError,
    RequestCancelledError,
    UnauthorizedError,
    WorkerCrashedError,
    WorkerUnavailableError,
)
from ..engine.mlprocess import MLProcess
from .access import AccessLog, body_of, stamp, trace_id
from .cache import CacheSettings, ResponseCache
from .decode import DecodeBudget
from .keys import Key, Keys, load_keys
from .metrics import Metrics
from .pool import Pool
from .tracing import Tracing
from .rollback import Rollback
from .shadow import Shadow
from .versions import DEFAULT_VERSION, LOADED, VERSION_HEADER, Split, Version

__all__ = ["DISCONNECTED_KEY", "KINDS", "RECEIVED_KEY", "Endpoint", "Exchange", "Failure",
           "Models", "Readiness", "Served", "check_api_key", "error_response", "exchange",
           "failure_of", "lifecycle", "served"]

logger = logging.getLogger(__name__)

# Set by ipcserve's waitress integration: time.monotonic() when the whole request had
# arrived. A request's deadline counts from then, not from when a thread picked it up.
RECEIVED_KEY = "ipcserve.received"
# waitress (with channel_request_lookahead > 0) puts a callable here that says whether the
# client has gone; a waiting request checks it and cancels its work in the ML process.
DISCONNECTED_KEY = "waitress.client_disconnected"

#: How a model's native route takes its input.
KINDS = ("json", "image")


class Endpoint:
    """One served model: its versions, the share of traffic each gets, and what the HTTP
    layer keeps about it.

    Args:
        ml: the MLProcess (its first version, the stable one).
        kind: "json" or "image" (:data:`KINDS`).
        schema: JSON Schema dict, pydantic model or protobuf message class for JSON bodies.
        preprocess: image models: ``preprocess(PIL.Image)`` makes the model's input.
        response_schema: a protobuf message class the (non-streamed) answer must parse as.
        cache: the response cache's settings, or None for no cache.
        version: the name of ``ml``'s version.
        lazy: load ``ml`` on the first request instead of at start.
        idle_unload: unload it after this many seconds without a request (None: never).
        rollback: when a canary of this model is rolled back on its own.
    """

    def __init__(self, ml: MLProcess, kind: str = "json", *, schema: Any = None,
                 preprocess: Callable[[Any], Any] | None = None, response_schema: Any = None,
                 cache: CacheSettings | None = None, version: str = DEFAULT_VERSION,
                 lazy: bool = False, idle_unload: float | None = None,
                 rollback: Rollback | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.name = ml.name
        # Every version of the model; the one serving unpinned traffic by default is
        # split.stable. A reload swaps a version's ml (one attribute write, so a request
        # reads either the old or the new, never a mix).
        self.split = Split(ml.name, Version(ml.name, version, ml, lazy=lazy,
                                            idle_unload=idle_unload), rollback)
        self.pool = Pool()  # the app's pool once added to Models
        self.shadow: Shadow | None = None  # set when a shadow version is added
        self.kind = kind
        self.schema = schema
        self.preprocess = preprocess
        self.response_schema = response_schema
        self.cache_settings = cache
        self.cache: ResponseCache | None = None  # made by the extension once it has the app
        #: 1 at start, +1 per successful reload (not the ML processes' own ``generation``,
        #: which counts restarts of one slot).
        self.revision = 1
        self.reloading = threading.Lock()  # one reload of this model at a time
        self.last_reload: dict[str, Any] | None = None
        self.recent: collections.deque[float] = collections.deque(maxlen=200)
        self.created = int(time.time())  # OpenAI's "created" of the model entry

    @property
    def ml(self) -> MLProcess:
        """The stable version's MLProcess (its signature, task and status describe the model)."""
        return self.split.versions[self.split.stable].ml

    @property
    def versions(self) -> list[Version]:
        """Every version of the model."""
        return list(self.split.versions.values())

    def admit(self, received: float | None = None, pin: str | None = None,
              limit: float | None = None) -> tuple[MLProcess, Admission, Version]:
        """A place among the calls in flight of the version the split chooses (loaded first
        if it is not), and that version.

        A request that read a version just before a reload swapped it out, and found it no
        longer admitting, is admitted by the new one: a reload never refuses anyone.

        Args:
            received: when the request arrived (``time.monotonic()``): its deadline is that
                plus the version's ``timeout``, and a request the estimate says cannot be
                answered by then is refused at once; a load on demand waits until then.
            pin: the request's ``X-IPCServe-Version`` header: that version, whatever the
                weights.
            limit: the client's own deadline (``time.monotonic()``), if it set one (a gRPC
                deadline): the request's deadline is the earlier of the two.

        Raises:
            InputError: ``pin`` names no version.
            OverloadedError / WorkerUnavailableError: as ``MLProcess.admit``; also while
                the version's last load on demand failed.
            QueueDeadlineError: the deadline passed while the version was loading.
        """
        version = self.split.choose(pin)
        while True:
            ml = version.ml
            deadline = None if received is None else received + ml.config.timeout
            if limit is not None:
                deadline = limit if deadline is None else min(deadline, limit)
            with self.pool.using(version, deadline) as ml:
                try:
                    return ml, ml.admit(deadline=deadline), version
                except WorkerUnavailableError:
                    if version.ml is ml:
                        raise

    def finished(self, version: Version, status: int, error: BaseException | None) -> None:
        """A request admitted by ``version`` was answered with ``status``: its outcome counts
        toward the canary's error rate, and the pool may now find the version idle."""
        self.pool.released(version)
        # The version's side failed: not the client's (4xx), not a refusal (shed).
        self.split.outcome(version, status >= 500 and not isinstance(error, OverloadedError))

    def ready(self) -> bool:
        """Every version that should be serving is: a version loaded on demand that is not
        loaded (yet, or any more) does not hold readiness back; its requests load it."""
        for version in self.split.versions.values():
            if self.pool.managed(version) and version.state != LOADED:
                continue
            if not version.ml.ready:
                return False
        return True

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered, over every version (this web process)."""
        return sum(v.ml.inflight for v in self.split.versions.values())

    def latency(self) -> dict[str, Any] | None:
        """p50/p95 of the last successful requests in milliseconds, or None before any."""
        ordered = sorted(self.recent)
        if not ordered:
            return None
        return {"p50_ms": round(statistics.median(ordered) * 1000, 2),
                "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 2),
                "samples": len(ordered)}


@dataclasses.dataclass(frozen=True)
class Readiness:
    """Whether this server should get traffic, computed once for every probe.

    Attributes:
        draining: a drain began (``/readyz`` turns 503 before anything is refused).
        models: each model's readiness (every ML process loaded, heartbeating, not draining).
        broken: models ipcserve cannot repair itself now: the circuit breaker is open
            (crashed past the restart budget), or the supervisor thread is failing.
    """

    draining: bool
    models: dict[str, bool]
    broken: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        """Every model ready and not draining: ``/readyz`` and ``/v2/health/ready`` say 200."""
        return bool(self.models) and all(self.models.values()) and not self.draining

    @property
    def healthy(self) -> bool:
        """Not draining and no circuit open: a replica worth keeping (Ray Serve). Looser than
        :attr:`ready`: an ML process restarting after one crash is ipcserve's to handle."""
        return not self.draining and not self.broken

    def model_ready(self, name: str) -> bool:
        """One model ready, and the server not draining (``/v2/models/<name>/ready``)."""
        return bool(self.models.get(name)) and not self.draining


class Models:
    """The served models and the state of the whole server that every surface reads."""

    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.default: str | None = None
        # Which versions are loaded, for every model (lazy loads, eviction, idle unload).
        self.pool = Pool()
        # Set when a drain begins, before its delay: readiness turns 503 and responses close
        # their connections, while requests are still admitted and answered.
        self.unready = threading.Event()
        # Set once new requests are refused (503 at once).
        self.draining = threading.Event()

    def add(self, endpoint: Endpoint) -> None:
        """Serve ``endpoint`` (its versions join the app's pool)."""
        endpoint.pool = self.pool
        for version in endpoint.versions:
            self.pool.register(version)
        self.endpoints[endpoint.name] = endpoint

    def get(self, name: str | None = None) -> Endpoint:
        """Model ``name`` (None: the default one).

        Raises:
            NotFoundError: no such model; the message lists the models.
        """
        if name is None:
            name = self.default
            if name is None:
                raise NotFoundError("no model is served here")
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            raise NotFoundError(f"no model named {name!r}; models: "
                                f"{', '.join(sorted(self.endpoints)) or 'none'}")
        return endpoint

    def readiness(self) -> Readiness:
        draining = self.unready.is_set() or self.draining.is_set()
        broken = []
        models = {}
        for name, endpoint in self.endpoints.items():
            ml = endpoint.ml
            models[name] = endpoint.ready()
            if not models[name]:
                status = ml.status
                # Past what ipcserve repairs itself: restarts exhausted (circuit open), or
                # the supervisor that restarts and watches the ML processes failing.
                if status.get("circuit_open") or status.get("supervisor_failing"):
                    broken.append(name)
        return Readiness(draining, models, tuple(broken))

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered, over every model (this web process)."""
        return sum(endpoint.inflight for endpoint in self.endpoints.values())

    def history_names(self) -> list[str]:
        """The series of the status page's history: each model, then ``model@version`` for
        each version of a model with several."""
        names = list(self.endpoints)
        for name, endpoint in list(self.endpoints.items()):
            if endpoint.split.several:
                names.extend(f"{name}@{label}" for label in list(endpoint.split.versions))
        return names

    def version_rows(self) -> list[dict[str, Any]]:
        """One row per version of every model, for the metrics."""
        rows = []
        for name, endpoint in list(self.endpoints.items()):
            split = endpoint.split
            shares = split.shares()
            for label, version in list(split.versions.items()):
                rows.append({"model": name, "version": label,
                             "loaded": version.state == LOADED and version.ml.started,
                             "loads": dict(version.loads), "unloads": dict(version.unloads),
                             "load_failures": version.load_failures,
                             "share": shares.get(label, 0.0),
                             "rollbacks": {reason: n for (v, reason), n in split.rollbacks.items()
                                           if v == label},
                             "shadow_results": dict(version.shadow_results)})
        return rows


def check_api_key(key: Any) -> bytes | None:
    """The API key as the UTF-8 bytes to compare, or None for no key.

    Raises:
        ConfigError: a key that no client could send or that would disable checks by
            accident: empty, blank, with surrounding spaces or control characters.
    """
    if key is None:
        return None
    if not isinstance(key, str):
        raise ConfigError(f"IPCSERVE_API_KEY must be a string, got {type(key).__name__}")
    if not key.strip():
        raise ConfigError("the API key is empty; leave IPCSERVE_API_KEY / --api-key unset to "
                          "serve without one")
    if key != key.strip():
        raise ConfigError("the API key starts or ends with whitespace, which HTTP clients "
                          "strip; remove it")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise ConfigError("the API key contains control characters, which cannot be sent "
                          "in an HTTP header")
    return key.encode("utf-8")


class Served:
    """Per-app state, in ``app.extensions["ipcserve"]``: the models, the settings read from
    ``app.config``, the metrics and the route registry (``routes``, by Flask endpoint).

    Args:
        models: the served models (shared with the extension).
        config: the app's config, with every ``http`` setting parsed.
        extension: the ``IPCServe`` that owns this state (:meth:`IPCServe.of` returns it).
    """

    def __init__(self, models: Models, config: Any, extension: Any) -> None:
        self.models = models
        self.extension = extension
        self.api_key = check_api_key(config["IPCSERVE_API_KEY"])
        self.max_pixels = int(config["IPCSERVE_MAX_IMAGE_PIXELS"])
        # One budget per app: decoded images held at once, across its threads.
        self.decode_budget = DecodeBudget(int(config["IPCSERVE_DECODE_MEMORY_BUDGET"]))
        self.metrics = Metrics(lambda: {n: e.ml for n, e in models.endpoints.items()},
                               versions=models.version_rows, pool=models.pool.counts)
        self.shed_status = int(config["IPCSERVE_SHED_STATUS"])
        if self.shed_status not in (503, 429):
            raise ConfigError(f"IPCSERVE_SHED_STATUS must be 503 or 429, got {self.shed_status}")
        self.routes: dict[str, Any] = {}  # Flask endpoint name -> routes.Route
        self.url_prefix = ""
        keys_file = config.get("IPCSERVE_KEYS_FILE")
        self.keys: Keys | None = load_keys(keys_file) if keys_file else None
        if self.keys is not None:
            self.metrics.track_keys(self.keys)
        target = config.get("IPCSERVE_ACCESS_LOG")
        self.access_log: AccessLog | None = AccessLog(target) if target else None
        self.audit_share = float(config.get("IPCSERVE_ACCESS_LOG_BODIES") or 0.0)
        self.tracing: Tracing | None = None  # set by the extension when tracing is on

    @property
    def guarded(self) -> bool:
        """Whether requests need an API key (``api_key``, or a keys file)."""
        return self.api_key is not None or self.keys is not None

    def authorize(self, sent: bytes, how: str) -> Key | None:
        """The team key a request sent (None: no key is needed, or it sent the server's own
        ``api_key``, which has no quota), counted against its quotas.

        Args:
            sent: the bearer token's bytes.
            how: how to send a key, for the error message.

        Raises:
            UnauthorizedError: a key is needed and ``sent`` is none of them.
            RateLimitedError: the key is over its quota.
        """
        if not self.guarded:
            return None
        if self.api_key is not None and hmac.compare_digest(sent, self.api_key):
            return None
        key = self.keys.find(sent) if self.keys is not None and sent else None
        if key is None:
            raise UnauthorizedError(f"this server needs an API key: {how}")
        key.admit()
        return key


def served(app: Flask | None = None) -> Served:
    """The ipcserve state of ``app`` (default: the app handling this request).

    Raises:
        RuntimeError: ipcserve is not registered on the app.
    """
    target = current_app if app is None else app
    state = getattr(target, "extensions", {}).get("ipcserve")
    if not isinstance(state, Served):
        raise RuntimeError("this app has no IPCServe; call IPCServe(app) or init_app(app) "
                           "on the Flask app you serve")
    return state


# -- what an error means -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Failure:
    """What an error means over HTTP, whatever the surface shapes its body like.

    Attributes:
        status: the HTTP status.
        message: a sentence for the client (never a traceback).
        type: the error's name (``InputError``, ``NotFound``, ``InternalServerError``).
        retry_after: the Retry-After header's seconds (503 and 429), else None.
        level: the logging level a request that ended so is logged at.
        headers: other headers the answer must carry (``Allow`` on a 405).
        error: the exception itself.
    """

    status: int
    message: str
    type: str
    retry_after: int | None
    level: int
    headers: tuple[tuple[str, str], ...]
    error: BaseException


# Most specific first. Refusals the client can act on (bad input, shed, unavailable) are
# counted in the metrics and logged at DEBUG; what an operator should see is logged higher.
_LEVELS: tuple[tuple[type[BaseException], int], ...] = (
    (ModelError, logging.ERROR), (ReloadError, logging.ERROR),
    (WorkerCrashedError, logging.WARNING), (DeadlineError, logging.INFO),
    (RequestCancelledError, logging.INFO))


def failure_of(error: BaseException, shed_status: int = 503) -> Failure:
    """The one mapping from an exception to its HTTP meaning.

    Args:
        error: an ipcserve error, a Werkzeug ``HTTPException`` or anything else (an
            unexpected error: 500, its message never shown).
        shed_status: the status of a request shed by overload (503 or 429).
    """
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(error, IPCServeError):
        status = shed_status if isinstance(error, OverloadedError) else error.http_status
        message, kind = error.message, type(error).__name__
        level = next((lvl for cls, lvl in _LEVELS if isinstance(error, cls)), logging.DEBUG)
    elif isinstance(error, HTTPException):
        status = error.code or 500
        message = error.description or ""
        kind = "PayloadTooLargeError" if status == 413 else (error.name or "HTTPError").replace(" ", "")
        level = logging.DEBUG
        allow = dict(error.get_headers()).get("Allow")
        if allow:
            headers = (("Allow", allow),)
    else:
        status, kind, level = 500, "InternalServerError", logging.ERROR
        message = "the server hit an unexpected error; see its log"
    retry_after = None
    if status in (503, 429):
        retry_after = max(1, math.ceil(getattr(error, "retry_after", None) or 1))
    return Failure(status, message, kind, retry_after, level, headers, error)


def error_response(failure: Failure, body: Any) -> Response:
    """``body`` as the JSON answer to ``failure``, with its status and headers."""
    response = jsonify(body)
    response.status_code = failure.status
    if failure.retry_after is not None:
        response.headers["Retry-After"] = str(failure.retry_after)
    for name, value in failure.headers:
        response.headers[name] = value
    return response


# -- the lifecycle ---------------------------------------------------------------------
class Exchange:
    """One model request on its way through the core; made by :func:`lifecycle` (or
    :func:`exchange` inside a Flask view).

    A surface calls :meth:`admit` once it has checked what is cheap to check (before
    decoding what is expensive), then one of :meth:`call`, :meth:`call_batch` or
    :meth:`stream`. A streamed answer hands the rest of the lifecycle to :meth:`body`.

    Args:
        state: the app's state.
        endpoint: the model.
        received: when the request had arrived (``time.monotonic()``; None: now).
        gone: says whether the client has gone (its work is then cancelled), or None.
        limit: the client's own deadline (``time.monotonic()``), or None.
        pin: the version the request asks for (``X-IPCServe-Version``), or None.
    """

    def __init__(self, state: Served, endpoint: Endpoint, received: float | None = None,
                 gone: Callable[[], bool] | None = None, limit: float | None = None,
                 pin: str | None = None, key: Key | None = None,
                 access: dict[str, Any] | None = None) -> None:
        self.state = state
        self.key = key  # the team key it came with (its quotas), if any
        self.access = access  # what the access log says of the request, if there is one
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.received: float = received or time.monotonic()
        self.cancel_if = gone
        self.limit = limit
        self.pin = pin
        self.deadline: float | None = None
        self.status = 500
        self.stats: CallResult | None = None  # timings of the model call that answered
        self.handed_off = False
        self.version: Version | None = None  # the version that admitted it
        self.error: BaseException | None = None  # what it failed with, if it did
        self._inputs: tuple[str, Any] | None = None  # for the shadow version's copy
        self._admission: Admission | None = None
        self._stream: Stream | None = None
        self._span: Any = None  # when tracing a stream: (its parent context, its start)
        self._failed = False
        self._finished = False

    def admit(self) -> MLProcess:
        """Take a place among the model's calls in flight; the deadline starts counting from
        the request's arrival. Returns the version of the model that admitted it.

        Raises:
            OverloadedError: shed (``max_inflight`` calls in flight, or the calls ahead would
                take it past its deadline).
            WorkerUnavailableError: loading, restarting, draining or circuit open.
        """
        endpoint = self.endpoint
        tracing = self.state.tracing
        with (contextlib.nullcontext() if tracing is None else
              tracing.span("ipcserve.admission", **{"ipcserve.model": endpoint.name})):
            ml, self._admission, self.version = endpoint.admit(self.received, self.pin,
                                                               self.limit)
        self.deadline = self.received + ml.config.timeout
        if self.limit is not None:
            self.deadline = min(self.deadline, self.limit)
        if endpoint.split.several and has_request_context():  # the answer names its version
            label = self.version.label

            @after_this_request
            def name_version(response: Response) -> Response:
                response.headers[VERSION_HEADER] = label
                return response
        return ml

    def _admitted(self) -> Admission:
        if self._admission is None:
            raise RuntimeError("admit() before calling the model")
        return self._admission

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallResult:
        """Run one model call (the errors of ``MLProcess.call``)."""
        if self.endpoint.shadow is not None:
            self._inputs = ("call", (args, kwargs))
        tracing = self.state.tracing
        self.stats = self._admitted().call(args, kwargs, deadline=self.deadline,
                                           cancel_if=self.cancel_if,
                                           trace=None if tracing is None else tracing.traceparent())
        if tracing is not None:
            tracing.call(self.endpoint.name, self.stats, tracing.context())
        return self.stats

    def call_batch(self, items: list[Any]) -> CallResult:
        """Run several items as one request (``MLProcess.call_batch``)."""
        if self.endpoint.shadow is not None:
            self._inputs = ("batch", items)
        tracing = self.state.tracing
        self.stats = self._admitted().call_batch(items, deadline=self.deadline,
                                                 cancel_if=self.cancel_if,
                                                 trace=None if tracing is None else tracing.traceparent())
        if tracing is not None:
            tracing.call(self.endpoint.name, self.stats, tracing.context())
        return self.stats

    def stream(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Stream:
        """The model's items as it makes them (``MLProcess.stream``); closed by the core."""
        if self.endpoint.shadow is not None:
            self._inputs = ("call", (args, kwargs))
        tracing = self.state.tracing
        self._stream = self._admitted().stream(
            args, kwargs, deadline=self.deadline, cancel_if=self.cancel_if,
            trace=None if tracing is None else tracing.traceparent())
        if tracing is not None:  # a stream's span, or the call's spans (see finish)
            self._span = (tracing.context(), time.time_ns())
        return self._stream

    def failed(self, error: BaseException) -> Failure:
        """Record that this request ends with ``error``: its status, the shed counter, and
        one log line at the level the error deserves (unexpected errors are logged, with
        their traceback, by the surface's error handler instead)."""
        failure = failure_of(error, self.state.shed_status)
        self.status, self._failed, self.error = failure.status, True, error
        name = self.endpoint.name
        if isinstance(error, OverloadedError):
            self.state.metrics.shed_request(name, error.reason)
        if self.state.tracing is not None and has_request_context():
            self.state.tracing.failed(error, failure.status)
        if isinstance(error, (IPCServeError, HTTPException)):
            cause = getattr(error, "remote_traceback", "")
            logger.log(failure.level, "model %s: %d %s: %s%s", name, failure.status, failure.type,
                       failure.message, f"\n{cause}" if cause else "")
        return failure

    def body(self, frames: Iterable[bytes]) -> Iterator[bytes]:
        """The body of a streamed answer: ``frames`` as they come, then the end of the
        lifecycle. It runs after the view returned; when the client leaves, the server closes
        it (status 499) and the rest of the stream is cancelled in the ML process."""
        self.handed_off = True
        self.status = 200
        return self._body(iter(frames))

    def _body(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from frames
        except GeneratorExit:
            if not self._failed:
                self.status = 499  # nginx's "client closed request"
            raise
        except Exception:
            self.status = 500
            logger.exception("model %s: the streamed answer failed", self.endpoint.name)
            raise
        finally:
            self.finish()

    def finish(self) -> None:
        """Close the stream, release the admission, count the request once."""
        if self._finished:
            return
        self._finished = True
        stream = self._stream
        if stream is not None:
            stream.close()  # before its end: cancels the rest in the ML process
            if self.stats is None and self.status == 200 and stream.streaming is False:
                self.stats = stream.result
        if self._admission is not None:
            self._admission.release()
        elapsed = time.perf_counter() - self.started
        endpoint = self.endpoint
        if self.state.access_log is not None:
            self._log(elapsed)
        if self._span is not None and self.state.tracing is not None:
            parent, begun = self._span
            if stream is not None and stream.streaming:
                self.state.tracing.stream(endpoint.name, parent, begun, self.status)
            elif self.stats is not None:  # one answer: the call's queue and model spans
                self.state.tracing.call(endpoint.name, self.stats, parent)
        self.state.metrics.observe(endpoint.name, self.status, elapsed, self.stats,
                                   endpoint.ml.inflight)
        if self.status == 200:
            endpoint.recent.append(elapsed)
        version = self.version
        if version is not None:
            endpoint.finished(version, self.status, self.error)
            if endpoint.split.several:
                self.state.metrics.observe_version(endpoint.name, version.label, self.status,
                                                   elapsed)
            if self._inputs is not None and self.status == 200 and endpoint.shadow is not None \
                    and version.label != endpoint.split.shadow:
                how, inputs = self._inputs
                streamed = stream is not None and stream.streaming is not False
                endpoint.shadow.submit(how, inputs, None if self.stats is None else
                                       self.stats.value, streamed)


    def charge(self, tokens: int) -> None:
        """Count the tokens of the answer against its key's token quota (if it has one)."""
        if self.key is not None:
            self.key.charge(tokens)

    def _log(self, elapsed: float) -> None:
        assert self.state.access_log is not None
        stats, version = self.stats, self.version
        entry = dict(self.access or {"time": stamp(self.received)})
        entry.update({"status": self.status, "model": self.endpoint.name,
                      "version": None if version is None else version.label,
                      "latency_ms": round((time.monotonic() - self.received) * 1000, 3),
                      "key": None if self.key is None else self.key.name})
        if stats is not None and stats.batch_size:
            entry.update({"queue_ms": round(stats.queue_wait * 1000, 3),
                          "compute_ms": round(stats.inference_time * 1000, 3),
                          "batch_size": stats.batch_size})
        if has_request_context() and not self.handed_off:
            g.ipcserve_access_entry = entry  # written with the answer (log_request)
        else:
            self.state.access_log.write(entry)


def request_entry(received: float | None) -> dict[str, Any]:
    """The access log's fields of the request being handled (see :mod:`.access`), with its
    body when it is sampled for the audit (:func:`sample_bodies`)."""
    rule = request.url_rule
    entry = {"time": stamp(received or time.monotonic()), "method": request.method,
             "path": request.path, "route": None if rule is None else rule.rule,
             "trace_id": trace_id(request.headers.get("traceparent"))}
    if g.get("ipcserve_audit") and request.method in _WITH_BODY:
        entry["request_body"] = body_of(request.get_data(), request.mimetype)
    return entry


_WITH_BODY = ("POST", "PUT", "PATCH")


def sample_bodies() -> None:
    """``before_request`` (after the key check; registered only with an access log and
    ``access_log_bodies``): that share of requests keep their body for the access log (read
    once, cached for the route)."""
    if random.random() >= served().audit_share:
        return
    g.ipcserve_audit = True
    if request.method in _WITH_BODY:
        request.get_data(cache=True)  # the routes then read the cached bytes


def log_request(response: Response) -> Response:
    """``after_request`` (registered only with an access log): the access log line of the
    request; a model request's comes from
    its exchange (:meth:`Exchange.finish`), a streamed one's at the stream's end."""
    state = served()
    assert state.access_log is not None  # registered only with an access log
    entry = g.pop("ipcserve_access_entry", None)
    if entry is None:
        if g.get("ipcserve_exchange"):
            return response  # a streamed answer: its line comes at its end
        received = request.environ.get(RECEIVED_KEY)
        entry = request_entry(received)
        key = g.get("ipcserve_key")
        entry.update({"key": None if key is None else key.name,
                      "latency_ms": None if received is None else
                      round((time.monotonic() - received) * 1000, 3)})
    entry["status"] = response.status_code
    if g.get("ipcserve_audit") and not response.is_streamed:
        kind = response.mimetype or ""
        # JSON as JSON; anything else (a file of the status page...) as its size, unread
        entry["response_body"] = (
            body_of(response.get_data(), kind) if kind.endswith("json")
            and not response.direct_passthrough
            else {"content_type": kind or None, "bytes": response.content_length})
    state.access_log.write(entry)
    return response


@contextlib.contextmanager
def exchange(endpoint: Endpoint) -> Iterator[Exchange]:
    """The lifecycle of one request to ``endpoint``: use inside a view, as
    ``with exchange(endpoint) as ex: ...``. A draining server refuses at once; leaving the
    block normally answers 200, an exception answers (through the surface's error handler)
    with what :func:`failure_of` says; either way the request is counted once, unless a
    streamed :meth:`Exchange.body` took over. The deadline counts from the request's
    arrival (stamped by ipcserve's waitress), and a client that disconnects (waitress's
    probe) cancels the work: :func:`lifecycle` with both read from the request.

    Raises:
        WorkerUnavailableError: the server is draining.
    """
    environ = request.environ
    state = served()
    key: Key | None = g.get("ipcserve_key")
    if key is not None:
        key.allow(endpoint.name)
    g.ipcserve_exchange = True  # its access log line is the exchange's
    received = environ.get(RECEIVED_KEY)
    with lifecycle(state, endpoint, received=received, gone=environ.get(DISCONNECTED_KEY),
                   pin=request.headers.get(VERSION_HEADER), key=key,
                   access=request_entry(received) if state.access_log else None) as current:
        yield current


@contextlib.contextmanager
def lifecycle(state: Served, endpoint: Endpoint, *, received: float | None = None,
              gone: Callable[[], bool] | None = None, limit: float | None = None,
              pin: str | None = None, key: Key | None = None,
              access: dict[str, Any] | None = None) -> Iterator[Exchange]:
    """The lifecycle of one request to ``endpoint``, outside Flask too (the gRPC service):
    as :func:`exchange`, with the arrival time, the "client gone" probe and the client's
    own deadline given (see :class:`Exchange`). An exception leaving the block is recorded
    (:meth:`Exchange.failed`) and raised again, for the surface to answer.

    Raises:
        WorkerUnavailableError: the server is draining.
    """
    current = Exchange(state, endpoint, received, gone, limit, pin, key, access)
    try:
        if state.models.draining.is_set():
            raise WorkerUnavailableError("the server is shutting down")
        yield current
        if not current.handed_off:
            current.status = 200
    except BaseException as error:
        current.failed(error)
        current.handed_off = False  # the body made for the answer will never be sent
        raise
    finally:
        if not current.handed_off:
            current.finish()
