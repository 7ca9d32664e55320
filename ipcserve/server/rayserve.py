"""ipcserve as a Ray Serve application: replicas placed, restarted and scaled by Ray.

From a shell (Ray Serve's app-builder convention; every further ``key=value`` is an
ipcserve setting, named as in docs/configuration.md)::

    serve run ipcserve.ray:app model=mypackage.models:Classifier num_replicas=2 max_batch_size=8

In Python::

    from ray import serve
    import ipcserve.ray

    serve.run(ipcserve.ray.deployment(num_replicas=2).bind(model="mypackage.models:Classifier"))

Each replica (a Ray actor) builds the same Flask app as ``ipcserve serve`` (one code path:
:func:`ipcserve.server.cli.build_app`) and starts its ML processes, which are children of the
replica actor. Ray Serve's HTTP proxy speaks ASGI; the WSGI app is bridged with
``a2wsgi.WSGIMiddleware``, so every route, status, header and streamed body of ipcserve
goes through the proxy unchanged.

::

    client ──► Serve HTTP proxy ──► replica actor (IPCServeReplica)
               (ASGI; routes to     a2wsgi threads ──► Flask app ──► MLProcess
                a replica with                                          │ pipes
                room)                                                   ▼
                                                  ML process (a child of the actor,
                                                  restarted by ipcserve after a crash)

Health: ipcserve restarts a crashed ML process itself (fast, with backoff); Ray's
``check_health`` reads the same readiness as ``/readyz`` and fails once the circuit breaker
is open (the ML process is down past its restart budget), when Ray replaces the whole
replica, or while the replica drains. Shutdown: Serve stops
routing to the replica, waits for its requests, then calls ``__del__``
(:meth:`IPCServeReplica.shutdown`), which drains ipcserve and stops the ML processes. A
replica actor that is killed outright takes its ML processes with it (they watch their
parent and exit).

Ray is imported when a deployment is made, not when this module is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import functools
import json
import logging
from collections.abc import Mapping
from typing import Any

from ..engine.config import SETTINGS, Config, Setting, settings_of
from ..engine.errors import ConfigError

__all__ = ["IPCServeReplica", "ReplicaLostAsJSON", "app", "deployment", "parse_args",
           "proxy_middlewares"]

logger = logging.getLogger(__name__)

# Settings of ``ipcserve serve`` that configure waitress or the process, not the app: under
# Ray Serve the proxy serves HTTP and Serve stops replicas.
_SERVER_ONLY = frozenset({"host", "port", "threads", "connection_limit", "header_timeout",
                          "body_timeout", "idle_timeout", "detect_disconnects", "drain_delay",
                          "log_level"})
_IPCSERVE: dict[str, Setting] = {s.name: s for s in SETTINGS if s.name not in _SERVER_ONLY}
_ENGINE = frozenset(s.name for s in settings_of("engine"))


def _at_least(bound: float, kind: Any) -> Any:
    def convert(text: str) -> Any:
        value = kind(text)
        if value < bound:
            raise ValueError(text)
        return value

    convert.__name__ = f"{'an integer' if kind is int else 'a number'} >= {bound:g}"
    return convert


def _replicas(text: str) -> int | str:
    return "auto" if text == "auto" else _at_least(1, int)(text)


_replicas.__name__ = "an integer >= 1 or 'auto'"

# Builder keys that are Ray Serve deployment options, with their converters. num_cpus and
# num_gpus go to ray_actor_options; min_replicas, max_replicas and target_ongoing_requests
# to autoscaling_config.
_SERVE: dict[str, Any] = {
    "name": str,
    "num_replicas": _replicas,
    "max_ongoing_requests": _at_least(1, int),
    "max_queued_requests": _at_least(-1, int),
    "num_cpus": _at_least(0, float),
    "num_gpus": _at_least(0, float),
    "min_replicas": _at_least(0, int),
    "max_replicas": _at_least(1, int),
    "target_ongoing_requests": _at_least(0.001, float),
    "health_check_period_s": _at_least(0.001, float),
    "health_check_timeout_s": _at_least(0.001, float),
    "graceful_shutdown_timeout_s": _at_least(0, float),
}
_ACTOR_KEYS = ("num_cpus", "num_gpus")
_AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "target_ongoing_requests")


def ipcserve_settings(given: Mapping[str, Any]) -> dict[str, Any]:
    """ipcserve's settings from ``given`` (text is converted, other values kept).

    Raises:
        ConfigError: naming the key that is unknown, a server-only setting, or invalid.
    """
    settings: dict[str, Any] = {}
    for key, raw in given.items():
        if key in _SERVER_ONLY:
            raise ConfigError(f"{key} is a setting of the waitress server (ipcserve serve); "
                              "under Ray Serve, Serve's HTTP proxy serves HTTP: leave it out")
        setting = _IPCSERVE.get(key)
        if setting is None:
            known = sorted([*_SERVE, *_IPCSERVE])
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown setting {key!r}; {hint}known: {', '.join(known)}")
        try:
            value = setting.parse(raw)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(setting.env, key)) from None
        settings[key] = [value] if key == "model" and isinstance(value, str) else value
    return settings


def parse_args(args: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split builder arguments into Serve deployment options and ipcserve settings.

    ``model`` defaults to ``digits``; ``max_ongoing_requests`` defaults to the model's
    ``max_inflight``, so that Serve queues (and routes elsewhere) what one replica would shed.

    Returns:
        ``(options, settings)``: keywords of ``serve.deployment`` and of
        :class:`IPCServeReplica`.

    Raises:
        ConfigError: a key is unknown or a value invalid; the message names the key.
    """
    options: dict[str, Any] = {}
    given: dict[str, Any] = {}
    for key, raw in args.items():
        if not isinstance(key, str):
            raise ConfigError(f"argument names are text, got {key!r}")
        if key in _SERVE:
            convert = _SERVE[key]
            try:
                # Text from a shell, numbers too from a Serve config file's args.
                options[key] = convert(str(raw))
            except ValueError:
                what = getattr(convert, "__name__", "a value")
                raise ConfigError(f"{key} must be {'text' if what == 'str' else what}, "
                                  f"got {raw!r}") from None
        else:
            given[key] = raw
    settings = ipcserve_settings(given)
    # Bounds and cross-field rules (hang_timeout above heartbeat_interval...) fail here, in
    # `serve run`, not later in every replica.
    Config(**{k: v for k, v in settings.items() if k in _ENGINE})
    actor = {k: options.pop(k) for k in _ACTOR_KEYS if k in options}
    if actor:
        options["ray_actor_options"] = actor
    autoscaling = {k: options.pop(k) for k in _AUTOSCALING_KEYS if k in options}
    if autoscaling:
        if options.get("num_replicas", "auto") != "auto":
            raise ConfigError(f"{', '.join(autoscaling)} configure autoscaling; leave out "
                              "num_replicas (or set num_replicas=auto) to use it")
        options.pop("num_replicas", None)
        options["autoscaling_config"] = autoscaling
    if "max_ongoing_requests" not in options:
        inflight = settings.get("max_inflight", _IPCSERVE["max_inflight"].default)
        options["max_ongoing_requests"] = inflight
    return options, settings


class IPCServeReplica:
    """One Ray Serve replica: ipcserve's Flask app and its ML processes.

    Args:
        settings: ipcserve settings by name (``model="pkg.mod:Class"``,
            ``max_batch_size=8``, ``config="models.toml"``, ``api_key=...``); text values are
            converted; unset ones come from ``IPCSERVE_*`` in the replica's environment, then
            the defaults, as for ``ipcserve serve``.

    Raises:
        ConfigError: a setting is invalid.
        ModelError / WorkerUnavailableError: a model failed to load (Serve retries the
            replica a limited number of times, then reports the deployment failed).
    """

    def __init__(self, **settings: Any) -> None:
        from ..http.extension import IPCServe
        from .cli import build_app
        from .waitress_conf import handler_threads

        self._app, values = build_app(argparse.Namespace(**ipcserve_settings(settings)))
        self._ext = IPCServe.of(self._app)
        self._grace: float = values["shutdown_grace"]
        # a2wsgi's threads, sized as ipcserve serve sizes waitress's.
        self._threads = handler_threads(self._app)
        try:
            self._ext.start(wait=True)
        except BaseException:
            self._ext.drain(grace=0)  # the models that did start: no ML process outlives this
            raise
        logger.info("ipcserve replica serving %s", ", ".join(self._ext.endpoints))

    @property
    def flask_app(self) -> Any:
        """The Flask app this replica serves."""
        return self._app

    def __serve_build_asgi_app__(self) -> Any:
        """The ASGI app Serve's proxy calls: the Flask app through ``a2wsgi``."""
        from a2wsgi import WSGIMiddleware

        return WSGIMiddleware(self._app, workers=self._threads)

    def check_health(self) -> None:
        """Serve's periodic health check of this replica: the serving core's readiness
        (:meth:`ipcserve.http.serving.Models.readiness`), as ``/readyz`` reads it, asked
        whether the replica is worth keeping.

        Raises:
            RuntimeError: the replica drains (as ``/readyz`` says 503 then), a model's
                circuit breaker is open (its ML process crashed past the restart budget), or
                its supervisor thread is failing, so that Ray replaces this replica. A single crash is ipcserve's to handle:
                it restarts the ML process itself, and the replica stays healthy.
        """
        readiness = self._ext.models.readiness()
        if readiness.draining:
            raise RuntimeError("this replica is draining; it takes no new requests")
        for name in readiness.broken:
            status = self._ext.endpoints[name].ml.status
            if status.get("supervisor_failing"):
                raise RuntimeError(f"model {name!r}: the supervisor that restarts and watches "
                                   "its ML processes is failing; replace this replica")
            raise RuntimeError(
                f"model {name!r}: the ML process crashed {status.get('consecutive_crashes')} "
                "times in a row and its circuit breaker is open; replace this replica")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics for Serve: ``ipcserve_inflight``, the requests
        admitted by ipcserve and not yet answered in this replica."""
        return {"ipcserve_inflight": float(self._ext.inflight)}

    async def shutdown(self) -> None:
        """Drain ipcserve and stop the ML processes (Serve calls it as the replica's
        ``__del__``, after it stopped routing here and waited for the requests in flight).
        Safe to call twice."""
        ext = getattr(self, "_ext", None)
        if ext is None:  # the constructor failed
            return
        if not await asyncio.to_thread(ext.drain, self._grace):
            logger.warning("ipcserve replica: requests still in flight after %gs; stopped anyway",
                           self._grace)


@functools.cache
def _ingress() -> Any:
    """``IPCServeReplica`` as a Serve ASGI ingress class (made once, when Ray is imported)."""
    from ray import serve

    class _ServeReplica(IPCServeReplica):
        # Serve's shutdown hook. Only on the class Serve runs: an async __del__ on a plain
        # object would be a coroutine that garbage collection never awaits.
        async def __del__(self) -> None:
            await self.shutdown()

    _ServeReplica.__name__ = _ServeReplica.__qualname__ = "IPCServeReplica"
    return serve.ingress()(_ServeReplica)


def deployment(**options: Any) -> Any:
    """A bindable Ray Serve deployment of :class:`IPCServeReplica`.

    Args:
        options: ``serve.deployment`` options (``num_replicas``, ``max_ongoing_requests``,
            ``ray_actor_options``, ``autoscaling_config``, ...). ``name`` defaults to
            ``ipcserve``.

    Returns:
        a ``ray.serve.Deployment``; ``.bind(**settings)`` with ipcserve settings
        (``model="pkg.mod:Class"``, ...) makes the application for ``serve.run``.
    """
    from ray import serve

    options.setdefault("name", "ipcserve")
    return serve.deployment(_ingress(), **options)


def app(args: Mapping[str, str]) -> Any:
    """Ray Serve's application builder: ``serve run ipcserve.ray:app model=pkg.mod:Class
    num_replicas=2 max_batch_size=8`` or ``import_path: ipcserve.ray:app`` with ``args`` in
    a Serve config file.

    Serve options: name, num_replicas (or ``auto``), max_ongoing_requests,
    max_queued_requests, num_cpus, num_gpus, min_replicas, max_replicas,
    target_ongoing_requests, health_check_period_s, health_check_timeout_s,
    graceful_shutdown_timeout_s. Every other key is an ipcserve setting.

    Raises:
        ConfigError: a key is unknown or a value invalid (the message names the key).
    """
    options, settings = parse_args(args)
    return deployment(**options).bind(**settings)


class ReplicaLostAsJSON:
    """ASGI middleware for Serve's HTTP proxy: a request whose replica died before answering
    gets ipcserve's 502 ``WorkerCrashedError`` as JSON, like a request whose ML process died.

    Serve does not resend a request that a replica had started (it may be what killed it),
    and its proxy then returns without any response, which the HTTP server turns into a
    plain-text ``500 Internal Server Error``; or, when the replica died between its answer's
    headers and its body, with the headers sent and no body. This middleware answers those
    cases, and only them: it holds a response's start until its first body message, and
    every response that gets one (the proxy's 503s and 408s, the replicas' answers) passes
    through untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        start: Any = None
        answered = False

        async def watch(message: Any) -> None:
            # The start waits for the first body message: a replica that dies between the
            # two would otherwise leave the client with headers and a body that never comes
            # (a broken response instead of an answer). A replica dying later, in the middle
            # of a streamed body, can only end the connection.
            nonlocal start, answered
            if message.get("type") == "http.response.start" and not answered:
                start = message
                return
            if start is not None and not answered:
                answered = True
                await send(start)
            await send(message)

        await self.app(scope, receive, watch)
        if answered:
            return
        from ..engine.errors import WorkerCrashedError

        error = WorkerCrashedError("the Ray Serve replica handling this request stopped before "
                                   "answering (not resent: it may be what stopped it)")
        body = json.dumps(error.to_dict(), separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": error.http_status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Any]:
    """The middlewares for Serve's HTTP proxy (:class:`ReplicaLostAsJSON`). Serve calls this
    where ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=ipcserve.ray:proxy_middlewares`` is set
    in the environment of the cluster's nodes (``ray start``); it applies to every
    application behind that proxy."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostAsJSON)]
