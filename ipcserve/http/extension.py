"""The Flask extension: MLProcess models as HTTP endpoints (``from ipcserve.flask import IPCServe``).

Pallets style: ``IPCServe(app)`` or ``IPCServe()`` then ``init_app(app)``; per-app state lives
in ``app.extensions["ipcserve"]`` (:class:`~.serving.Served`); settings are
``app.config["IPCSERVE_*"]`` (the ``http`` rows of :data:`ipcserve.engine.config.SETTINGS`,
and any engine setting, applied to the models).

This module only assembles: the surfaces declare their routes (:mod:`.native`,
:mod:`.openai`, :mod:`.v2`, :mod:`.status`, :mod:`.openapi`), the registry
(:mod:`.routes`) adds them to one blueprint with the API key check and the error handler,
the serving core (:mod:`.serving`) runs every request. The model lifecycle a server drives
is here: :meth:`IPCServe.start`, :meth:`IPCServe.drain` (the one way to stop: the CLI, the
gunicorn hooks and the Ray replica call it) and :meth:`IPCServe.reload` (:mod:`.reload`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response
from werkzeug.exceptions import HTTPException

from ..engine import events
from ..engine.config import read_settings, settings_of
from ..engine.errors import ConfigError, IPCServeError
from ..engine.mlprocess import MLProcess
from . import native, openai, openapi, reload, routes, status, v2
from .cache import CacheSettings, ResponseCache, key_salt
from .pool import resident_bytes
from .serving import Endpoint, Models, Served, check_api_key, error_response as _respond
from .serving import failure_of, log_request, sample_bodies, served
from .shadow import Shadow
from .tracing import Tracing
from .rollback import Rollback
from .versions import DEFAULT_VERSION, Version

__all__ = ["IPCServe", "error_response"]

logger = logging.getLogger(__name__)

#: Every route, surface by surface, in the order of docs/http.md.
ROUTES = [*native.ROUTES, *openai.ROUTES, *v2.ROUTES, *status.ROUTES, *openapi.ROUTES]


def error_response(error: IPCServeError | HTTPException) -> Response:
    """ipcserve's JSON error answer ``{"error": <message>, "type": <name>}`` with the right
    status and headers; for an app's own error handlers (unknown URLs, wrong methods)."""
    try:
        shed_status = served().shed_status
    except RuntimeError:  # an app without ipcserve
        shed_status = 503
    failure = failure_of(error, shed_status)
    return _respond(failure, routes.IPCSERVE_ERRORS.error_body(failure))


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
        self.models = Models()
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
        extension = served(app).extension
        assert isinstance(extension, IPCServe)
        return extension

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        """The served models by name."""
        return self.models.endpoints

    @property
    def default(self) -> str | None:
        """The model served at ``/predict``."""
        return self.models.default

    @property
    def draining(self) -> threading.Event:
        """Set once new requests are refused (503 at once)."""
        return self.models.draining

    @property
    def unready(self) -> threading.Event:
        """Set when a drain begins: readiness says 503, responses close their connections."""
        return self.models.unready

    # -- models --------------------------------------------------------------------
    def add_model(self, ml: MLProcess, kind: str = "json", *, schema: Any = None,
                  preprocess: Callable[[Any], Any] | None = None, default: bool | None = None,
                  response_schema: Any = None, cache: CacheSettings | bool | None = None,
                  version: str = DEFAULT_VERSION, lazy: bool = False,
                  idle_unload: float | None = None, rollback: Rollback | None = None) -> None:
        """Serve ``ml`` at ``/v1/models/<ml.name>/predict``.

        Args:
            ml: the MLProcess (started now or later; requests get 503 until it is).
            kind: "json" (the body's fields become keyword arguments of predict) or
                "image" (multipart upload or raw ``image/*`` body, decoded with pillow in
                the web process; ``preprocess(PIL.Image)`` turns it into the model's input:
                by default the model's ``image_preprocess`` if it has one, else an RGB
                ``uint8`` array; JSON bodies are accepted as for "json").
            schema: optional JSON Schema dict, pydantic model class or protobuf message
                class for JSON bodies.
            preprocess: image kind only; runs in the web process.
            default: serve this model at ``/predict`` too (default: the first model added).
            response_schema: optional protobuf message class the model's (non-streamed)
                answer must parse as; one that does not is a logged 500.
            cache: keep this model's answers to identical requests
                (:class:`~ipcserve.http.cache.CacheSettings`, or True for the defaults:
                300 s, 1024 answers); see :mod:`ipcserve.http.cache`.
            version: the name of ``ml``'s version (more with :meth:`add_version`).
            lazy: load it on its first request instead of at :meth:`start` (see
                :mod:`ipcserve.http.pool`).
            idle_unload: unload it after this many seconds without a request; the next
                request loads it again.
            rollback: when a canary of this model is rolled back on its own (default:
                :class:`~ipcserve.http.rollback.Rollback`'s defaults).

        Raises:
            ValueError: a model of that name is served already, or ``preprocess`` is given
                for a JSON model (``ConfigError``, a ValueError: a bad version name,
                ``idle_unload`` or ``rollback``).
        """
        if ml.name in self.models.endpoints:
            raise ValueError(f"a model named {ml.name!r} is already served")
        if preprocess is not None and kind != "image":
            raise ValueError("preprocess applies to kind='image' only")
        if kind == "image" and preprocess is None:
            preprocess = getattr(ml, "image_preprocess", None)
        if self._engine_settings and not ml.started:
            ml.configure(keep_keywords=True, **self._engine_settings)
        settings = (cache if isinstance(cache, CacheSettings) else CacheSettings()) if cache else None
        endpoint = Endpoint(ml, kind, schema=schema, preprocess=preprocess,
                            response_schema=response_schema, cache=settings, version=version,
                            lazy=lazy, idle_unload=idle_unload, rollback=rollback)
        if settings is not None and self._app is not None:
            self._make_cache(self._app, endpoint)
        self.models.add(endpoint)
        if default or (default is None and self.models.default is None):
            self.models.default = ml.name

    def add_version(self, name: str, version: str, ml: MLProcess, *, weight: float = 0.0,
                    shadow: bool = False, tolerance: float = 1e-6, lazy: bool | None = None,
                    idle_unload: float | None = None) -> None:
        """Serve ``ml`` as version ``version`` of model ``name`` (added with
        :meth:`add_model`, whose version is the stable one).

        Args:
            name: the model.
            version: the new version's name (``X-IPCServe-Version`` pins it).
            ml: its MLProcess; it takes the model's name.
            weight: percent of the model's traffic it gets (a canary); 0: only pinned
                requests (a standby, or promoted later).
            shadow: it gets a copy of every answered request instead, its answers compared
                with the ones the client got (never sent to a client); loaded at start,
                never evicted.
            tolerance: a shadow's numbers agree when this close (relative or absolute).
            lazy / idle_unload: as for :meth:`add_model` (default: the stable version's).

        Raises:
            ValueError: no such model, a model with a response cache, a version of that
                name already, a second shadow, or canary weights past 100 (``ConfigError``).
        """
        endpoint = self.models.endpoints.get(name)
        if endpoint is None:
            raise ValueError(f"no model named {name!r}; add_model() it first")
        if endpoint.cache_settings is not None:
            raise ValueError(f"model {name!r} has a response cache: a cached answer would skip "
                             "the traffic split; serve versions without a cache")
        stable = endpoint.split.versions[endpoint.split.stable]
        if shadow:
            lazy, idle_unload = False, None  # compared from the first request on
        ml.name = name
        if self._engine_settings and not ml.started:
            ml.configure(keep_keywords=True, **self._engine_settings)
        added = Version(name, version, ml, weight=weight,
                        lazy=stable.lazy if lazy is None else lazy,
                        idle_unload=stable.idle_unload if idle_unload is None else idle_unload)
        if shadow:
            added.pinned += 1  # copies go straight to its MLProcess: never evicted
            endpoint.shadow = Shadow(endpoint.split, tolerance)
        endpoint.split.add(added, shadow=shadow)
        self.models.pool.register(added)

    def start(self, *, wait: bool = True) -> None:
        """Start every model version that is not started yet and does not load on demand.

        Args:
            wait: False returns at once: models load in the background, requests get 503
                ("loading") meanwhile, and :meth:`wait_started` waits and raises load errors.

        Raises:
            ConfigError: more versions load at start than ``max_loaded_models``.
            ModelError / WorkerUnavailableError: a model failed to load (``wait=True``).
        """
        self.models.pool.check_start()
        for version in self._eager():
            if not version.ml.started:
                version.ml.start(wait=wait)
                version.loads["start"] += 1
        self.models.pool.start()  # the idle-unload thread, if a version has idle_unload

    def _eager(self) -> list[Version]:
        return [v for e in self.models.endpoints.values() for v in e.versions if not v.lazy]

    def wait_started(self, timeout: float | None = None) -> bool:
        """After ``start(wait=False)``: True once every model is started, False when
        ``timeout`` passed first.

        Raises:
            what a model's load raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for version in self._eager():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not version.ml.wait_started(remaining):
                return False
            version.last_used = time.monotonic()  # idle_unload counts from the load
            if version.ml.started:  # what it weighs, for max_loaded_memory
                version.rss = resident_bytes(version.ml.pids)
        return True

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered, over every model (this web process)."""
        return self.models.inflight

    def drain(self, grace: float | None = None, delay: float = 0.0) -> bool:
        """Stop the way a server should, in the order load balancers expect:

        1. readiness turns 503 (``/readyz``, ``/v2/health/ready``, Ray's health check) and
           every response from now on closes its connection (``Connection: close``), while
           requests are still admitted and answered for ``delay`` seconds: balancers and
           endpoint controllers see the host go unready and stop sending before anything
           is refused;
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
        models = self.models
        if not models.unready.is_set():
            events.record("drain-started", None, "drain started: /readyz says 503, "
                          "requests in flight are answered, then the ML processes stop")
        models.unready.set()
        if grace == 0:
            self._hurry.set()
        if delay > 0 and not models.draining.is_set():
            self._hurry.wait(delay)
        models.draining.set()
        loading = models.pool.close()  # no load or unload starts from now on
        for endpoint in models.endpoints.values():
            if endpoint.shadow is not None:
                endpoint.shadow.stop()
        serving = [v.ml for endpoint in models.endpoints.values() for v in endpoint.versions]
        if grace is None:
            grace = max((ml.config.shutdown_grace for ml in serving), default=0.0)
        for ml in serving:  # every model's intake stops at the same moment
            ml.stop_admitting()
        deadline = time.monotonic() + grace
        idle = True
        for ml in serving:
            idle = ml.shutdown(grace=max(0.0, deadline - time.monotonic())) and idle
        # A reload that swapped in its new version while the drain began.
        for endpoint in models.endpoints.values():
            for version in endpoint.versions:
                if all(version.ml is not ml for ml in serving):
                    idle = version.ml.shutdown(grace=max(0.0, deadline - time.monotonic())) \
                        and idle
        for thread in loading:  # their MLProcesses stopped above: they end now
            thread.join(max(1.0, deadline - time.monotonic()))
        for endpoint in models.endpoints.values():
            if endpoint.shadow is not None:
                endpoint.shadow.join()
        return idle

    def shutdown(self, grace: float | None = None) -> None:
        """Same as :meth:`drain` (kept for code written against ipcserve 0.1)."""
        self.drain(grace)

    def reload(self, name: str, grace: float | None = None) -> dict[str, Any]:
        """Replace model ``name`` by a fresh copy of itself without failing a request
        (:func:`ipcserve.http.reload.reload` says how).

        Returns:
            ``{"model", "revision", "previous_revision", "load_seconds", "drained"}``.

        Raises:
            NotFoundError: no such model.
            ConflictError: a reload of it is already running; it is still loading its first
                version; or this web process did not start it (a gunicorn worker).
            ReloadError: the new version failed to load (the old one keeps serving).
            WorkerUnavailableError: the server is draining.
        """
        return reload.reload(self.models, name, grace)

    def reload_all(self, grace: float | None = None) -> dict[str, Any]:
        """:meth:`reload` every model, one after the other (SIGHUP). A model whose reload
        fails keeps its old version; the others are reloaded all the same.

        Returns:
            ``{name: reload()'s answer, or the error body}``.
        """
        return reload.reload_all(self.models, grace)

    def _make_cache(self, app: Flask, endpoint: Endpoint) -> None:
        assert endpoint.cache_settings is not None
        api_key = check_api_key(app.config.get("IPCSERVE_API_KEY"))
        endpoint.cache = ResponseCache(app, endpoint.name, endpoint.cache_settings,
                                       key_salt(api_key), metrics=served(app).metrics,
                                       timeout=app.config["IPCSERVE_CACHE_TIMEOUT"])

    # -- Flask wiring ----------------------------------------------------------------
    def init_app(self, app: Flask) -> None:
        """Register routes and state on ``app``.

        Raises:
            RuntimeError: ipcserve is already registered on this app.
            ConfigError: an ``IPCSERVE_*`` setting in ``app.config`` is invalid.
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
        for endpoint in self.models.endpoints.values():
            for version in endpoint.versions:
                if self._engine_settings and not version.ml.started:
                    version.ml.configure(keep_keywords=True, **self._engine_settings)
        self.models.pool.configure(app.config["IPCSERVE_MAX_LOADED_MODELS"],
                                   app.config["IPCSERVE_MAX_LOADED_MEMORY"])
        state = Served(self.models, app.config, self)
        state.url_prefix = self.url_prefix
        if app.config["IPCSERVE_TRACING"]:
            state.tracing = Tracing(app)
        app.extensions["ipcserve"] = state
        self._app = app
        for endpoint in self.models.endpoints.values():
            if endpoint.cache_settings is not None:
                self._make_cache(app, endpoint)
        bp = Blueprint("ipcserve", __name__)
        tracing = state.tracing
        if tracing is not None:  # first: the span covers the key check too
            bp.before_request(tracing.begin)
            bp.after_request(tracing.status)
            bp.teardown_request(tracing.end)
        bp.before_request(routes.require_key)
        if state.access_log is not None:  # nothing on the request path without one
            app.after_request(log_request)  # every request of the app, unknown URLs too
            if state.audit_share:
                bp.before_request(sample_bodies)
        origins = app.config["IPCSERVE_CORS_ORIGINS"]
        if origins:
            _allow_origins(bp, list(origins))
        bp.register_error_handler(Exception, routes.handle_error)
        for route in ROUTES:
            routes.add(bp, state, route)
        app.register_blueprint(bp, url_prefix=self.url_prefix or None)
        for rule in app.url_map.iter_rules():
            if rule.endpoint.startswith("ipcserve."):
                # Werkzeug answers '/v1//models' (merge_slashes) and '/ml' for '/ml/'
                # (strict_slashes) with a 308 HTML redirect to a URL built from the Host
                # header; ipcserve answers JSON: the first 404s, the second just matches.
                rule.merge_slashes = False
                rule.strict_slashes = False


def _allow_origins(bp: Blueprint, origins: list[str]) -> None:
    """CORS for web pages of ``origins`` (``*``: any), through flask-cors: preflights are
    answered by Flask's automatic OPTIONS (no key needed, no model touched), and every
    answer, errors included, carries the headers a browser needs to read it.

    Raises:
        ConfigError: flask-cors is not installed.
    """
    try:
        from flask_cors import CORS  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError("IPCSERVE_CORS_ORIGINS needs flask-cors: pip install "
                          "'ipcserve[cors]'") from None
    CORS(bp, origins="*" if origins == ["*"] else origins,
         allow_headers=["Authorization", "Content-Type", "X-IPCServe-Version", "traceparent"],
         expose_headers=["Retry-After", "X-IPCServe-Version"], max_age=600)

