"""One run of the waitress server: bind, load, serve, react to signals, drain, exit.

:func:`serve` is what ``ipcserve serve`` and ``python app.py`` run, and what a script that
builds its own Flask app calls (``from ipcserve.server import serve``) to keep every
promise a plain ``waitress.serve`` would lose: the limits and timeouts, the arrival-time
deadline, disconnect detection, the drain.

Signals (handled by :class:`ServerLifecycle`):

* SIGTERM / SIGINT: drain (:meth:`IPCServe.drain <ipcserve.http.extension.IPCServe.drain>`):
  readiness says 503 for ``drain_delay`` seconds while requests are still served, then new
  requests get 503, the ones in flight are answered, the ML processes stop, exit 0. A
  second signal stops at once (within a second), answering what is still in flight with
  502 ``WorkerCrashedError`` (it reached the model and may have been computed in part; 503
  is only for requests no ML process took, which a balancer may resend), and exits 128 +
  the signal number (130 for a second Ctrl-C).
* SIGHUP: reload every model (:mod:`ipcserve.http.reload`): new ML processes load the
  model's code and weights afresh, traffic switches to them once they are ready, the old
  ones drain; a model whose new version fails to load keeps its old one.

With ``grpc_port``, the Open Inference Protocol V2 over gRPC (:mod:`ipcserve.http.v2_grpc`)
is served beside HTTP from the same process: the same models, admission, drain and API key.
It starts before the HTTP server says it is serving and stops after the drain, when every
call it admitted has been answered.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from ..engine.errors import ConfigError
from ..http.extension import IPCServe
from . import waitress_conf

__all__ = ["ServerLifecycle", "serve", "start_grpc"]

logger = logging.getLogger(__name__)
#: How the server's log lines read (``python app.py`` and :func:`serve`).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# After the drain: how long the server keeps sending responses that are still buffered
# for slow clients before it closes their connections.
_FLUSH_TIMEOUT = 5.0


class ServerLifecycle:
    """The state of one server run and what changes it: the models' load, stop and reload
    signals, the drain. The serving loop (:meth:`run`) watches :attr:`stop`.

    Args:
        extension: the app's IPCServe.
        server: the waitress server (bound, not yet serving).
        grace: seconds for requests in flight at a drain or reload (None: the models').
        drain_delay: seconds readiness says 503 before requests are refused.
        grpc_server: the V2 gRPC server (started), stopped after the drain, or None.
    """

    def __init__(self, extension: IPCServe, server: Any, grace: float | None,
                 drain_delay: float, grpc_server: Any = None) -> None:
        self.extension = extension
        self.server = server
        self.grpc_server = grpc_server
        self.grace = grace
        self.drain_delay = drain_delay
        self.stop = threading.Event()  # leave the serving loop
        self.draining = threading.Event()  # a stop signal came
        self.exit_code = 0
        self._reloading = threading.Lock()  # one SIGHUP reload at a time
        self._watcher: threading.Thread | None = None

    def _wake(self) -> None:
        """Make the serving loop look at :attr:`stop` now (it polls sockets)."""
        try:
            self.server.pull_trigger()
        except OSError:  # the trigger is closed already
            pass

    def _finish(self, code: int) -> None:
        self.exit_code = code or self.exit_code
        self.stop.set()
        self._wake()

    # -- the models' load ------------------------------------------------------------
    def _watch_start(self) -> None:
        try:
            self.extension.wait_started()
        except Exception as exc:
            if self.draining.is_set():
                logger.info("stopped while loading: %s", exc)
                return
            logger.error("a model failed to start: %s", exc)
            self._finish(1)
            return
        logger.info("models ready: %s", ", ".join(self.extension.endpoints))

    # -- signals ---------------------------------------------------------------------
    def _drain(self) -> None:
        if not self.extension.drain(self.grace, delay=self.drain_delay):
            logger.warning("requests still in flight after the grace period; stopped anyway")
        self._finish(0)

    def on_stop_signal(self, signum: int, frame: Any) -> None:
        """SIGTERM / SIGINT: drain; the second one stops at once."""
        name = signal.Signals(signum).name
        if self.draining.is_set():
            logger.warning("%s received again: stopping now", name)
            self._finish(128 + signum)
            self.extension.drain(grace=0)  # hurries the drain in progress: kills the ML processes now
            return
        if self.drain_delay > 0:
            logger.info("%s received: /readyz says 503 now; requests are served for %gs more, "
                        "then the ones in flight are finished (send it again to stop at once)",
                        name, self.drain_delay)
        else:
            logger.info("%s received: draining (send it again to stop at once)", name)
        self.draining.set()
        threading.Thread(target=self._drain, name="ipcserve-drain", daemon=True).start()

    def _reload_all(self) -> None:
        try:
            results = self.extension.reload_all(self.grace)
            logger.info("SIGHUP reload done: %s", ", ".join(
                f"{name} FAILED (old version serving)" if "error" in result
                else f"{name} revision {result['revision']}" for name, result in results.items()))
        finally:
            self._reloading.release()

    def on_hangup(self, signum: int, frame: Any) -> None:
        """SIGHUP: reload every model in the background (old versions serve meanwhile)."""
        if self.draining.is_set():
            logger.info("SIGHUP received while draining: not reloading")
            return
        if not self._reloading.acquire(blocking=False):
            logger.info("SIGHUP received: a reload is already running")
            return
        logger.info("SIGHUP received: reloading every model (old versions serve meanwhile)")
        threading.Thread(target=self._reload_all, name="ipcserve-reload", daemon=True).start()

    # -- the run ---------------------------------------------------------------------
    def run(self) -> int:
        """Load the models in the background, serve until stopped, then close everything.

        Returns:
            the exit code (see the module docstring).
        """
        self.extension.start(wait=False)  # requests get "loading" from now on
        previous = {sig: signal.signal(sig, self.on_stop_signal) for sig in _STOP_SIGNALS}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.on_hangup)
        self._watcher = threading.Thread(target=self._watch_start, name="ipcserve-start-watch",
                                         daemon=True)
        self._watcher.start()
        server = self.server
        try:
            # waitress's own loop, one poll at a time, until stopped (no KeyboardInterrupt
            # thrown into the main thread to end it).
            while not self.stop.is_set():
                server.asyncore.loop(timeout=server.adj.asyncore_loop_timeout, map=server._map,
                                     use_poll=server.adj.asyncore_use_poll, count=1)
            # Send what is answered or about to be (a forced stop answers 502 at once).
            self._flush(_FLUSH_TIMEOUT if self.exit_code == 0 else 0.5)
            self._stop_grpc(_FLUSH_TIMEOUT if self.exit_code == 0 else 0.5)
        finally:
            self._stop_grpc(0)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            server.close()
            server.task_dispatcher.shutdown(timeout=1.0)
            # No handler thread runs now: log the counts the rate-limited warnings still hold.
            waitress_conf.flush_logs(server)
            self.extension.drain(grace=0)  # no-op after a drain; stops models after a failed load
            self._watcher.join(5.0)
        if self.exit_code == 0:
            logger.info("stopped")
        return self.exit_code

    def _stop_grpc(self, grace: float) -> None:
        """Stop the gRPC server: after the drain every call it admitted is answered, so
        ``grace`` only lets answers already made reach their clients."""
        grpc_server, self.grpc_server = self.grpc_server, None
        if grpc_server is not None:
            grpc_server.stop(grace).wait(grace + 5.0)

    def _flush(self, timeout: float) -> None:
        """Keep serving I/O until every response already made has been sent (bounded)."""
        server = self.server
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            busy = [channel for channel in list(server._map.values())
                    if getattr(channel, "total_outbufs_len", 0) or getattr(channel, "requests", None)]
            if not busy:
                return
            server.asyncore.loop(timeout=0.05, map=server._map,
                                 use_poll=server.adj.asyncore_use_poll, count=1)


def _page_url(host: str, port: int, prefix: str) -> str:
    """Where a browser on this machine opens the status page (a wildcard bind is opened
    through the loopback address)."""
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}{prefix.rstrip('/')}/"


def start_grpc(app: Any, host: str, port: int, threads: int | None = None) -> tuple[Any, int]:
    """Start the V2 gRPC service of ``app``'s models on ``host:port``.

    Args:
        threads: handler threads (None: as many as waitress gets, the models' admission
            limit plus spares); at most this many calls run at once, and gRPC itself answers
            RESOURCE_EXHAUSTED past it rather than queueing calls whose deadline would run
            before they reach the admission.

    Returns:
        the started ``grpc.Server`` and the port it listens on (``port`` 0: a free one).

    Raises:
        ConfigError: grpcio is not installed (the ``grpc`` extra).
        OSError: the address cannot be listened on.
    """
    try:
        import grpc

        from ..http import v2_grpc
        from ..http.oip import inference_pb2_grpc
    except ImportError as exc:
        raise ConfigError(f"--grpc-port needs grpcio: pip install 'ipcserve[grpc]' ({exc})") \
            from None
    import concurrent.futures

    from ..http.serving import served

    threads = threads or waitress_conf.handler_threads(app)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ipcserve-grpc"),
        maximum_concurrent_rpcs=threads,
        options=[("grpc.so_reuseport", 0),  # a port in use is an error, as for HTTP
                 ("grpc.max_receive_message_length", int(app.config["MAX_CONTENT_LENGTH"])),
                 ("grpc.max_send_message_length", -1)])
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        v2_grpc.InferenceService(served(app)), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind ...")
        raise OSError(str(exc)) from None
    if not bound:
        raise OSError(f"cannot bind {address}")
    server.start()
    return server, int(bound)


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          grace: float | None = None, detect_disconnects: bool = True,
          limits: Any = None, drain_delay: float = 0.0, grpc_port: int | None = None) -> int:
    """Serve ``app`` (a Flask app with :class:`~ipcserve.flask.IPCServe`) on waitress until
    a stop signal, loading its models meanwhile.

    The port is listened on at once: ``/healthz`` answers, ``/readyz`` says 503 and a
    prediction says "loading" until every model has loaded. A model that fails to load
    stops the server with exit code 1. Signals: see the module docstring. The server is
    :func:`ipcserve.server.waitress_conf.create_server` (``threads=None``: the models'
    admission limit plus spares; ``limits``: a ``ServerLimits``, None reads the environment).

    ``grpc_port``: also serve V2 over gRPC there (:func:`start_grpc`), same host.

    Logging: when nothing has configured it (the root logger has no handler), ``serve``
    logs INFO and above to stderr as ``python app.py`` does; a configuration of your own is
    left as it is.

    Returns:
        the exit code: 0 after a drain, 1 after a failed load or bind, 2 without grpcio for
        ``grpc_port``, 128 + signal after a forced stop.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    extension = IPCServe.of(app)
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
    grpc_server = None
    if grpc_port is not None:
        try:
            grpc_server, bound = start_grpc(app, host, grpc_port, threads)
        except (ConfigError, OSError) as exc:
            logger.error("cannot serve V2 gRPC on %s:%s: %s", host, grpc_port, exc)
            server.close()
            return 2 if isinstance(exc, ConfigError) else 1
        logger.info("V2 gRPC on %s:%d", host, bound)
    lifecycle = ServerLifecycle(extension, server, grace, drain_delay, grpc_server)
    logger.info("serving %s on http://%s:%s (pid %d)", ", ".join(extension.endpoints), host,
                server.effective_port, os.getpid())
    logger.info("status page: open %s", _page_url(host, server.effective_port,
                                                  extension.url_prefix))
    return lifecycle.run()
