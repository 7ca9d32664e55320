"""``ipcserve serve`` / ``python -m ipcserve serve``: a complete server on waitress.

Every flag has an environment variable: ``--port`` = ``IPCSERVE_PORT``, ``--api-key`` =
``IPCSERVE_API_KEY``, and every engine setting of :class:`~ipcserve.config.Config` is read
from ``IPCSERVE_<FIELD>`` (``IPCSERVE_TIMEOUT``, ``IPCSERVE_MAX_BATCH_SIZE``, ...).
"""

from __future__ import annotations

import _thread
import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .config import Config
from .errors import IPCServeError

__all__ = ["build_model", "create_app", "main", "serve"]

logger = logging.getLogger("ipcserve")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_model(spec: str, config: Config) -> Any:
    """``digits`` (the built-in model) or ``package.module:attr`` where attr is an MLProcess
    subclass, an MLProcess instance, or a factory callable returning a model."""
    from .mlprocess import MLProcess

    if spec == "digits":
        from .adapters.digits import DigitsClassifier

        return DigitsClassifier(config=config)
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise SystemExit(f"--model must be 'digits' or 'package.module:attribute', got {spec!r}")
    target = getattr(importlib.import_module(module_name), attr)
    if isinstance(target, MLProcess):
        return target
    if isinstance(target, type) and issubclass(target, MLProcess):
        return target(config=config)
    return MLProcess.from_factory(target, config=config)


def create_app(models: Sequence[tuple[Any, str]], api_key: str | None = None,
               max_content_length: int | None = None, max_image_pixels: int | None = None) -> Any:
    """A Flask app serving ``models`` (pairs of MLProcess and kind), with JSON errors everywhere."""
    from flask import Flask
    from werkzeug.exceptions import HTTPException

    from .flask_ext import IPCServe, error_response

    app = Flask("ipcserve")
    app.config["IPCSERVE_API_KEY"] = api_key
    if max_content_length is not None:
        app.config["MAX_CONTENT_LENGTH"] = max_content_length
    if max_image_pixels is not None:
        app.config["IPCSERVE_MAX_IMAGE_PIXELS"] = max_image_pixels
    ipc = IPCServe(app)
    for ml, kind in models:
        preprocess = None
        if getattr(ml, "name", None) == "digits" and kind == "image":
            from .adapters.builtin import image_to_pixels

            preprocess = image_to_pixels
        ipc.add_model(ml, kind=kind, preprocess=preprocess)
    app.register_error_handler(HTTPException, error_response)
    return app


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          grace: float = 10.0) -> int:
    """Start the models, serve ``app`` on waitress until SIGTERM/SIGINT, then drain.

    On the first signal: ``/readyz`` turns 503 and new requests get 503; requests in flight
    are answered (up to ``grace`` seconds); the ML processes get the Shutdown sentinel; the
    server exits 0. A second signal stops at once.
    """
    from . import waitress_conf

    state = app.extensions["ipcserve"]
    ipc = state.ext
    if host not in _LOOPBACK and not state.api_key:
        logger.warning("binding %s without an API key: anyone who can reach this host can use "
                       "the model. Set --api-key or IPCSERVE_API_KEY.", host)
    try:
        # threads=None: the models' admission limit plus spares (see waitress_conf).
        server = waitress_conf.create_server(app, host=host, port=port, threads=threads,
                                             # Flask's MAX_CONTENT_LENGTH answers 413 itself;
                                             # waitress's own cap is the backstop.
                                             max_request_body_size=2 * app.config["MAX_CONTENT_LENGTH"])
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", host, port, exc)
        return 1
    # Serve at once (healthz answers, readyz says 503 and predict "loading") while the
    # models load in the background; a model that fails to load stops the server.
    for endpoint in ipc.endpoints.values():
        if not endpoint.ml.started:
            endpoint.ml._loading = True  # from the first request on, not from the thread's start
    logger.warning("ipcserve: serving %s on http://%s:%s (pid %d)", ", ".join(ipc.endpoints),
                   host, server.effective_port, os.getpid())
    done = threading.Event()
    force = threading.Event()
    failed = threading.Event()

    def start_models() -> None:
        if state.draining.is_set():
            return
        try:
            ipc.start()
        except Exception as exc:
            if state.draining.is_set():
                logger.warning("ipcserve: stopped while loading: %s", exc)
                return
            logger.error("a model failed to start: %s", exc)
            failed.set()
            done.set()
            _thread.interrupt_main()
            return
        if state.draining.is_set():  # a signal came while start() was finishing
            ipc.shutdown(grace=0)
            return
        logger.warning("ipcserve: models ready: %s", ", ".join(ipc.endpoints))

    def drain() -> None:
        if not state.wait_idle(grace):
            logger.warning("requests still in flight after %.1fs; stopping anyway", grace)
        ipc.shutdown(grace=1.0)
        done.set()
        _thread.interrupt_main()  # ends waitress's loop in the main thread

    def on_signal(signum: int, frame: Any) -> None:
        if failed.is_set():
            raise KeyboardInterrupt
        if done.is_set() or state.draining.is_set():
            if not done.is_set():
                force.set()
                logger.warning("ipcserve: second signal, stopping now")
            raise KeyboardInterrupt
        logger.warning("ipcserve: %s received, draining (up to %.0fs)", signal.Signals(signum).name, grace)
        state.draining.set()
        threading.Thread(target=drain, name="ipcserve-drain", daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    starter = threading.Thread(target=start_models, name="ipcserve-start", daemon=True)
    starter.start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
        if state.draining.is_set() and not force.is_set():
            done.wait(grace + 5.0)  # let the drain thread finish its orderly shutdown
        ipc.shutdown(grace=0)
    if failed.is_set():
        return 1
    logger.warning("ipcserve: stopped")
    return 0


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="ipcserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model over HTTP on waitress")
    s.add_argument("--host", default=env("IPCSERVE_HOST", "127.0.0.1"),
                   help="address to bind (default 127.0.0.1; binding another address without "
                        "--api-key logs a warning)")
    s.add_argument("--port", type=int, default=int(env("IPCSERVE_PORT", "8000")),
                   help="port (default 8000; 0 picks a free one)")
    s.add_argument("--threads", type=int, default=env("IPCSERVE_THREADS"),
                   help="waitress threads (default: the model's max_inflight + 4)")
    s.add_argument("--model", default=env("IPCSERVE_MODEL", "digits"),
                   help="'digits' or package.module:attribute (default digits)")
    s.add_argument("--kind", choices=("json", "image"), default=env("IPCSERVE_KIND"),
                   help="endpoint kind (default: image for digits, json otherwise)")
    s.add_argument("--max-content-length", type=int,
                   default=int(env("IPCSERVE_MAX_CONTENT_LENGTH", str(16 * 1024 * 1024))),
                   help="largest request body in bytes (default 16 MiB)")
    s.add_argument("--max-image-pixels", type=int,
                   default=int(env("IPCSERVE_MAX_IMAGE_PIXELS", "20000000")),
                   help="largest image in pixels, checked before decoding (default 20,000,000)")
    s.add_argument("--api-key", default=env("IPCSERVE_API_KEY"), help="require Authorization: Bearer KEY")
    s.add_argument("--timeout", type=float, help="per-request deadline in seconds (IPCSERVE_TIMEOUT)")
    s.add_argument("--workers", type=int, help="ML processes for the model (IPCSERVE_WORKERS)")
    s.add_argument("--max-batch-size", type=int, help="items per model call (IPCSERVE_MAX_BATCH_SIZE)")
    s.add_argument("--hang-timeout", type=float, help="watchdog limit in seconds (IPCSERVE_HANG_TIMEOUT)")
    s.add_argument("--grace", type=float, default=float(env("IPCSERVE_SHUTDOWN_GRACE", "10")),
                   help="seconds to drain on SIGTERM/Ctrl-C (default 10)")
    s.add_argument("--log-level", default=env("IPCSERVE_LOG_LEVEL", "INFO"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in (("timeout", args.timeout), ("workers", args.workers),
                                   ("max_batch_size", args.max_batch_size),
                                   ("hang_timeout", args.hang_timeout)) if v is not None}
    try:
        config = Config.from_env(**overrides)
    except IPCServeError as exc:
        logger.error("invalid setting: %s", exc)
        return 2
    if args.kind not in (None, "json", "image"):
        logger.error("IPCSERVE_KIND must be json or image, got %r", args.kind)
        return 2
    ml = build_model(args.model, config)
    kind = args.kind or ("image" if args.model == "digits" else "json")
    app = create_app([(ml, kind)], api_key=args.api_key, max_content_length=args.max_content_length,
                     max_image_pixels=args.max_image_pixels)
    return serve(app, host=args.host, port=args.port, threads=args.threads, grace=args.grace)
