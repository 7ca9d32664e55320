"""Everything ipcserve does to and with waitress: limits, timeouts, request stamps, JSON errors.

``python app.py`` serves through :func:`create_server`. Compared with ``waitress.create_server``
defaults it changes what a crowd of idle, slow or excess clients can do to everyone else:

* **connections**: ``poll()`` instead of ``select()`` (which fails past fd 1024), and a
  connection limit derived from ``RLIMIT_NOFILE`` (raised to the hard limit's allowance at
  start) instead of 100, so idle keep-alive connections can't lock new clients out;
* **slow clients**: a request's headers must arrive within ``header_timeout`` of its first
  byte and its body within ``body_timeout`` of the headers, else the connection is closed.
  Waitress alone only closes connections *idle* for ``channel_timeout``, and every trickled
  byte counts as activity (slowloris);
* **threads = admission limit + spares**: as many handler threads as the models admit in
  flight (``max_inflight``) plus :data:`SPARE_THREADS`, so a request past the limit reaches
  the engine and gets 503 + Retry-After at once instead of queueing inside waitress;
* **end-to-end deadline**: every request carries ``environ["ipcserve.received"]``
  (:data:`RECEIVED_KEY`), the ``time.monotonic()`` at which waitress had read all of it;
  the predict route counts its deadline from there, and a request that waited in waitress's
  queue longer than its whole deadline is answered 503 without reaching the app
  (counted in ``ipcserve_shed_total{reason="queue_deadline"}`` and the status page's history);
* **one length per request**: a request with both ``Content-Length`` and
  ``Transfer-Encoding`` (request smuggling behind a proxy that reads the other one) gets 400
  and its connection is closed (RFC 9112 section 6.1); waitress alone answers it from the
  chunked body and keeps the connection;
* **JSON everywhere**: waitress's own protocol errors (400, 413, 431, 501, 500) are JSON like
  ipcserve's, not ``text/plain``.

Waitress internals this relies on (waitress 3.0; pinned by ``tests/test_connections.py``):
``HTTPChannel.parser_class`` / ``task_class`` / ``error_task_class`` are the classes the
channel instantiates (``channel.py``); the channel creates its parser when the first bytes of
a request arrive and keeps the unfinished one in ``channel.request``;
``HTTPRequestParser.received`` turns a ``ParsingError`` raised by ``parse_header`` into a 400
(``parser.py``), and an error answer closes the connection (``ErrorTask``); ``BaseWSGIServer``
calls ``maintenance(now)`` from ``readable()`` at most every ``cleanup_interval`` seconds and
the poll loop wakes at least every ``asyncore_loop_timeout`` (``server.py``); setting
``channel.will_close`` makes the loop close the channel (``HTTPChannel.writable``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask

from ..engine.config import read_settings
from ..engine.errors import ConfigError
from ..http.extension import IPCServe
from ..http.metrics import SHED_QUEUE_DEADLINE
from ..http.serving import RECEIVED_KEY, Served, served

__all__ = ["RECEIVED_KEY", "SPARE_THREADS", "ServerLimits", "create_server", "flush_logs",
           "handler_threads"]

logger = logging.getLogger(__name__)

#: Handler threads beyond the admission limit. They answer what the admitted ones can't:
#: 503s for excess requests, /healthz, /metrics. A few suffice because each is quick.
SPARE_THREADS = 4

# Most connections, whatever the fd budget. Waitress's poll loop asks every connection
# readable()/writable() in Python on each wake-up, so every request gets slower as more are
# open (measured on 2 cores: p50 3 ms beside 1,000 idle connections, 25 ms beside 5,000).
# Past this, a crowd of idle connections would make the server too slow to be worth
# reaching; below it, a crowd locks new clients out for idle_timeout.
MAX_CONNECTIONS = 10_000
# File descriptors a connection may use: its socket plus a body spooled to a temp file past
# inbuf_overflow (512 KiB). (adjustments.py says "up to three": a response spooled past
# outbuf_overflow, 1 MiB, is the third; JSON answers are far smaller.)
_FDS_PER_CONNECTION = 2
# Seconds between two lines of one rate-limited warning (closed slow connections, stale
# requests refused): under a flood they would come every second. Each line carries the count
# since the previous one; what is left is logged at shutdown (flush_logs).
LOG_EVERY = 10.0
# Descriptors kept for everything else: imported libraries, logs, shared memory, the
# waitress trigger pipe, the listening socket; plus one pipe end per handler thread (each
# thread has its own channel to the ML process).
_FD_RESERVE = 256


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Connection limits and timeouts of the HTTP server. Durations are seconds.

    Each field can come from ``IPCSERVE_<FIELD>`` (:meth:`from_env`); ``python app.py``
    reads them so.
    """

    # Open connections at most; past it waitress stops accepting until one closes. None:
    # as many as the file-descriptor limit allows (see connection_limit_for), at most
    # MAX_CONNECTIONS.
    connection_limit: int | None = None
    # From a request's first byte until its headers are complete. Generous for any real
    # client (headers are a few hundred bytes); short enough that slowloris can't pile up.
    header_timeout: float = 10.0
    # From the end of the headers until the whole body has arrived: 16 MiB (the default
    # body cap) needs ~2.2 Mbit/s. Raise it for slow uplinks and big uploads.
    body_timeout: float = 60.0
    # A keep-alive connection with no request in progress is closed after this long.
    # Above the 60 s of nginx's upstream keepalive_timeout and of AWS ALB's idle timeout,
    # so a fronting proxy, not ipcserve, closes a pooled connection first (no race on reuse).
    idle_timeout: float = 65.0

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "idle_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a number > 0, got {value!r}")
        limit = self.connection_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"connection_limit must be an integer >= 1, got {limit!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, prefix: str = "IPCSERVE_") -> ServerLimits:
        """Read ``IPCSERVE_CONNECTION_LIMIT``, ``IPCSERVE_HEADER_TIMEOUT``, ... (unset: default);
        the rows of :data:`ipcserve.config.SETTINGS` with the same names.

        Raises:
            ConfigError: a value does not convert or is out of bounds.
        """
        values = read_settings(os.environ if environ is None else environ, "server", prefix)
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def raise_nofile_limit(wanted: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` towards ``wanted`` (never past the hard
    limit, never lower); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
            return soft
        logger.info("raised the open-files limit (RLIMIT_NOFILE) from %d to %d", soft, target)
        return target
    return soft


def connection_limit_for(nofile: int, threads: int) -> int:
    """Connections that fit in ``nofile`` descriptors next to ``threads`` handler threads."""
    budget = nofile - _FD_RESERVE - 2 * threads
    return max(1, min(MAX_CONNECTIONS, budget // _FDS_PER_CONNECTION))


def _models(app: Any) -> list[Any]:
    try:
        ext = IPCServe.of(app)
    except RuntimeError:  # a WSGI app without ipcserve
        return []
    return [endpoint.ml for endpoint in ext.endpoints.values()]


def handler_threads(app: Any) -> int:
    """Threads to serve ``app`` with: one per request its models admit (the sum of their
    ``max_inflight``) plus :data:`SPARE_THREADS`, which answer the requests past the limit
    with a 503 at once; 8 for an app without ipcserve models."""
    admitted = sum(ml.config.max_inflight for ml in _models(app))
    return admitted + SPARE_THREADS if admitted else 8


def _closing(app: Any) -> Callable[[], bool] | None:
    """True once the app's drain began (IPCServe.unready), for Connection: close."""
    try:
        unready: Callable[[], bool] = IPCServe.of(app).unready.is_set
    except RuntimeError:  # a WSGI app without ipcserve
        return None
    return unready


def create_server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
                  max_request_body_size: int | None = None, limits: ServerLimits | None = None,
                  **adjustments: Any) -> Any:
    """A waitress server for ``app`` with ipcserve's limits; call ``.run()`` on it.

    Args:
        app: the WSGI app; an app with ipcserve registered sizes the defaults from its models.
        host: address to bind.
        port: port to bind; 0 picks a free one (``server.effective_port``).
        threads: handler threads. None: the models' admission limit (sum of ``max_inflight``)
            plus :data:`SPARE_THREADS`; 8 for an app without ipcserve models.
        max_request_body_size: waitress's own body cap in bytes (plain protocol error, JSON
            here); keep it above Flask's ``MAX_CONTENT_LENGTH``, which answers 413 itself.
        limits: connection limits and timeouts; None: :meth:`ServerLimits.from_env`.
        **adjustments: any other waitress setting (``waitress.adjustments.Adjustments``).

    Returns:
        a waitress ``TcpWSGIServer`` (``MultiSocketServer`` if ``host`` resolves to several
        addresses), bound and listening.

    Raises:
        ConfigError: an ``IPCSERVE_*`` limit in the environment is invalid.
        OSError: the address can't be bound.
    """
    limits = ServerLimits.from_env() if limits is None else limits
    models = _models(app)
    if threads is None:
        threads = handler_threads(app)
    # A request that waited this long in waitress's queue is past every model's deadline.
    queue_timeout = max((ml.config.timeout for ml in models), default=30.0)
    connection_limit = limits.connection_limit
    wanted = _FD_RESERVE + 2 * threads + _FDS_PER_CONNECTION * (connection_limit or MAX_CONNECTIONS)
    nofile = raise_nofile_limit(wanted)
    if connection_limit is None:
        connection_limit = connection_limit_for(nofile, threads)
    elif nofile < wanted:
        # Past the open-files limit, accept() fails with EMFILE and waitress logs it on
        # every pass of its loop (server.py, handle_accept) instead of leaving the client queued.
        logger.warning("connection_limit=%d needs about %d open files, the limit is %d: raise "
                       "the hard limit (ulimit -Hn, LimitNOFILE=) or lower IPCSERVE_CONNECTION_LIMIT",
                       connection_limit, wanted, nofile)
    if max_request_body_size is not None:
        adjustments["max_request_body_size"] = max_request_body_size
    adjustments.setdefault("ident", "ipcserve")
    adj = Adjustments(
        host=host, port=port, threads=threads, connection_limit=connection_limit,
        # select() raises ValueError for descriptors past FD_SETSIZE (1024): poll() has no cap.
        asyncore_use_poll=True,
        # waitress's channel_timeout closes connections idle (no request running, no byte
        # received) that long; it is checked by maintenance(), which the server runs at most
        # every cleanup_interval seconds (default 30): check every second, for our timeouts too.
        channel_timeout=max(1, math.ceil(limits.idle_timeout)), cleanup_interval=1,
        **adjustments)
    wsgi = _ShedStale(app, queue_timeout)
    dispatcher = ThreadedTaskDispatcher()
    socket_map: dict[int, Any] = {}
    servers: list[_Server] = []
    try:
        for sockinfo in adj.listen:
            servers.append(_Server(wsgi, socket_map, dispatcher=dispatcher, adj=adj,
                                   sockinfo=sockinfo, limits=limits, closing=_closing(app),
                                   stale=wsgi))
    except OSError:
        for server in servers:
            server.close()
        raise
    dispatcher.set_thread_count(threads)  # after binding: a failed bind leaves no threads
    logger.info("waitress: %d threads, connection_limit=%d, header_timeout=%gs, body_timeout=%gs, "
                "idle_timeout=%gs, queue_timeout=%gs", threads, connection_limit,
                limits.header_timeout, limits.body_timeout, limits.idle_timeout, queue_timeout)
    if len(servers) == 1:
        return servers[0]
    return MultiSocketServer(socket_map, adj, [(s.effective_host, s.effective_port) for s in servers],
                             dispatcher, servers[0].log_info)


# -- request stamps ----------------------------------------------------------------------

class _Request(HTTPRequestParser):  # type: ignore[misc]
    """waitress's request parser, stamped with when the request's parts arrived."""

    headers_at: float | None = None
    received_at: float | None = None

    def __init__(self, adj: Adjustments) -> None:
        super().__init__(adj)
        # HTTPChannel.received() makes the parser when the first bytes of a request arrive.
        self.started = time.monotonic()

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        # HTTP/1.1's Transfer-Encoding is popped from the headers by waitress (it de-chunks the
        # body); HTTP/1.0's stays there. Either way, two lengths are one too many.
        headers = self.headers
        if "CONTENT_LENGTH" in headers and (self.chunked or "TRANSFER_ENCODING" in headers):
            raise ParsingError("it has both Content-Length and Transfer-Encoding, which a proxy "
                               "in front may read differently (request smuggling); send one")

    def received(self, data: bytes) -> int:
        consumed: int = super().received(data)
        if self.headers_finished and self.headers_at is None:
            self.headers_at = time.monotonic()
        if self.completed and self.received_at is None:
            self.received_at = time.monotonic()
        return consumed


class _Task(WSGITask):  # type: ignore[misc]
    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()
        received = getattr(self.request, "received_at", None)
        environ[RECEIVED_KEY] = received if received is not None else time.monotonic()
        return environ

    def build_response_header(self) -> bytes:
        # Draining: every response closes its connection (Connection: close), so clients
        # and balancers holding keep-alive connections reconnect, to another host, instead
        # of finding the connection closed under their next request.
        closing = getattr(self.channel.server, "closing", None)
        if closing is not None and closing():
            self.set_close_on_finish()
        header: bytes = super().build_response_header()
        return header


# waitress's protocol errors (waitress/utilities.py) as ipcserve error types: the names
# Werkzeug gives the same statuses, and ipcserve's own for 413.
_ERROR_TYPES = {400: "BadRequest", 413: "PayloadTooLargeError", 431: "RequestHeaderFieldsTooLarge",
                500: "InternalServerError", 501: "NotImplemented"}
_ERROR_MESSAGES = {
    400: "the request is not valid HTTP: {}",
    413: "the request body is larger than this server accepts ({} bytes)",
    431: "the request headers are larger than this server accepts ({} bytes)",
    500: "the server hit an unexpected error; see its log",
    501: "{}",
}


def _error_body(code: int, reason: str, detail: str) -> bytes:
    template = _ERROR_MESSAGES.get(code, reason + ": {}")
    body = {"error": template.format(detail.strip().rstrip(".")),
            "type": _ERROR_TYPES.get(code, reason.replace(" ", ""))}
    return json.dumps(body).encode()


class _JSONErrorTask(ErrorTask):  # type: ignore[misc]
    """waitress's ErrorTask.execute with ipcserve's JSON body instead of text/plain."""

    def execute(self) -> None:
        error = self.request.error
        # The connection closes after an error answer: say so whatever the request asked
        # (waitress would add "Connection: Keep-Alive" beside "close" for an HTTP/1.0
        # keep-alive request).
        self.request.headers["CONNECTION"] = "close"
        body = _error_body(error.code, error.reason, str(error.body))
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


# -- slow clients ------------------------------------------------------------------------

class _Channel(HTTPChannel):  # type: ignore[misc]
    parser_class = _Request
    task_class = _Task
    error_task_class = _JSONErrorTask

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # While a request runs, the channel reads nothing more (channel_request_lookahead=0):
        # a pipelined request's clock starts only once the server is ready for it.
        self.free_since = time.monotonic()

    def service(self) -> None:
        try:
            super().service()
        finally:
            self.free_since = time.monotonic()

    def overdue(self, now: float, limits: ServerLimits) -> str | None:
        """"header" or "body" if the request being received is past its timeout, else None."""
        request = self.request
        if request is None or self.requests or self.will_close:
            return None  # idle (channel_timeout's business), or the server is the slow one
        if not request.headers_finished:
            started = max(request.started, self.free_since)
            return "header" if now - started > limits.header_timeout else None
        if not request.completed and request.headers_at is not None:
            started = max(request.headers_at, self.free_since)
            return "body" if now - started > limits.body_timeout else None
        return None


class _Server(TcpWSGIServer):  # type: ignore[misc]
    channel_class = _Channel

    def __init__(self, *args: Any, limits: ServerLimits, closing: Callable[[], bool] | None = None,
                 stale: _ShedStale | None = None, **kwargs: Any) -> None:
        self.limits = limits
        self.closing = closing  # true while the app drains: responses close their connections
        # The app's wrapper, kept here: waitress wraps the app it is given in its own proxy
        # headers middleware (clear_untrusted_proxy_headers), so self.application is not it.
        self.stale = stale
        self._cut = {"header": 0, "body": 0}
        self._cut_logged = -math.inf
        super().__init__(*args, **kwargs)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle connections: waitress's channel_timeout
        mono = time.monotonic()
        channels: Iterable[_Channel] = list(self.active_channels.values())
        for channel in channels:
            phase = channel.overdue(mono, self.limits)
            if phase is not None:
                logger.debug("closing connection from %s: its request %s took longer than %gs",
                             channel.addr, phase, getattr(self.limits, f"{phase}_timeout"))
                channel.will_close = True  # HTTPChannel.writable() -> handle_write() closes it
                self._cut[phase] += 1
        # One line per LOG_EVERY at most: under a slowloris flood this runs every second.
        if any(self._cut.values()) and mono - self._cut_logged >= LOG_EVERY:
            self._log_cut()
            self._cut_logged = mono

    def _log_cut(self) -> None:
        logger.warning("closed %d connection(s) whose headers took longer than %gs and %d whose "
                       "body took longer than %gs", self._cut["header"], self.limits.header_timeout,
                       self._cut["body"], self.limits.body_timeout)
        self._cut = {"header": 0, "body": 0}

    def flush_logs(self) -> None:
        """Log what the rate-limited warnings of this server and its app still hold."""
        if any(self._cut.values()):
            self._log_cut()
        if self.stale is not None:
            self.stale.flush_logs()


def flush_logs(server: Any) -> None:
    """Log what the rate-limited warnings still hold back (call it when the server stopped):
    connections closed for slowness, requests refused for waiting past their deadline, the
    models' response cache errors. A line per 10 s at most is written while they happen;
    without this the count since the last line would be lost."""
    servers = [server] if isinstance(server, _Server) else \
        [s for s in getattr(server, "map", {}).values() if isinstance(s, _Server)]
    for one in servers:
        one.flush_logs()


# -- requests that waited too long ------------------------------------------------------

class _ShedStale:
    """WSGI wrapper: a request that waited in waitress's queue longer than ``queue_timeout``
    (its whole deadline) gets 503 + Retry-After at once, without reaching the app.

    The app never sees such a request, so it is counted here, in the app's metrics when it
    is an ipcserve app: ``ipcserve_shed_total{model, reason="queue_deadline"}``, and for a
    model's URL also as a 503 of that model (requests, latency, the status page's history).
    The model is found by routing the URL through the app's URL map (the default model for
    ``/predict``); a URL that names none (the OpenAI routes carry the model in the body)
    counts under ``model=""``.
    """

    def __init__(self, app: Any, queue_timeout: float) -> None:
        self.app = app
        self.queue_timeout = queue_timeout
        try:
            self._state: Served | None = served(app)
        except RuntimeError:  # a WSGI app without ipcserve: logged only
            self._state = None
        self._lock = threading.Lock()  # handler threads share the log counter below
        self._shed = 0
        self._shed_logged = -math.inf

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        received = environ.get(RECEIVED_KEY)
        if received is None:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        now = time.monotonic()
        waited = now - received
        if waited <= self.queue_timeout:
            return self.app(environ, start_response)  # type: ignore[no-any-return]
        with self._lock:
            self._shed += 1
            if now - self._shed_logged >= LOG_EVERY:  # one line per LOG_EVERY at most under overload
                self._log_shed()
                self._shed_logged = now
        if self._state is not None:
            self._state.metrics.shed_request(self._model_of(environ), SHED_QUEUE_DEADLINE, waited)
        body = json.dumps({
            "error": f"the request waited {waited:.1f}s for the server, longer than its deadline "
                     f"({self.queue_timeout:g}s): the server is overloaded; retry later",
            "type": "OverloadedError"}).encode()
        start_response("503 Service Unavailable", [("Content-Type", "application/json"),
                                                   ("Content-Length", str(len(body))),
                                                   ("Retry-After", "1")])
        return [body]

    def _log_shed(self) -> None:  # with self._lock held
        logger.warning("refused %d request(s) that waited longer than their deadline (%gs) "
                       "for a handler thread: the server is overloaded", self._shed,
                       self.queue_timeout)
        self._shed = 0

    def _model_of(self, environ: dict[str, Any]) -> str:
        """The served model the request's URL names, else ``""``."""
        state = self._state
        url_map = getattr(self.app, "url_map", None)
        if state is None or url_map is None:
            return ""
        try:
            endpoint, args = url_map.bind_to_environ(environ).match()
        except Exception:  # no route (404, 405, a redirect): no model
            return ""
        name = args.get("name")
        if name is None and endpoint == "ipcserve.predict_default":
            name = state.models.default
        return name if name in state.models.endpoints else ""

    def flush_logs(self) -> None:
        """Log the refusals the rate-limited line still holds, and the errors the app's
        response caches still hold."""
        with self._lock:
            if self._shed:
                self._log_shed()
        if self._state is not None:
            for endpoint in list(self._state.models.endpoints.values()):
                if endpoint.cache is not None:
                    endpoint.cache.flush_log()
