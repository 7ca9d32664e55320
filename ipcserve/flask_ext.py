"""The Flask extension: MLProcess models as HTTP endpoints, health, readiness, metrics.

Pallets style: ``IPCServe(app)`` or ``IPCServe()`` then ``init_app(app)``; per-app state lives
in ``app.extensions["ipcserve"]``; settings are ``app.config["IPCSERVE_*"]``.

Routes (under the optional ``url_prefix``):

* ``POST /v1/models/<name>/predict`` for every model, and ``POST /predict`` for the default one
* ``GET /v1/models`` and ``GET /v1/models/<name>``: status as JSON
* ``GET /healthz`` (the web process answers), ``GET /readyz`` (every model ready, not draining)
* ``GET /metrics`` (Prometheus text), ``GET /`` (a status page with a try-it form)
"""

from __future__ import annotations

import collections
import hmac
import math
import logging
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request, url_for
from werkzeug.exceptions import HTTPException

from . import decode, encode
from .errors import (
    InputError,
    IPCServeError,
    ModelError,
    NotFoundError,
    OverloadedError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    WorkerUnavailableError,
)
from .metrics import Metrics
from .mlprocess import MLProcess

__all__ = ["IPCServe", "error_response"]

logger = logging.getLogger(__name__)

KINDS = ("json", "image")


class _Endpoint:
    def __init__(self, ml: MLProcess, kind: str, schema: Any,
                 preprocess: Callable[[Any], Any] | None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.ml = ml
        self.name = ml.name
        self.kind = kind
        self.schema = schema
        self.preprocess = preprocess
        self.recent: collections.deque[float] = collections.deque(maxlen=200)

    def describe(self) -> dict[str, Any]:
        recent = list(self.recent)
        latency = None
        if recent:
            ordered = sorted(recent)
            latency = {"p50_ms": round(statistics.median(ordered) * 1000, 2),
                       "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 2),
                       "samples": len(ordered)}
        return {"name": self.name, "kind": self.kind,
                "url": url_for("ipcserve.predict", name=self.name),
                "status": self.ml.status, "recent_latency": latency}


class _State:
    """Per-app state, in ``app.extensions["ipcserve"]``."""

    def __init__(self, ext: IPCServe, app: Flask) -> None:
        self.ext = ext
        self.api_key: str | None = app.config["IPCSERVE_API_KEY"] or None
        self.max_pixels = int(app.config["IPCSERVE_MAX_IMAGE_PIXELS"])
        self.metrics = Metrics(lambda: {n: e.ml for n, e in ext.endpoints.items()})
        self.draining = threading.Event()
        self._lock = threading.Condition()
        self.inflight = 0

    def enter(self) -> None:
        with self._lock:
            self.inflight += 1

    def leave(self) -> None:
        with self._lock:
            self.inflight -= 1
            self._lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self.inflight == 0, timeout)


def error_response(error: IPCServeError | HTTPException) -> Response:
    """A JSON error response: ``{"error": {"type", "message"}}`` with the right status."""
    if isinstance(error, HTTPException):
        status = error.code or 500
        body = {"type": (error.name or "HTTPError").replace(" ", ""),
                "message": error.description or ""}
        if status == 413:
            body["type"] = "PayloadTooLargeError"
    else:
        status = error.http_status
        body = error.to_dict()
    response = jsonify({"error": body})
    response.status_code = status
    retry_after = getattr(error, "retry_after", None)
    if status == 503:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1)))
    return response


def _internal_error(exc: Exception) -> Response:
    logger.exception("unhandled error in %s %s", request.method, request.path)
    response = jsonify({"error": {"type": "InternalServerError",
                                  "message": "the server hit an unexpected error; see its log"}})
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
        if app is not None:
            self.init_app(app)

    # -- models --------------------------------------------------------------------
    def add_model(self, ml: MLProcess, kind: str = "json", *, schema: Any = None,
                  preprocess: Callable[[Any], Any] | None = None, default: bool | None = None) -> None:
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
        """
        if ml.name in self.endpoints:
            raise ValueError(f"a model named {ml.name!r} is already served")
        if preprocess is not None and kind != "image":
            raise ValueError("preprocess applies to kind='image' only")
        self.endpoints[ml.name] = _Endpoint(ml, kind, schema, preprocess)
        if default or (default is None and self.default is None):
            self.default = ml.name

    def start(self) -> None:
        """Start every model that is not started yet (waits until each has loaded)."""
        for endpoint in self.endpoints.values():
            if not endpoint.ml.started:
                endpoint.ml.start()

    def shutdown(self, grace: float | None = None) -> None:
        """Shut every model down (each drains its in-flight calls first)."""
        for endpoint in self.endpoints.values():
            endpoint.ml.shutdown(grace)

    # -- Flask wiring ----------------------------------------------------------------
    def init_app(self, app: Flask) -> None:
        """Register routes and state on ``app``.

        Raises:
            RuntimeError: ipcserve is already registered on this app.
        """
        if "ipcserve" in app.extensions:
            raise RuntimeError("ipcserve is already registered on this app; create one IPCServe "
                               "per app and call init_app once")
        app.config.setdefault("IPCSERVE_API_KEY", None)
        app.config.setdefault("IPCSERVE_MAX_IMAGE_PIXELS", 20_000_000)
        app.config.setdefault("IPCSERVE_MAX_CONTENT_LENGTH", 16 * 1024 * 1024)
        if app.config.get("MAX_CONTENT_LENGTH") is None:
            app.config["MAX_CONTENT_LENGTH"] = app.config["IPCSERVE_MAX_CONTENT_LENGTH"]
        app.extensions["ipcserve"] = _State(self, app)
        app.register_blueprint(self._blueprint(), url_prefix=self.url_prefix or None)

    def _blueprint(self) -> Blueprint:
        bp = Blueprint("ipcserve", __name__, static_folder="static", static_url_path="/ipcserve-static")
        bp.before_request(_check_api_key)
        bp.register_error_handler(IPCServeError, error_response)
        bp.register_error_handler(HTTPException, error_response)
        bp.register_error_handler(Exception, _internal_error)
        bp.add_url_rule("/v1/models/<name>/predict", "predict", _predict, methods=["POST"])
        bp.add_url_rule("/predict", "predict_default", _predict, methods=["POST"])
        bp.add_url_rule("/v1/models", "models", _models)
        bp.add_url_rule("/v1/models/<name>", "model", _model)
        bp.add_url_rule("/healthz", "healthz", _healthz)
        bp.add_url_rule("/readyz", "readyz", _readyz)
        bp.add_url_rule("/metrics", "metrics", _metrics)
        bp.add_url_rule("/", "index", _index)
        return bp


def _state() -> _State:
    state: _State = current_app.extensions["ipcserve"]
    return state


_OPEN_ENDPOINTS = {"ipcserve.healthz", "ipcserve.readyz", "ipcserve.index", "ipcserve.static"}


def _check_api_key() -> None:
    state = _state()
    if state.api_key is None or request.endpoint in _OPEN_ENDPOINTS:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             state.api_key.encode()):
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


def _inputs(endpoint: _Endpoint, max_pixels: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
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
    image = decode.decode_image(data, max_pixels)
    if endpoint.preprocess is not None:
        try:
            return (endpoint.preprocess(image),), {}
        except IPCServeError:
            raise
        except Exception as exc:
            raise InputError(f"the image could not be prepared for the model: {exc}") from None
    import numpy as np

    return (np.asarray(image.convert("RGB")),), {}


def _predict(name: str | None = None) -> Response:
    state = _state()
    endpoint = _endpoint(name)
    started = time.perf_counter()
    status = 500
    stats = None
    state.enter()
    try:
        if state.draining.is_set():
            raise WorkerUnavailableError("the server is shutting down")
        args, kwargs = _inputs(endpoint, state.max_pixels)
        # The caller directly, not ml(...): JSON fields are the model's inputs, so a field
        # named "timeout" or "self" must never reach MLProcess.__call__'s own parameters.
        caller = endpoint.ml._runtime().caller
        result = caller.call(args, kwargs, None)
        stats = getattr(caller.last_stats, "value", None)
        try:
            body = encode.to_jsonable(result)
        except TypeError as exc:
            raise ModelError(str(exc)) from None
        status = 200
        return jsonify(body)
    except (IPCServeError, HTTPException) as exc:
        status = exc.http_status if isinstance(exc, IPCServeError) else (exc.code or 500)
        if isinstance(exc, OverloadedError):
            state.metrics.shed.labels(endpoint.name).inc()
        if isinstance(exc, ModelError) and exc.remote_traceback:
            logger.error("model %s raised:\n%s", endpoint.name, exc.remote_traceback)
        raise
    finally:
        elapsed = time.perf_counter() - started
        state.metrics.observe(endpoint.name, status, elapsed, stats)
        if status == 200:
            endpoint.recent.append(elapsed)
        state.leave()


def _models() -> Response:
    state = _state()
    return jsonify({"default": state.ext.default,
                    "models": [e.describe() for e in state.ext.endpoints.values()]})


def _model(name: str) -> Response:
    return jsonify(_endpoint(name).describe())


def _healthz() -> Response:
    return jsonify({"status": "ok"})


def _readyz() -> Response:
    state = _state()
    models = {name: e.ml.ready for name, e in state.ext.endpoints.items()}
    ready = bool(models) and all(models.values()) and not state.draining.is_set()
    response = jsonify({"ready": ready, "draining": state.draining.is_set(), "models": models})
    response.status_code = 200 if ready else 503
    return response


def _metrics() -> Response:
    data, content_type = _state().metrics.exposition()
    return Response(data, content_type=content_type)


def _index() -> Response:
    bp_static = current_app.blueprints["ipcserve"].static_folder
    assert bp_static is not None
    import pathlib

    page = pathlib.Path(bp_static) / "index.html"
    return Response(page.read_bytes(), content_type="text/html; charset=utf-8")
