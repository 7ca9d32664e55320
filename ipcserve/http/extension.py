"""The Flask extension: MLProcess models as HTTP endpoints, health, readiness, metrics.

Pallets style: ``IPCServe(app)`` or ``IPCServe()`` then ``init_app(app)``; per-app state lives
in ``app.extensions["ipcserve"]``; settings are ``app.config["IPCSERVE_*"]`` (the ``http``
rows of :data:`ipcserve.config.SETTINGS`, and any engine setting, applied to the models).

Only the public engine API is used here: ``ml.admit()`` takes a place among the calls in
flight *before* the body is decoded (overload is refused at once), ``admission.call()``
runs the call with a deadline measured from when the server received the request, and
:meth:`IPCServe.drain` is the one way to stop (the CLI and the gunicorn hooks call it).

Routes (under the optional ``url_prefix``):

* ``POST /v1/models/<name>/predict`` for every model, and ``POST /predict`` for the default one
* ``POST /v1/models/<name>/reload``: a new version of the model, swapped in without dropping
  a request (:meth:`IPCServe.reload`)
* ``GET /v1/models`` (OpenAI's list shape, with each model's status) and ``GET /v1/models/<name>``
* the OpenAI API under ``/v1`` (chat/completions, completions, embeddings): :mod:`ipcserve.openai_api`
* ``GET /healthz`` (the web process answers), ``GET /readyz`` (every model ready, not draining)
* ``GET /metrics`` (Prometheus text), ``GET /`` (the status page: charts, event log, try-it)
* ``GET /v1/history`` and ``GET /v1/events``, the status page's data: :mod:`ipcserve.dashboard`
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import math
import os
import pathlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request, url_for
from werkzeug.exceptions import HTTPException

from . import decode, encode, status
from ..engine import events
from .cache import HEADER as CACHE_HEADER
from .cache import CacheSettings, ResponseCache, key_salt
from ..engine.config import read_settings, settings_of
from ..engine.errors import (
    ConfigError,
    ConflictError,
    InputError,
    IPCServeError,
    ModelError,
    NotFoundError,
    OverloadedError,
    ReloadError,
    RequestCancelledError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    WorkerUnavailableError,
)
from .metrics import Metrics
from ..engine.channel import Admission
from ..engine.mlprocess import MLProcess

# Set by ipcserve's waitress integration: time.monotonic() when the whole request had
# arrived. A request's deadline counts from then, not from when a thread picked it up.
RECEIVED_KEY = "ipcserve.received"
# waitress (with channel_request_lookahead > 0) puts a callable here that says whether the
# client has gone; the waiting handler checks it and cancels the work in the ML process.
DISCONNECTED_KEY = "waitress.client_disconnected"

__all__ = ["IPCServe", "error_response"]

logger = logging.getLogger(__name__)

KINDS = ("json", "image")


class _Endpoint:
    def __init__(self, ml: MLProcess, kind: str, schema: Any,
                 preprocess: Callable[[Any], Any] | None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        # The version serving now; a reload swaps in the next one (one attribute write, so a
        # request reads either the old or the new, never a mix).
        self.ml = ml
        self.generation = 1  # 1 at start, +1 per successful reload
        self.reloading = threading.Lock()  # one reload of this model at a time
        self.last_reload: dict[str, Any] | None = None
        self.cache_settings: CacheSettings | None = None
        self.cache: ResponseCache | None = None
        self.name = ml.name
        self.kind = kind
        self.schema = schema
        self.preprocess = preprocess
        self.recent: collections.deque[float] = collections.deque(maxlen=200)
        self.response_schema: Any = None  # a protobuf message class (ipcserve.schemas)
        self.created = int(time.time())  # OpenAI's "created" of the model entry

    def describe(self) -> dict[str, Any]:
        """One model's entry: OpenAI's model object (``id``, ``object``, ``created``,
        ``owned_by``) plus ipcserve's fields (``kind``, ``task``, ``url``, ``status``...)."""
        recent = list(self.recent)
        latency = None
        if recent:
            ordered = sorted(recent)
            latency = {"p50_ms": round(statistics.median(ordered) * 1000, 2),
                       "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 2),
                       "samples": len(ordered)}
        ml = self.ml
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "ipcserve", "name": self.name, "kind": self.kind,
                "task": getattr(ml, "task", None),
                "url": url_for("ipcserve.predict", name=self.name),
                "reload": url_for("ipcserve.reload", name=self.name),
                "generation": self.generation, "loaded_at": ml.loaded_at,
                "load_seconds": None if ml.load_seconds is None else round(ml.load_seconds, 3),
                "last_reload": self.last_reload,
                "cache": None if self.cache_settings is None else {
                    "ttl": self.cache_settings.ttl, "size": self.cache_settings.size,
                    "backend": self.cache.backend if self.cache else None},
                "status": ml.status, "recent_latency": latency}

    def admit(self) -> tuple[MLProcess, Admission]:
        """A place among the calls in flight of the version serving now, and that version.

        A request that read the old version just before a reload swapped it out, and found
        it no longer admitting, is admitted by the new one: a reload never refuses anyone.
        """
        while True:
            ml = self.ml
            try:
                return ml, ml.admit()
            except WorkerUnavailableError:
                if self.ml is ml:
                    raise


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


class _State:
    """Per-app state, in ``app.extensions["ipcserve"]``."""

    def __init__(self, ext: IPCServe, app: Flask) -> None:
        self.ext = ext
        self.api_key = check_api_key(app.config["IPCSERVE_API_KEY"])
        self.max_pixels = int(app.config["IPCSERVE_MAX_IMAGE_PIXELS"])
        # One budget per app: decoded images held at once, across its threads.
        self.decode_budget = decode.DecodeBudget(int(app.config["IPCSERVE_DECODE_MEMORY_BUDGET"]))
        self.metrics = Metrics(lambda: {n: e.ml for n, e in ext.endpoints.items()})
        self.shed_status = int(app.config["IPCSERVE_SHED_STATUS"])
        if self.shed_status not in (503, 429):
            raise ConfigError(f"IPCSERVE_SHED_STATUS must be 503 or 429, got {self.shed_status}")


def error_response(error: IPCServeError | HTTPException) -> Response:
    """A JSON error response: ``{"error": <message>, "type": <name>}`` with the right status."""
    if isinstance(error, HTTPException):
        status = error.code or 500
        body = {"error": error.description or "",
                "type": (error.name or "HTTPError").replace(" ", "")}
        if status == 413:
            body["type"] = "PayloadTooLargeError"
    else:
        status = error.http_status
        body = error.to_dict()
        if isinstance(error, OverloadedError) and "ipcserve" in current_app.extensions:
            status = _state().shed_status
    response = jsonify(body)
    response.status_code = status
    retry_after = getattr(error, "retry_after", None)
    if status in (503, 429):
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1)))
    return response


def _internal_error(exc: Exception) -> Response:
    logger.exception("unhandled error in %s %s", request.method, request.path)
    response = jsonify({"error": "the server hit an unexpected error; see its log",
                        "type": "InternalServerError"})
    response.status_code = 500
    return response


class IPCServe:
    """Expose MLProcess models over HTTP in a Flask app.

    Example::

        app = Flask(__name__)
        ipc = IPCServe(app)
        ipc.add_model(MyModel(), kind="json")   # POST /v1/models/mymodel/predict, /predict

    Args:
        app: the Flask app, or None to call :meth:`init_app` later.
        url_prefix: where the routes live (default: the root).
    """

    def __init__(self, app: Flask | None = None, *, url_prefix: str = "") -> None:
        self.url_prefix = url_prefix
        self.endpoints: dict[str, _Endpoint] = {}
        self.default: str | None = None
        # Set by drain(): /readyz turns 503 and new requests get 503 at once.
        self.draining = threading.Event()
        # Set when a drain begins, before its delay: /readyz turns 503 and responses close
        # their connections, while requests are still admitted and answered.
        self.unready = threading.Event()
        self._hurry = threading.Event()  # a forced stop cuts the drain delay short
        self._engine_settings: dict[str, Any] = {}  # from app.config, for the models
        self._app: Flask | None = None
        if app is not None:
            self.init_app(app)

    @staticmethod
    def of(app: Any) -> IPCServe:
        """The IPCServe registered on ``app`` (for servers and hooks that get only the app).

        Raises:
            RuntimeError: ``app`` is not a Flask app on which IPCServe was initialised.
        """
        state = getattr(app, "extensions", {}).get("ipcserve")
        if state is None:
            raise RuntimeError("this app has no IPCServe; call IPCServe(app) or init_app(app) "
                               "on the Flask app you serve")
        ext: IPCServe = state.ext
        return ext

    # -- models --------------------------------------------------------------------
    def add_model(self, ml: MLProcess, kind: str = "json", *, schema: Any = None,
                  preprocess: Callable[[Any], Any] | None = None, default: bool | None = None,
                  response_schema: Any = None, cache: CacheSettings | bool | None = None) -> None:
        """Serve ``ml`` at ``/v1/models/<ml.name>/predict``.

        Args:
            ml: the MLProcess (started now or later; requests get 503 until it is).
            kind: "json" (the body's fields become keyword arguments of predict) or
                "image" (multipart upload or raw ``image/*`` body, decoded with pillow in
                the web process; ``preprocess(PIL.Image)`` turns it into the model's input,
                by default an RGB ``uint8`` array; JSON bodies are accepted as for "json").
            schema: optional JSON Schema dict or pydantic model class for JSON bodies.
            preprocess: image kind only; runs in the web process.
            default: serve this model at ``/predict`` too (default: the first model added).
            response_schema: optional protobuf message class the model's (non-streamed)
                answer must parse as; one that does not is a logged 500.
            cache: keep this model's answers to identical requests
                (:class:`~ipcserve.cache.CacheSettings`, or True for the defaults: 300 s,
                1024 answers); see :mod:`ipcserve.cache`.
        """
        if ml.name in self.endpoints:
            raise ValueError(f"a model named {ml.name!r} is already served")
        if preprocess is not None and kind != "image":
            raise ValueError("preprocess applies to kind='image' only")
        if self._engine_settings and not ml.started:
            ml.configure(keep_keywords=True, **self._engine_settings)
        endpoint = _Endpoint(ml, kind, schema, preprocess)
        endpoint.response_schema = response_schema
        if cache:
            endpoint.cache_settings = cache if isinstance(cache, CacheSettings) else CacheSettings()
            if self._app is not None:
                self._make_cache(self._app, endpoint)
        self.endpoints[ml.name] = endpoint
        if default or (default is None and self.default is None):
            self.default = ml.name

    def start(self, *, wait: bool = True) -> None:
        """Start every model that is not started yet.

        Args:
            wait: False returns at once: models load in the background, requests get 503
                ("loading") meanwhile, and :meth:`wait_started` waits and raises load errors.

        Raises:
            ModelError / WorkerUnavailableError: a model failed to load (``wait=True``).
        """
        for endpoint in self.endpoints.values():
            if not endpoint.ml.started:
                endpoint.ml.start(wait=wait)

    def wait_started(self, timeout: float | None = None) -> bool:
        """After ``start(wait=False)``: True once every model is started, False when
        ``timeout`` passed first.

        Raises:
            what a model's load raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for endpoint in self.endpoints.values():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not endpoint.ml.wait_started(remaining):
                return False
        return True

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered, over every model (this web process)."""
        return sum(endpoint.ml.inflight for endpoint in self.endpoints.values())

    def drain(self, grace: float | None = None, delay: float = 0.0) -> bool:
        """Stop the way a server should, in the order load balancers expect:

        1. ``/readyz`` turns 503 and every response from now on closes its connection
           (``Connection: close``), while requests are still admitted and answered for
           ``delay`` seconds: balancers and endpoint controllers see the host go unready
           and stop sending before anything is refused;
        2. new requests are refused (503 + Retry-After: never admitted, safe to retry
           elsewhere), the ones in flight are answered for up to ``grace`` seconds;
        3. every ML process stops (the Shutdown sentinel, join, kill what is left). A model
           still loading is aborted.

        Safe to call twice and from any thread; a call with ``grace=0`` (a second signal)
        cuts a delay in progress short.

        Args:
            grace: seconds for requests in flight (default: the largest ``shutdown_grace``
                of the models).
            delay: seconds of step 1 (the server setting ``drain_delay``).

        Returns:
            True when every request in flight was answered within ``grace``.
        """
        if not self.unready.is_set():
            events.record("drain-started", None, "drain started: /readyz says 503, "
                          "requests in flight are answered, then the ML processes stop")
        self.unready.set()
        if grace == 0:
            self._hurry.set()
        if delay > 0 and not self.draining.is_set():
            self._hurry.wait(delay)
        self.draining.set()
        models = [endpoint.ml for endpoint in self.endpoints.values()]
        if grace is None:
            grace = max((ml.config.shutdown_grace for ml in models), default=0.0)
        for ml in models:  # every model's intake stops at the same moment
            ml.stop_admitting()
        deadline = time.monotonic() + grace
        idle = True
        for ml in models:
            remaining = max(0.0, deadline - time.monotonic())
            idle = ml.shutdown(grace=remaining) and idle
        # A reload that swapped in its new version while the drain began.
        for endpoint in self.endpoints.values():
            if all(endpoint.ml is not ml for ml in models):
                idle = endpoint.ml.shutdown(grace=max(0.0, deadline - time.monotonic())) and idle
        return idle

    def shutdown(self, grace: float | None = None) -> None:
        """Same as :meth:`drain` (kept for code written against ipcserve 0.1)."""
        self.drain(grace)

    def reload(self, name: str, grace: float | None = None) -> dict[str, Any]:
        """Replace model ``name`` by a fresh copy of itself without failing a request.

        1. New ML processes start beside the old ones and load the model: its weights, and
           its code too under the spawn and forkserver start methods (fork copies this
           process's modules as they are). Requests go on to the old version meanwhile.
        2. Once every new process is ready, requests go to the new version (one attribute
           swap); the model's cached answers are forgotten (the generation is in the key).
        3. The old version stops admitting (a request that raced the swap is admitted by
           the new one), answers what it holds within ``grace`` seconds (default: its
           ``shutdown_grace``), and its processes stop.

        Memory holds both versions during the load. A load that fails, times out or is
        interrupted by a drain leaves the old version serving, unchanged.

        Returns:
            ``{"model", "generation", "previous_generation", "load_seconds", "drained"}``.

        Raises:
            NotFoundError: no such model.
            ConflictError: a reload of it is already running; it is still loading its first
                version; or this web process did not start it (a gunicorn worker).
            ReloadError: the new version failed to load (the old one keeps serving).
            WorkerUnavailableError: the server is draining.
        """
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            raise NotFoundError(f"no model named {name!r}; models: {', '.join(sorted(self.endpoints))}")
        if not endpoint.reloading.acquire(blocking=False):
            raise ConflictError(f"a reload of model {name!r} is already running")
        try:
            if self.unready.is_set() or self.draining.is_set():
                raise WorkerUnavailableError("the server is shutting down")
            old = endpoint.ml
            owner = old.__dict__.get("_ipc")
            if owner is None:
                raise ConflictError(f"model {name!r} is not started yet (still loading its "
                                    "first version?); reload it once it serves")
            if owner.owner_pid != os.getpid():
                raise ConflictError(
                    f"model {name!r} was started by process {owner.owner_pid}, not this web "
                    "process (a gunicorn worker?); restart the server to load a new version")
            new = old.fresh()
            logger.info("model %s: reloading (generation %d -> %d)", name, endpoint.generation,
                        endpoint.generation + 1)
            try:
                new.start()
            except Exception as exc:
                new.shutdown(grace=0)
                endpoint.last_reload = {"at": time.time(), "ok": False, "error": str(exc),
                                        "generation": endpoint.generation}
                events.record("reload-failed", name, f"reload failed, generation "
                              f"{endpoint.generation} keeps serving: {exc}",
                              generation=endpoint.generation)
                cause = getattr(exc, "remote_traceback", None)
                logger.error("model %s: reload failed, generation %d keeps serving: %s%s",
                             name, endpoint.generation, exc, f"\n{cause}" if cause else "")
                raise ReloadError(f"model {name!r}: the new version failed to load ({exc}); "
                                  f"generation {endpoint.generation} keeps serving") from None
            if self.unready.is_set() or self.draining.is_set():  # a drain began meanwhile
                new.shutdown(grace=0)
                raise WorkerUnavailableError("the server is shutting down")
            previous = endpoint.generation
            endpoint.ml = new
            endpoint.generation = previous + 1
            if endpoint.cache is not None:
                endpoint.cache.clear()
            drained = old.shutdown(grace=grace)
            endpoint.last_reload = {"at": time.time(), "ok": True, "error": None,
                                    "generation": endpoint.generation}
            events.record("reloaded", name, f"reloaded: generation {endpoint.generation} "
                          f"serving (loaded in {new.load_seconds or 0.0:.2f}s), generation "
                          f"{previous} stopped", generation=endpoint.generation)
            logger.info("model %s: generation %d serving (loaded in %.2fs); generation %d "
                        "stopped", name, endpoint.generation, new.load_seconds or 0.0, previous)
            return {"model": name, "generation": endpoint.generation,
                    "previous_generation": previous,
                    "load_seconds": round(new.load_seconds or 0.0, 3), "drained": drained}
        finally:
            endpoint.reloading.release()

    def reload_all(self, grace: float | None = None) -> dict[str, Any]:
        """:meth:`reload` every model, one after the other (SIGHUP). A model whose reload
        fails keeps its old version; the others are reloaded all the same.

        Returns:
            ``{name: reload()'s answer, or {"error": message}}``.
        """
        results: dict[str, Any] = {}
        for name in list(self.endpoints):
            try:
                results[name] = self.reload(name, grace)
            except IPCServeError as exc:
                logger.error("model %s: not reloaded: %s", name, exc)
                results[name] = exc.to_dict()
        return results

    def _make_cache(self, app: Flask, endpoint: _Endpoint) -> None:
        assert endpoint.cache_settings is not None
        api_key = check_api_key(app.config.get("IPCSERVE_API_KEY"))
        endpoint.cache = ResponseCache(app, endpoint.name, endpoint.cache_settings,
                                       key_salt(api_key))

    # -- Flask wiring ----------------------------------------------------------------
    def init_app(self, app: Flask) -> None:
        """Register routes and state on ``app``.

        Raises:
            RuntimeError: ipcserve is already registered on this app.
        """
        if "ipcserve" in app.extensions:
            raise RuntimeError("ipcserve is already registered on this app; create one IPCServe "
                               "per app and call init_app once")
        for setting in settings_of("http"):
            app.config.setdefault(setting.env, setting.default)
            app.config[setting.env] = setting.parse(app.config[setting.env])
        if app.config.get("MAX_CONTENT_LENGTH") is None:
            app.config["MAX_CONTENT_LENGTH"] = app.config["IPCSERVE_MAX_CONTENT_LENGTH"]
        # Engine settings in app.config apply to this app's models (keywords given to a
        # model's constructor win).
        self._engine_settings = read_settings(app.config, "engine")
        for endpoint in self.endpoints.values():
            if self._engine_settings and not endpoint.ml.started:
                endpoint.ml.configure(keep_keywords=True, **self._engine_settings)
        app.extensions["ipcserve"] = _State(self, app)
        self._app = app
        for endpoint in self.endpoints.values():
            if endpoint.cache_settings is not None:
                self._make_cache(app, endpoint)
        app.register_blueprint(self._blueprint(), url_prefix=self.url_prefix or None)
        for rule in app.url_map.iter_rules():
            if rule.endpoint.startswith("ipcserve."):
                # Werkzeug answers '/v1//models' (merge_slashes) and '/ml' for '/ml/'
                # (strict_slashes) with a 308 HTML redirect to a URL built from the Host
                # header; ipcserve answers JSON: the first 404s, the second just matches.
                rule.merge_slashes = False
                rule.strict_slashes = False

    def _blueprint(self) -> Blueprint:
        from . import openai, openapi  # they import this module

        bp = Blueprint("ipcserve", __name__, static_folder="static", static_url_path="/ipcserve-static")
        bp.before_request(_check_api_key)
        bp.register_error_handler(IPCServeError, error_response)
        bp.register_error_handler(HTTPException, error_response)
        bp.register_error_handler(Exception, _internal_error)
        bp.add_url_rule("/v1/models/<name>/predict", "predict", _predict, methods=["POST"])
        bp.add_url_rule("/v1/models/<name>/reload", "reload", _reload, methods=["POST"])
        bp.add_url_rule("/predict", "predict_default", _predict, methods=["POST"])
        bp.add_url_rule("/v1/models", "models", _models)
        bp.add_url_rule("/v1/models/<name>", "model", _model)
        bp.add_url_rule("/healthz", "healthz", _healthz)
        bp.add_url_rule("/readyz", "readyz", _readyz)
        bp.add_url_rule("/metrics", "metrics", _metrics)
        bp.add_url_rule("/", "index", _index)
        # Nested, so it shares the url_prefix and the API key check; its own error
        # handlers answer in OpenAI's error shape.
        bp.register_blueprint(openai.blueprint())
        openapi.register(bp)  # /openapi.json, /docs, the V2 protocol
        status.register(bp)  # /v1/history, /v1/events: the status page's data
        return bp


def _state() -> _State:
    state: _State = current_app.extensions["ipcserve"]
    return state


_OPEN_ENDPOINTS = {"ipcserve.healthz", "ipcserve.readyz", "ipcserve.index", "ipcserve.static",
                   "ipcserve.docs", "ipcserve.v2.live", "ipcserve.v2.ready"}


def _check_api_key() -> None:
    state = _state()
    if state.api_key is None or request.endpoint in _OPEN_ENDPOINTS:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # WSGI gives header values as latin-1 text: encoding them back gives the bytes the
    # client sent, so a non-ASCII key sent as UTF-8 (curl's way) compares equal.
    try:
        sent = token.strip().encode("latin-1")
    except UnicodeEncodeError:
        sent = b""
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent, state.api_key):
        raise UnauthorizedError("this server needs an API key: send 'Authorization: Bearer <key>'")


def _endpoint(name: str | None) -> _Endpoint:
    state = _state()
    if name is None:
        name = state.ext.default
        if name is None:
            raise NotFoundError("no model is served here")
    endpoint = state.ext.endpoints.get(name)
    if endpoint is None:
        known = ", ".join(sorted(state.ext.endpoints)) or "none"
        raise NotFoundError(f"no model named {name!r}; models: {known}")
    return endpoint


def _inputs(endpoint: _Endpoint, max_pixels: int,
            budget: decode.DecodeBudget) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Decode the request into the model call's arguments."""
    mimetype = request.mimetype or ""
    if mimetype == "application/json" or mimetype.endswith("+json"):
        body = decode.parse_json_object(request.get_data(cache=False))
        return (), decode.validate(body, endpoint.schema)
    if endpoint.kind == "json":
        raise UnsupportedMediaTypeError(
            f"send the inputs as a JSON object with Content-Type: application/json, got "
            f"{mimetype or 'no Content-Type'}")
    if mimetype == "multipart/form-data":
        files = request.files
        upload = files.get("image") or next(iter(files.values()), None)
        if upload is None:
            raise InputError("the multipart form has no file; upload the image in a field named 'image'")
        data = upload.read()
    elif mimetype.startswith("image/"):
        data = request.get_data(cache=False)
    else:
        raise UnsupportedMediaTypeError(
            "send an image as multipart/form-data (field 'image') or as a raw image/* body, or "
            f"JSON inputs; got {mimetype or 'no Content-Type'}")
    image = decode.open_image(data, max_pixels)  # header only: size checked, nothing decoded
    # The decoded pixels and the copies preprocessing makes count against the budget until
    # the model's input is built.
    with budget.reserve(decode.decoded_bytes(image)):
        decode.load_image(image)
        if endpoint.preprocess is not None:
            try:
                return (endpoint.preprocess(image),), {}
            except IPCServeError:
                raise
            except Exception as exc:
                raise InputError(f"the image could not be prepared for the model: {exc}") from None
        import numpy as np

        return (np.asarray(image.convert("RGB")),), {}


_NOTHING = object()
STREAM_TYPES = ("text/event-stream", "application/x-ndjson")


def _predict(name: str | None = None) -> Response:
    state = _state()
    endpoint = _endpoint(name)
    started = time.perf_counter()
    status = 500
    result = None
    admission = None
    handed_off = False  # a streaming response releases the admission when it ends
    cache_key = None
    try:
        if state.ext.draining.is_set():
            raise WorkerUnavailableError("the server is shutting down")
        received = request.environ.get(RECEIVED_KEY) or time.monotonic()
        if endpoint.cache is not None:
            cache_key = endpoint.cache.key(endpoint.generation, request.mimetype or "",
                                           request.get_data())
            hit = None if cache_key is None else endpoint.cache.get(cache_key)
            state.metrics.cache_result(endpoint.name, hit is not None)
            if hit is not None:
                status = 200
                return Response(hit[0], content_type=hit[1], headers={CACHE_HEADER: "hit"})
        # Admission before decoding: under overload the body is never even parsed.
        ml, admission = endpoint.admit()
        deadline = received + ml.config.timeout
        args, kwargs = _inputs(endpoint, state.max_pixels, state.decode_budget)
        # stream(), not ml(...): every JSON field is the model's input, "timeout" too. A
        # model that does not stream gives one item, its answer.
        stream = admission.stream(args, kwargs, deadline=deadline,
                                  cancel_if=request.environ.get(DISCONNECTED_KEY))
        first = next(stream, _NOTHING)
        if not stream.streaming:
            result = stream.result
            fast = encode.fast_json(first) if endpoint.response_schema is None else None
            if fast is not None:  # orjson installed and the answer is plain data
                response = Response(fast, mimetype="application/json")
            else:
                answer = _jsonable(first)
                if endpoint.response_schema is not None:
                    from .schemas import check_response

                    check_response(answer, endpoint.response_schema, endpoint.name)
                response = jsonify(answer)
            status = 200
            if cache_key is not None and endpoint.cache is not None:
                endpoint.cache.set(cache_key, response.get_data(), response.content_type)
                response.headers[CACHE_HEADER] = "miss"
            return response
        # SSE only when asked for by name (EventSource sends it); NDJSON otherwise (*/*).
        sse = any(kind == STREAM_TYPES[0] and quality > 0
                  for kind, quality in request.accept_mimetypes)
        body = _stream_body(stream, first, sse, admission, endpoint, state.metrics, started)
        handed_off = True
        status = 200
        return Response(body, mimetype=STREAM_TYPES[0] if sse else STREAM_TYPES[1],
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    except (IPCServeError, HTTPException) as exc:
        status = exc.http_status if isinstance(exc, IPCServeError) else (exc.code or 500)
        _note_error(endpoint, state.metrics, exc)
        raise
    finally:
        if not handed_off:
            if admission is not None:
                admission.release()
            elapsed = time.perf_counter() - started
            state.metrics.observe(endpoint.name, status, elapsed, result, endpoint.ml.inflight)
            if status == 200:
                endpoint.recent.append(elapsed)


def _jsonable(value: Any) -> Any:
    try:
        return encode.to_jsonable(value)
    except TypeError as exc:
        raise ModelError(str(exc)) from None


def _note_error(endpoint: _Endpoint, metrics: Metrics, exc: Exception) -> None:
    if isinstance(exc, OverloadedError):
        metrics.shed.labels(endpoint.name).inc()
    if isinstance(exc, RequestCancelledError):
        logger.info("model %s: client disconnected; request cancelled", endpoint.name)
    if isinstance(exc, ModelError) and exc.remote_traceback:
        logger.error("model %s raised:\n%s", endpoint.name, exc.remote_traceback)


def _frame(sse: bool, value: Any, event: str | None = None) -> bytes:
    data = json.dumps(value, separators=(",", ":"))
    if not sse:
        return (data + "\n").encode()
    return (f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode()


def _stream_body(stream: Any, first: Any, sse: bool, admission: Any, endpoint: _Endpoint,
                 metrics: Metrics, started: float) -> Iterator[bytes]:
    """The body of a streaming response: one frame per item as the model makes it, then an
    ``end`` event (SSE) or nothing more (NDJSON); an error ends it with an ``error`` frame.
    Runs after the view returned, so it needs no request context. When the client leaves,
    the server closes this generator: the rest of the stream is cancelled."""
    status = 200
    try:
        item = first
        while item is not _NOTHING:
            yield _frame(sse, _jsonable(item))
            item = next(stream, _NOTHING)
        if sse:
            yield _frame(sse, {"items": stream.count}, "end")
    except IPCServeError as exc:
        status = exc.http_status
        _note_error(endpoint, metrics, exc)
        yield _frame(sse, exc.to_dict(), "error")
    finally:
        stream.close()
        admission.release()
        metrics.observe(endpoint.name, status, time.perf_counter() - started, None,
                        endpoint.ml.inflight)


def _reload(name: str) -> Response:
    return jsonify(_state().ext.reload(_endpoint(name).name))


def _models() -> Response:
    # OpenAI's list shape, so that openai's client.models.list() works; "default" is ours.
    state = _state()
    return jsonify({"object": "list",
                    "data": [e.describe() for e in state.ext.endpoints.values()],
                    "default": state.ext.default})


def _model(name: str) -> Response:
    return jsonify(_endpoint(name).describe())


def _healthz() -> Response:
    return jsonify({"status": "ok"})


def _readyz() -> Response:
    state = _state()
    draining = state.ext.unready.is_set() or state.ext.draining.is_set()
    models = {name: e.ml.ready for name, e in state.ext.endpoints.items()}
    ready = bool(models) and all(models.values()) and not draining
    response = jsonify({"ready": ready, "draining": draining, "models": models})
    response.status_code = 200 if ready else 503
    return response


def _metrics() -> Response:
    data, content_type = _state().metrics.exposition()
    return Response(data, content_type=content_type)


def _index() -> Response:
    bp_static = current_app.blueprints["ipcserve"].static_folder
    assert bp_static is not None
    page = pathlib.Path(bp_static) / "index.html"
    return Response(page.read_bytes(), content_type="text/html; charset=utf-8")
