"""``ipcserve serve`` / ``python -m ipcserve serve`` / ``python app.py``: a complete server.

The flags come from the settings table (:data:`ipcserve.config.SETTINGS`): every setting
is a flag (``--max-batch-wait``) and an environment variable (``IPCSERVE_MAX_BATCH_WAIT``);
a flag on the command line wins over the variable, which wins over the default.

Models: ``--model`` (repeat it for several), or ``--config models.toml`` for several models
with their own settings (:mod:`ipcserve.config_file`).

Stopping: SIGTERM and SIGINT (Ctrl-C) drain through
:meth:`IPCServe.drain <ipcserve.flask_ext.IPCServe.drain>`: new requests get 503, the ones
in flight are answered, the ML processes stop, the server exits 0. A second signal stops at
once (within a second), answering what is still in flight with 503, and exits 128 + the
signal number (130 for a second Ctrl-C).

Reloading: SIGHUP reloads every model (:meth:`IPCServe.reload_all
<ipcserve.flask_ext.IPCServe.reload_all>`): new ML processes load the model's code and
weights afresh, traffic switches to them once they are ready, the old ones drain; a model
whose new version fails to load keeps its old one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..engine.config import SETTINGS, Config, Setting, settings_of

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
from ..engine.errors import ConfigError

__all__ = ["build_app", "build_model", "create_app", "main", "serve"]

logger = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# After the drain: how long the server keeps sending responses that are still buffered
# for slow clients before it closes their connections.
_FLUSH_TIMEOUT = 5.0


def build_model(spec: str, config: Config, task: str | None = None) -> Any:
    """The model ``--model`` names: ``digits`` (the built-in model);
    ``package.module:attr`` where attr is an MLProcess subclass, an MLProcess instance, or a
    factory callable returning a model; or a path: a transformers model directory (with a
    config.json; ``task`` or inferred from it), an ``.onnx`` file, a ``.pt2`` (torch.export)
    or ``.pt``/``.ts`` (TorchScript) file. A path's model is named after its stem.

    Raises:
        ConfigError: the spec is none of these, or ``task`` is given for something other
            than a transformers model directory.
    """
    from ..engine.mlprocess import MLProcess

    if task is not None and not os.path.isdir(spec):
        raise ConfigError(f"--task is for a transformers model directory; --model {spec!r} "
                          "is not one")
    if spec == "digits":
        from ..adapters.digits import DigitsClassifier

        return DigitsClassifier(config=config)
    module_name, sep, attr = spec.partition(":")
    if os.path.exists(spec) or not sep:
        return _model_at(spec, config, task)
    target = getattr(importlib.import_module(module_name), attr)
    if isinstance(target, MLProcess):
        return target
    if isinstance(target, type) and issubclass(target, MLProcess):
        return target(config=config)
    return MLProcess.from_factory(target, config=config)


_MODEL_FILES = (".onnx", ".pt2", ".pt", ".ts")


def _model_at(path: str, config: Config, task: str | None) -> Any:
    """The adapter for a model directory or file (see :func:`build_model`)."""
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isfile(os.path.join(path, "config.json")):
        from ..adapters.hf import TransformersModel

        return TransformersModel(path, task=task, config=config)
    if os.path.isfile(path) and suffix == ".onnx":
        from ..adapters.onnxrt import OnnxModel

        return OnnxModel(path, config=config)
    if os.path.isfile(path) and suffix in _MODEL_FILES:
        from ..adapters.pytorch import TorchModel

        return TorchModel(path, config=config)
    if os.path.isdir(path):
        raise ConfigError(f"--model {path} is a directory without a config.json; serve one "
                          "written by save_pretrained")
    what = "is not a model file" if os.path.exists(path) else "does not exist"
    raise ConfigError(f"--model must be 'digits', 'package.module:attribute', a transformers "
                      f"model directory or a {'/'.join(_MODEL_FILES)} file; {path!r} {what}")


def create_app(models: Sequence[tuple[Any, ...]], *, cache_backend: Any = None,
               **http_settings: Any) -> Any:
    """A Flask app serving ``models``, with JSON errors everywhere.

    Args:
        models: ``(MLProcess, kind)`` pairs, or ``(MLProcess, kind, options)`` where options
            are keywords of :meth:`IPCServe.add_model <ipcserve.flask_ext.IPCServe.add_model>`
            (``cache``, ``default``).
        cache_backend: flask-caching ``CACHE_*`` settings for the models' response caches.
        http_settings: the ``http`` settings by name (``api_key=...``,
            ``max_content_length=...``), put into ``app.config`` as ``IPCSERVE_*``.
    """
    from flask import Flask
    from werkzeug.exceptions import HTTPException

    from ..http.extension import IPCServe, error_response

    app = Flask("ipcserve")
    app.config.update(cache_backend or {})
    known = {s.name: s for s in settings_of("http")}
    for name, value in http_settings.items():
        if name not in known:
            raise ConfigError(f"unknown HTTP setting {name!r}; known: {', '.join(known)}")
        app.config[known[name].env] = value
    ipc = IPCServe(app)
    for ml, kind, *more in models:
        options = more[0] if more else {}
        preprocess = None
        if _is_digits(ml) and kind == "image":
            from ..adapters.digits import image_to_pixels

            preprocess = image_to_pixels
        if ml.name in ipc.endpoints:
            raise ConfigError(f"two models are named {ml.name!r}; name them in a config file "
                              "([models.NAME] tables)")
        ipc.add_model(ml, kind=kind, preprocess=preprocess, **options)
    app.register_error_handler(HTTPException, error_response)
    return app


def _is_digits(ml: Any) -> bool:
    from ..adapters.digits import DigitsClassifier

    return isinstance(ml, DigitsClassifier)


class _Lifecycle:
    """What the main thread's serving loop watches: stop requested, forced, failed."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.stop = threading.Event()  # leave the serving loop
        self.draining = threading.Event()
        self.exit_code = 0

    def wake(self) -> None:
        """Make the serving loop look at the events now (it polls sockets)."""
        try:
            self.server.pull_trigger()
        except OSError:  # the trigger is closed already
            pass


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          grace: float | None = None, detect_disconnects: bool = True,
          limits: Any = None, drain_delay: float = 0.0) -> int:
    """Serve ``app`` on waitress until a stop signal, loading its models meanwhile.

    The port is listened on at once: ``/healthz`` answers, ``/readyz`` says 503 and a
    prediction says "loading" until every model has loaded. A model that fails to load
    stops the server with exit code 1. Signals: see the module docstring. The server is
    :func:`ipcserve.waitress_conf.create_server` (``threads=None``: the models' admission
    limit plus spares; ``limits``: a ``ServerLimits``, None reads the environment).

    Returns:
        the exit code: 0 after a drain, 1 after a failed load or bind, 128 + signal after a
        forced stop.
    """
    from . import waitress_conf
    from ..http.extension import IPCServe

    ext = IPCServe.of(app)
    if host not in _LOOPBACK and not app.config.get("IPCSERVE_API_KEY"):
        logger.warning("binding %s without an API key: anyone who can reach this host can use "
                       "the model. Set --api-key or IPCSERVE_API_KEY.", host)
    try:
        server = waitress_conf.create_server(
            app, host=host, port=port, threads=threads, limits=limits,
            # Flask's MAX_CONTENT_LENGTH answers 413 itself; waitress's cap is the backstop.
            max_request_body_size=2 * app.config["MAX_CONTENT_LENGTH"],
            # Keeps a busy connection readable, so a client that leaves is seen
            # (waitress.client_disconnected) and its work is cancelled.
            channel_request_lookahead=1 if detect_disconnects else 0)
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", host, port, exc)
        return 1
    life = _Lifecycle(server)
    ext.start(wait=False)  # requests get "loading" from now on
    logger.info("serving %s on http://%s:%s (pid %d)", ", ".join(ext.endpoints), host,
                server.effective_port, os.getpid())
    logger.info("status page: open %s", _page_url(host, server.effective_port, ext.url_prefix))

    def watch_start() -> None:
        try:
            ext.wait_started()
        except Exception as exc:
            if life.draining.is_set():
                logger.info("stopped while loading: %s", exc)
                return
            logger.error("a model failed to start: %s", exc)
            life.exit_code = 1
            life.stop.set()
            life.wake()
            return
        logger.info("models ready: %s", ", ".join(ext.endpoints))

    def drain() -> None:
        if not ext.drain(grace, delay=drain_delay):
            logger.warning("requests still in flight after the grace period; stopped anyway")
        life.stop.set()
        life.wake()

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if life.draining.is_set():
            logger.warning("%s received again: stopping now", name)
            life.exit_code = 128 + signum
            life.stop.set()
            ext.drain(grace=0)  # hurries the drain in progress: kills the ML processes now
            return
        if drain_delay > 0:
            logger.info("%s received: /readyz says 503 now; requests are served for %gs more, "
                        "then the ones in flight are finished (send it again to stop at once)",
                        name, drain_delay)
        else:
            logger.info("%s received: draining (send it again to stop at once)", name)
        life.draining.set()
        threading.Thread(target=drain, name="ipcserve-drain", daemon=True).start()

    reloading = threading.Lock()

    def reload_all() -> None:
        try:
            results = ext.reload_all(grace)
            failed = [name for name, result in results.items() if "error" in result]
            logger.info("SIGHUP reload done: %s", ", ".join(
                f"{name} {'FAILED (old version serving)' if name in failed else 'generation %d' % result['generation']}"
                for name, result in results.items()))
        finally:
            reloading.release()

    def on_hangup(signum: int, frame: Any) -> None:
        if life.draining.is_set():
            logger.info("SIGHUP received while draining: not reloading")
            return
        if not reloading.acquire(blocking=False):
            logger.info("SIGHUP received: a reload is already running")
            return
        logger.info("SIGHUP received: reloading every model (old versions serve meanwhile)")
        threading.Thread(target=reload_all, name="ipcserve-reload", daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    watcher = threading.Thread(target=watch_start, name="ipcserve-start-watch", daemon=True)
    watcher.start()
    try:
        _run_until(server, life.stop)
        # Send what is answered or about to be (a forced stop answers 503 at once).
        _flush(server, _FLUSH_TIMEOUT if life.exit_code == 0 else 0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
        server.task_dispatcher.shutdown(timeout=1.0)
        ext.drain(grace=0)  # no-op after a drain; stops models after a failed load
        watcher.join(5.0)
    if life.exit_code == 0:
        logger.info("stopped")
    return life.exit_code


def _page_url(host: str, port: int, prefix: str) -> str:
    """Where a browser on this machine opens the status page (a wildcard bind is opened
    through the loopback address)."""
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}{prefix.rstrip('/')}/"


def _run_until(server: Any, stop: threading.Event) -> None:
    """waitress's own loop, one poll at a time, until ``stop`` is set (no KeyboardInterrupt
    thrown into the main thread to end it)."""
    while not stop.is_set():
        server.asyncore.loop(timeout=server.adj.asyncore_loop_timeout, map=server._map,
                             use_poll=server.adj.asyncore_use_poll, count=1)


def _flush(server: Any, timeout: float) -> None:
    """Keep serving I/O until every response already made has been sent (bounded)."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        busy = [channel for channel in list(server._map.values())
                if getattr(channel, "total_outbufs_len", 0) or getattr(channel, "requests", None)]
        if not busy:
            return
        server.asyncore.loop(timeout=0.05, map=server._map,
                             use_poll=server.adj.asyncore_use_poll, count=1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipcserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model over HTTP on waitress",
                       description="Every flag also reads IPCSERVE_<NAME> from the environment.")
    for setting in SETTINGS:
        names = [setting.flag]
        if setting.name == "shutdown_grace":
            names.append("--grace")  # the 0.1 name
        default = f"{setting.default!r}" if setting.default not in (None, ()) else "none"
        s.add_argument(*names, dest=setting.name, metavar=setting.name.upper(),
                       choices=setting.choices, type=_typed(setting), default=None,
                       action="append" if setting.name == "model" else "store",
                       help=f"{setting.help} ({setting.env}, default {default})")
    return parser


def _typed(setting: Setting) -> Any:
    def convert(text: str) -> Any:
        try:
            return setting.parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace(setting.env, setting.flag)) from None

    convert.__name__ = setting.name
    return convert


def resolve(args: argparse.Namespace, environ: Any = None,
            file_values: Any = None) -> dict[str, Any]:
    """Every setting's value: the flag if given, else the env var, else the config file's
    ``[server]`` table (``file_values``), else the default. ``model`` is a list."""
    environ = os.environ if environ is None else environ
    file_values = file_values or {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        flagged = getattr(args, setting.name, None)
        if flagged is not None:
            values[setting.name] = flagged
        elif setting.env in environ:
            values[setting.name] = setting.parse(environ[setting.env])
        elif setting.name in file_values:
            values[setting.name] = file_values[setting.name]
        else:
            values[setting.name] = setting.default
    if not isinstance(values["model"], list):
        values["model"] = [values["model"]]
    return values


def _models_of(values: dict[str, Any], plan: Any, args: Any) -> list[tuple[Any, ...]]:
    """The (MLProcess, kind, options) to serve: the config file's models, or ``--model``'s."""
    engine = {s.name: values[s.name] for s in settings_of("engine")}
    if plan is None:
        kinds = []
        for spec in values["model"]:
            ml = build_model(spec, Config(**engine), values["task"])
            kinds.append((ml, values["kind"] or ("image" if spec == "digits" else "json")))
        return kinds
    if getattr(args, "model", None):
        raise ConfigError(f"--model and --config {plan.path} both name models; put every model "
                          "in the config file")
    models: list[tuple[Any, ...]] = []
    for entry in plan.models:
        where = f"{plan.path}: [models.{entry.name}]"
        try:
            ml = build_model(entry.model, Config(**{**engine, **entry.engine}), entry.task)
        except ConfigError as exc:
            raise ConfigError(f"{where} model: {exc}") from None
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{where} model: cannot import {entry.model!r}: {exc}") from None
        if entry.engine:  # also over the settings of an MLProcess instance the spec names
            ml.configure(**entry.engine)
        ml.name = entry.name
        kind = entry.kind or ("image" if entry.model == "digits" else "json")
        models.append((ml, kind, {"cache": entry.cache, "default": entry.default or None}))
    return models


def build_app(args: Any, environ: Any = None) -> tuple[Any, dict[str, Any]]:
    """The Flask app that ``ipcserve serve`` would serve, and every setting's value.

    The one code path from settings to app: ``ipcserve serve`` and :mod:`ipcserve.ray`'s
    replicas both build their app here. The models are built, not started.

    Args:
        args: the given settings as attributes named like the settings
            (an ``argparse.Namespace``); a missing or None one is read from ``environ``
            (default ``os.environ``), then the config file's ``[server]`` table, then its
            default. ``model`` is a list of specs.

    Raises:
        ConfigError: a setting, the config file or a model spec is invalid.
    """
    environ = os.environ if environ is None else environ
    config_path = getattr(args, "config", None)
    if config_path is None:
        config_path = environ.get(SETTINGS_BY_NAME["config"].env) or None
    plan = None
    if config_path:
        from . import config_file

        plan = config_file.load(config_path)
    values = resolve(args, environ, file_values=None if plan is None else plan.server)
    if values["require_api_key"] and not values["api_key"]:
        raise ConfigError("an API key is required (--require-api-key): set IPCSERVE_API_KEY "
                          "or --api-key")
    models = _models_of(values, plan, args)
    app = create_app(models, cache_backend=None if plan is None else plan.cache_backend,
                     **{s.name: values[s.name] for s in settings_of("http")})
    return app, values


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app, values = build_app(args)
        logging.getLogger().setLevel(values["log_level"])
        from .waitress_conf import ServerLimits

        limits = ServerLimits(**{name: values[name] for name in (
            "connection_limit", "header_timeout", "body_timeout", "idle_timeout")})
    except ConfigError as exc:
        logger.error("invalid setting: %s", exc)
        return 2
    return serve(app, host=values["host"], port=values["port"], threads=values["threads"],
                 grace=values["shutdown_grace"], detect_disconnects=values["detect_disconnects"],
                 limits=limits, drain_delay=values["drain_delay"])
