"""``ipcserve serve`` / ``python -m ipcserve serve`` / ``python app.py``: a complete server.

The flags come from the settings table (:data:`ipcserve.config.SETTINGS`): every setting
is a flag (``--max-batch-wait``) and an environment variable (``IPCSERVE_MAX_BATCH_WAIT``);
a flag on the command line wins over the variable, which wins over the default.

Stopping: SIGTERM, SIGINT (Ctrl-C) and SIGHUP (a closed terminal) drain through
:meth:`IPCServe.drain <ipcserve.flask_ext.IPCServe.drain>`: new requests get 503, the ones
in flight are answered, the ML processes stop, the server exits 0. A second signal stops at
once (within a second), answering what is still in flight with 503, and exits 128 + the
signal number (130 for a second Ctrl-C).
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

from .config import SETTINGS, Config, Setting, settings_of
from .errors import ConfigError

__all__ = ["build_model", "create_app", "main", "serve"]

logger = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
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
    from .mlprocess import MLProcess

    if task is not None and not os.path.isdir(spec):
        raise ConfigError(f"--task is for a transformers model directory; --model {spec!r} "
                          "is not one")
    if spec == "digits":
        from .adapters.digits import DigitsClassifier

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
        from .adapters.hf import TransformersModel

        return TransformersModel(path, task=task, config=config)
    if os.path.isfile(path) and suffix == ".onnx":
        from .adapters.onnxrt import OnnxModel

        return OnnxModel(path, config=config)
    if os.path.isfile(path) and suffix in _MODEL_FILES:
        from .adapters.pytorch import TorchModel

        return TorchModel(path, config=config)
    if os.path.isdir(path):
        raise ConfigError(f"--model {path} is a directory without a config.json; serve one "
                          "written by save_pretrained")
    what = "is not a model file" if os.path.exists(path) else "does not exist"
    raise ConfigError(f"--model must be 'digits', 'package.module:attribute', a transformers "
                      f"model directory or a {'/'.join(_MODEL_FILES)} file; {path!r} {what}")


def create_app(models: Sequence[tuple[Any, str]], **http_settings: Any) -> Any:
    """A Flask app serving ``models`` (pairs of MLProcess and kind), with JSON errors
    everywhere. ``http_settings`` are the ``http`` settings by name (``api_key=...``,
    ``max_content_length=...``), put into ``app.config`` as ``IPCSERVE_*``."""
    from flask import Flask
    from werkzeug.exceptions import HTTPException

    from .flask_ext import IPCServe, error_response

    app = Flask("ipcserve")
    known = {s.name: s for s in settings_of("http")}
    for name, value in http_settings.items():
        if name not in known:
            raise ConfigError(f"unknown HTTP setting {name!r}; known: {', '.join(known)}")
        app.config[known[name].env] = value
    ipc = IPCServe(app)
    for ml, kind in models:
        preprocess = None
        if getattr(ml, "name", None) == "digits" and kind == "image":
            from .adapters.digits import image_to_pixels

            preprocess = image_to_pixels
        ipc.add_model(ml, kind=kind, preprocess=preprocess)
    app.register_error_handler(HTTPException, error_response)
    return app


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
    from .flask_ext import IPCServe

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

    previous = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
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


def resolve(args: argparse.Namespace, environ: Any = None) -> dict[str, Any]:
    """Every setting's value: the flag if given, else the env var, else the default."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        flagged = getattr(args, setting.name, None)
        if flagged is not None:
            values[setting.name] = flagged
        elif setting.env in environ:
            values[setting.name] = setting.parse(environ[setting.env])
        else:
            values[setting.name] = setting.default
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        values = resolve(args)
        logging.getLogger().setLevel(values["log_level"])
        if values["require_api_key"] and not values["api_key"]:
            raise ConfigError("an API key is required (--require-api-key): set IPCSERVE_API_KEY "
                              "or --api-key")
        config = Config(**{s.name: values[s.name] for s in settings_of("engine")})
        ml = build_model(values["model"], config, values["task"])
        kind = values["kind"] or ("image" if values["model"] == "digits" else "json")
        app = create_app([(ml, kind)], **{s.name: values[s.name] for s in settings_of("http")})
        from .waitress_conf import ServerLimits

        limits = ServerLimits(**{name: values[name] for name in (
            "connection_limit", "header_timeout", "body_timeout", "idle_timeout")})
    except ConfigError as exc:
        logger.error("invalid setting: %s", exc)
        return 2
    return serve(app, host=values["host"], port=values["port"], threads=values["threads"],
                 grace=values["shutdown_grace"], detect_disconnects=values["detect_disconnects"],
                 limits=limits, drain_delay=values["drain_delay"])
