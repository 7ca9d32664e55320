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
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from ..http.extension import IPCServe
from . import waitress_conf

__all__ = ["ServerLifecycle", "serve"]

logger = logging.getLogger(__name__)

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
    """

    def __init__(self, extension: IPCServe, server: Any, grace: float | None,
                 drain_delay: float) -> None:
        self.extension = extension
        self.server = server
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
        finally:
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


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          grace: float | None = None, detect_disconnects: bool = True,
          limits: Any = None, drain_delay: float = 0.0) -> int:
    """Serve ``app`` (a Flask app with :class:`~ipcserve.flask.IPCServe`) on waitress until
    a stop signal, loading its models meanwhile.

    The port is listened on at once: ``/healthz`` answers, ``/readyz`` says 503 and a
    prediction says "loading" until every model has loaded. A model that fails to load
    stops the server with exit code 1. Signals: see the module docstring. The server is
    :func:`ipcserve.server.waitress_conf.create_server` (``threads=None``: the models'
    admission limit plus spares; ``limits``: a ``ServerLimits``, None reads the environment).

    Returns:
        the exit code: 0 after a drain, 1 after a failed load or bind, 128 + signal after a
        forced stop.
    """
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
    lifecycle = ServerLifecycle(extension, server, grace, drain_delay)
    logger.info("serving %s on http://%s:%s (pid %d)", ", ".join(extension.endpoints), host,
                server.effective_port, os.getpid())
    logger.info("status page: open %s", _page_url(host, server.effective_port,
                                                  extension.url_prefix))
    return lifecycle.run()
