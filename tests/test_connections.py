"""Connections, overload and answers of the real server (``python app.py``), over raw sockets.

Idle and slow clients must not lock others out, overload is shed at once with 503, no answer
comes later than its deadline counted from when the server received the request, and every
answer (routing edge cases and waitress's own protocol errors included) is JSON.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import re
import resource
import select
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from server import Server
from measure import burst

pytestmark = pytest.mark.timeout(120)

logger = logging.getLogger(__name__)

# Answers may come this much after their deadline (the docs promise "a few tens of
# milliseconds"; two shared, loaded cores get more room).
DEADLINE_MARGIN = 1.0
# The server checks its connection timeouts about once a second (cleanup_interval=1 and the
# poll loop's 1 s timeout), so a timeout fires up to ~2 s late on an idle machine.
TIMEOUT_SLACK = 3.0
# How long past a timeout a test waits for the close (returns as soon as it happens): the
# machine is shared, and a starved server process checks late.
CLOSE_BOUND = 10.0
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def address(server: Server) -> tuple[str, int]:
    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def raise_nofile(wanted: int) -> None:
    """Raise this test process's soft RLIMIT_NOFILE to ``wanted`` (or skip if the hard one is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """(status, headers, body) once ``data`` holds a whole response with Content-Length."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if len(rest) < length:
        return None
    return status, headers, rest[:length]


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Read one whole response, no more (bounded by ``timeout``)."""
    received = b""
    deadline = time.monotonic() + timeout
    while (parsed := parse_response(received)) is None:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"server closed the connection mid-response: {received[:300]!r}")
        received += chunk
    return parsed


def raw_request(server: Server, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a new connection, read one whole response."""
    with socket.create_connection(address(server), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock, timeout)


def json_error(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers["content-type"].startswith("application/json"), (status, headers, body)
    error = json.loads(body)
    assert isinstance(error["error"], str) and error["type"], error  # ipcserve's error body
    return error


def is_open(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock`` open (no EOF, no reset), without blocking."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def wait_closed(sock: socket.socket, timeout: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` (sending ``trickle`` every 0.2 s), or None."""
    started = time.monotonic()
    deadline = started + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if trickle:
            try:
                sock.send(trickle)
            except OSError:
                return time.monotonic() - started
        if select.select([sock], [], [], min(0.2, remaining))[0] and not is_open(sock):
            return time.monotonic() - started
    return None


def open_idle(server: Server, count: int, timeout: float) -> list[socket.socket]:
    """``count`` keep-alive connections, each after one answered GET /healthz."""
    socks: list[socket.socket] = []
    with contextlib.ExitStack() as on_error, selectors.DefaultSelector() as selector:
        on_error.callback(lambda: [s.close() for s in socks])
        for _ in range(count):
            sock = socket.create_connection(address(server), timeout=timeout)
            socks.append(sock)
            sock.sendall(HEALTHZ)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, data=[b""])
        answered = 0
        deadline = time.monotonic() + timeout
        while answered < count and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(remaining):
                buffer = key.data
                chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
                buffer[0] += chunk
                parsed = parse_response(buffer[0])
                if parsed is not None or not chunk:
                    selector.unregister(key.fileobj)
                    assert parsed is not None and parsed[0] == 200, buffer[0][:300]
                    answered += 1
        assert answered == count, (f"only {answered} of {count} keep-alive connections got an "
                                   f"answer within {timeout}s: the server stopped accepting them")
        on_error.pop_all()
    return socks


class Slowloris:
    """``count`` connections that send a request header one byte per ``interval`` and never end it."""

    def __init__(self, server: Server, count: int, interval: float = 1.0) -> None:
        self.socks = [socket.create_connection(address(server), timeout=10) for _ in range(count)]
        for sock in self.socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sock.setblocking(False)
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, name="slowloris", daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        # The Event is the stop signal; its timeout paces the attack (it is the workload).
        while not self.stop.wait(self.interval):
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.send(b"a")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for sock in self.socks:
            sock.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@contextlib.contextmanager
def running(*args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = Server(*args, env=env)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output


# -- A. idle and slow connections --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(180)
def test_normal_client_stays_fast_beside_1000_idle_and_200_slowloris_connections() -> None:
    raise_nofile(4096)
    with running() as server, contextlib.ExitStack() as stack:
        idle = open_idle(server, 1000, timeout=20)
        stack.callback(lambda: [s.close() for s in idle])
        slow = Slowloris(server, 200)
        stack.callback(slow.close)
        slow_started = time.monotonic()
        host, port = address(server)
        # Not measured: this one waits while waitress accepts the 200 connections that just
        # arrived (one accept per poll-loop pass); steady state is what the goal is about.
        assert raw_request(server, HEALTHZ)[0] == 200
        latencies = []
        for i in range(100):
            started = time.perf_counter()
            conn = http.client.HTTPConnection(host, port, timeout=10)
            try:
                if i % 2:
                    conn.request("POST", "/predict", body=json.dumps({"pixels": [0.0] * 64}),
                                 headers={"Content-Type": "application/json"})
                else:
                    conn.request("GET", "/healthz")
                response = conn.getresponse()
                body = response.read()
            finally:
                conn.close()
            latencies.append(time.perf_counter() - started)
            assert response.status == 200, body
        measured_for = time.monotonic() - slow_started
        p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
        logger.warning("beside 1000 idle + 200 slowloris connections: p50 %.1f ms, p99 %.1f ms, "
                       "max %.1f ms over %d requests", p50, p99, max(latencies) * 1000, len(latencies))
        # The measurement only means something if the other connections were really there.
        assert sum(map(is_open, idle)) == 1000
        assert sum(map(is_open, slow.socks)) == 200, f"slowloris closed after {measured_for:.1f}s"
        assert p99 < 100, f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"


@pytest.fixture(scope="module")
def strict() -> Iterator[Server]:
    """A server with tiny connection timeouts."""
    with running(env={"IPCSERVE_HEADER_TIMEOUT": "1", "IPCSERVE_BODY_TIMEOUT": "1",
                      "IPCSERVE_IDLE_TIMEOUT": "8"}) as server:
        yield server


@pytest.mark.slow
def test_slowloris_header_is_closed_after_the_header_timeout(strict: Server) -> None:
    with socket.create_connection(address(strict), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        closed_after = wait_closed(sock, 1 + CLOSE_BOUND, trickle=b"a")
    assert closed_after is not None, "a header trickled a byte at a time was never cut off"
    assert closed_after >= 0.9


@pytest.mark.slow
def test_slow_body_is_closed_after_the_body_timeout(strict: Server) -> None:
    with socket.create_connection(address(strict), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{")
        closed_after = wait_closed(sock, 1 + CLOSE_BOUND, trickle=b" ")
    assert closed_after is not None, "a body trickled a byte at a time was never cut off"
    assert closed_after >= 0.9


@pytest.mark.slow
def test_idle_keep_alive_outlives_the_header_timeout_then_closes(strict: Server) -> None:
    sock = open_idle(strict, 1, timeout=10)[0]
    with sock:
        # Not a request in progress: the header timeout (1 s) must not apply, the idle one (8 s) does.
        assert wait_closed(sock, 1 + TIMEOUT_SLACK) is None
        sock.setblocking(True)
        sock.sendall(HEALTHZ)  # still usable
        # The whole answer: a byte left unread would hide the server's close from is_open().
        assert read_response(sock)[0] == 200
        closed_after = wait_closed(sock, 8 + CLOSE_BOUND)
    assert closed_after is not None and closed_after >= 7.5, closed_after


# -- B. overload and end-to-end deadlines -------------------------------------------------

@pytest.mark.slow
def test_past_the_admission_limit_requests_get_503_at_once() -> None:
    timeout = 2.0
    with running("--model", "models:Sleeper", "--timeout", str(timeout),
                 env={"IPCSERVE_MAX_INFLIGHT": "8"}) as server:
        results = burst(server.url, 40, seconds=1.0)
    assert "waitress: 12 threads" in server.output  # max_inflight + SPARE_THREADS
    shed = [r for r in results if r[0] == 503]
    admitted = [r for r in results if r[0] != 503]
    summary = sorted((status, round(elapsed, 2)) for status, elapsed, _, _ in results)
    assert len(admitted) <= 8 and {r[0] for r in admitted} <= {200, 504}, summary
    assert len(shed) >= 32, summary
    for status, elapsed, headers, body in shed:
        assert int(headers["retry-after"]) >= 1
        assert json_error(status, headers, body)["type"] == "OverloadedError"
        assert elapsed < 1.0, summary
    assert max(r[1] for r in results) <= timeout + DEADLINE_MARGIN, summary


@pytest.mark.slow
def test_deadline_counts_from_when_the_server_received_the_request() -> None:
    # Two threads for 40 clients: most requests wait in the server's queue. Each must still
    # be answered within its deadline of its arrival, not of when a thread took it.
    timeout = 2.0
    with running("--model", "models:Sleeper", "--timeout", str(timeout), "--threads", "2",
                 env={"IPCSERVE_MAX_INFLIGHT": "8"}) as server:
        results = burst(server.url, 40, seconds=0.5)
    summary = sorted((status, round(elapsed, 2)) for status, elapsed, _, _ in results)
    assert {r[0] for r in results} <= {200, 503, 504}, summary
    assert max(r[1] for r in results) <= timeout + DEADLINE_MARGIN, summary
    for status, _, headers, body in results:
        if status != 200:
            json_error(status, headers, body)
        if status == 503:
            assert int(headers["retry-after"]) >= 1


def test_a_request_that_waited_past_its_deadline_gets_503_without_reaching_the_app() -> None:
    from ipcserve.server.waitress_conf import RECEIVED_KEY, _ShedStale

    calls: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(environ)
        start_response("200 OK", [])
        return [b"ok"]

    shed = _ShedStale(app, queue_timeout=5.0)
    answers: list[tuple[str, dict[str, str]]] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answers.append((status, {k.lower(): v for k, v in headers}))

    body = b"".join(shed({RECEIVED_KEY: time.monotonic() - 6.0}, start_response))
    status, headers = answers[-1]
    assert status.startswith("503") and not calls
    assert headers["retry-after"] == "1"
    assert json_error(503, headers, body)["type"] == "OverloadedError"
    assert b"".join(shed({RECEIVED_KEY: time.monotonic()}, start_response)) == b"ok"
    assert b"".join(shed({}, start_response)) == b"ok" and len(calls) == 2


_REFUSED_LINE = re.compile(r"refused (\d+) request\(s\) that waited longer than their deadline")


@pytest.mark.slow
def test_requests_refused_before_flask_are_counted_and_their_log_count_is_kept() -> None:
    # One thread for 24 clients of a model that takes 0.3 s: a few are answered, the rest
    # wait in waitress's queue past their 1 s deadline and are refused before Flask.
    timeout = 1.0
    server = Server("--model", "models:Sleeper", "--timeout", str(timeout), "--threads", "1")
    try:
        results = burst(server.url, 24, seconds=0.3)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        history = requests.get(f"{server.url}/v1/history", timeout=10).json()
    finally:
        code = server.stop()
    assert code == 0, server.output
    summary = sorted((status, round(elapsed, 2)) for status, elapsed, _, _ in results)
    stale = [r for r in results if r[0] == 503]
    assert {r[0] for r in results} <= {200, 503, 504}, summary
    assert len(stale) >= 2, summary  # else the log count below could not tell anything
    for status, elapsed, headers, body in stale:
        assert int(headers["retry-after"]) >= 1
        error = json_error(status, headers, body)
        assert error["type"] == "OverloadedError" and "longer than its deadline" in error["error"]
        assert elapsed <= timeout + DEADLINE_MARGIN, summary
    # In /metrics: as sheds with their reason, and as the model's 503s (/predict is sleeper's).
    assert f'ipcserve_shed_total{{model="sleeper",reason="queue_deadline"}} {len(stale)}.0' \
        in metrics, metrics
    assert 'reason="inflight"' not in metrics
    assert f'ipcserve_requests_total{{model="sleeper",status="503"}} {len(stale)}.0' in metrics
    # On the status page's history.
    assert sum(history["models"]["sleeper"]["requests"]["503"]) == len(stale)
    # The warning is rate-limited (one line per 10 s); its lines add up to every refusal,
    # the last ones written when the server stopped.
    logged = [int(m.group(1)) for m in _REFUSED_LINE.finditer(server.output)]
    assert sum(logged) == len(stale), (logged, summary)
    assert server.output.index("SIGTERM received") < server.output.rindex("refused")


def test_a_stale_request_counts_under_the_model_its_url_names(caplog: pytest.LogCaptureFixture) -> None:
    from flask import Flask
    from models import Doubler

    from ipcserve.http.extension import IPCServe
    from ipcserve.server.waitress_conf import RECEIVED_KEY, _ShedStale

    app = Flask("stale")
    ipc = IPCServe(app)
    ipc.add_model(Doubler())  # never started: a refused request never reaches it
    ipc.add_model(Doubler(name="other"))
    shed = _ShedStale(app, queue_timeout=5.0)
    late = time.monotonic() - 6.0
    for path in ("/predict", "/v1/models/other/predict", "/v2/models/other/infer",
                 "/v1/chat/completions", "/nowhere", "/v1/models/ghost/predict"):
        environ = {RECEIVED_KEY: late, "REQUEST_METHOD": "POST", "PATH_INFO": path,
                   "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "wsgi.url_scheme": "http"}
        b"".join(shed(environ, lambda status, headers: None))
    metrics = app.extensions["ipcserve"].metrics.exposition()[0].decode()
    for model, count in (("doubler", 1), ("other", 2), ("", 3)):
        assert f'ipcserve_shed_total{{model="{model}",reason="queue_deadline"}} {count}.0' \
            in metrics, metrics
    shed.flush_logs()
    shed.flush_logs()  # nothing left the second time
    # The first refusal is logged at once; the 5 after it within 10 s, when flushed.
    assert [r.getMessage().split()[1] for r in caplog.records] == ["1", "5"]


def test_predict_counts_its_deadline_from_when_the_server_received_it() -> None:
    from flask import Flask
    from models import Doubler

    from ipcserve.http.extension import IPCServe

    app = Flask("deadline")
    ext = IPCServe(app)
    ext.add_model(Doubler(timeout=5.0))
    ext.start()
    try:
        client = app.test_client()
        late = client.post("/predict", json={"x": 1},
                           environ_overrides={"ipcserve.received": time.monotonic() - 6.0})
        assert late.status_code == 504 and late.json["type"] == "QueueDeadlineError"
        # In time, the request goes on to the model.
        in_time = client.post("/predict", json={"x": 1},
                              environ_overrides={"ipcserve.received": time.monotonic()})
        assert in_time.status_code == 200 and in_time.json == 2
    finally:
        ext.drain(grace=1)


def test_server_limits_from_the_environment() -> None:
    from ipcserve import ConfigError
    from ipcserve.server.waitress_conf import ServerLimits

    assert ServerLimits.from_env({}) == ServerLimits()
    limits = ServerLimits.from_env({"IPCSERVE_HEADER_TIMEOUT": "2.5", "IPCSERVE_CONNECTION_LIMIT": "50"})
    assert limits.header_timeout == 2.5 and limits.connection_limit == 50
    with pytest.raises(ConfigError, match="IPCSERVE_BODY_TIMEOUT"):
        ServerLimits.from_env({"IPCSERVE_BODY_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="idle_timeout must be a number > 0"):
        ServerLimits(idle_timeout=0)
    with pytest.raises(ConfigError, match="connection_limit must be an integer >= 1"):
        ServerLimits(connection_limit=0)


def test_create_server_sizes_threads_from_the_models_and_keeps_waitress_settings(
        caplog: pytest.LogCaptureFixture) -> None:
    from flask import Flask
    from models import Doubler

    from ipcserve.http.extension import IPCServe
    from ipcserve.server.waitress_conf import SPARE_THREADS, ServerLimits, create_server

    app = Flask("sized")
    ipc = IPCServe(app)
    ipc.add_model(Doubler(max_inflight=10, timeout=7.0))  # never started: no process
    ipc.add_model(Doubler(name="other", max_inflight=6, timeout=12.0))
    with caplog.at_level(logging.INFO, logger="ipcserve.server.waitress_conf"):
        server = create_server(app, port=0, limits=ServerLimits(idle_timeout=4.5))
    try:
        adj = server.adj
        assert adj.threads == 16 + SPARE_THREADS
        assert adj.asyncore_use_poll and adj.cleanup_interval == 1 and adj.channel_timeout == 5
        assert adj.connection_limit > 1000 and adj.ident == "ipcserve"
        assert "queue_timeout=12s" in caplog.text  # the longest model deadline
    finally:
        server.close()
        server.task_dispatcher.shutdown()


def test_connection_limit_fits_the_descriptor_budget() -> None:
    from ipcserve.server.waitress_conf import MAX_CONNECTIONS, connection_limit_for

    assert connection_limit_for(1024, threads=12) == (1024 - 256 - 24) // 2
    assert connection_limit_for(20_000, threads=68) == (20_000 - 256 - 136) // 2
    assert connection_limit_for(1 << 20, threads=68) == MAX_CONNECTIONS
    assert connection_limit_for(256, threads=8) == 1


# -- C. every answer is JSON, none is a redirect built from the Host header ----------------

@pytest.mark.parametrize("path, status", [
    ("//healthz", 200),          # waitress itself collapses leading slashes
    ("/v1//models", 404),        # Werkzeug's merge_slashes would answer 308
    ("/v1/models//digits", 404),
    ("/healthz/", 200),          # a trailing slash is accepted, never redirected
])
def test_odd_paths_get_json_and_never_a_redirect(server: Server, path: str, status: int) -> None:
    got, headers, body = raw_request(
        server, f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode())
    assert "location" not in headers and b"evil.example" not in body, (got, headers, body)
    assert got == status, (headers, body)
    assert headers["content-type"].startswith("application/json")
    json.loads(body)


def test_url_prefix_root_without_slash_is_not_redirected() -> None:
    from flask import Flask

    from ipcserve.http.extension import IPCServe

    app = Flask("prefixed")
    IPCServe(app, url_prefix="/ml")
    response = app.test_client().get("/ml", headers={"Host": "evil.example"})
    assert response.status_code == 200 and "Location" not in response.headers


@pytest.mark.parametrize("request_bytes, status, error_type", [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431,
     "RequestHeaderFieldsTooLarge"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400, "BadRequest"),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "NotImplemented"),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n", 413,
     "PayloadTooLargeError"),
], ids=["431-headers", "400-bad-header", "501-transfer-encoding", "413-over-server-cap"])
def test_server_level_errors_are_json(server: Server, request_bytes: bytes, status: int,
                                      error_type: str) -> None:
    got, headers, body = raw_request(server, request_bytes)
    assert got == status, (headers, body)
    assert json_error(got, headers, body)["type"] == error_type


# -- D. one length per request (RFC 9112 section 6.1) --------------------------------------

def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def _pixels() -> bytes:
    return json.dumps({"pixels": [0.0] * 64}).encode()


def _recv_eof(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes ``sock`` (bounded by ``timeout``)."""
    sock.settimeout(timeout)
    rest = b""
    while chunk := sock.recv(65536):
        rest += chunk
    return rest


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_a_request_with_two_lengths_gets_400_and_its_connection_closed(server: Server,
                                                                       version: str) -> None:
    # A proxy in front that frames by Content-Length would see one request where waitress
    # (by the chunked body) sees another one: request smuggling. Content-Length: 5 frames
    # "0\r\n\r\n", the end of an empty chunked body; the chunked framing reads the pixels.
    body = _chunked(_pixels())
    with socket.create_connection(address(server), timeout=10) as sock:
        sock.sendall(f"POST /predict HTTP/{version}\r\nHost: x\r\nConnection: keep-alive\r\n"
                     "Content-Type: application/json\r\nContent-Length: 5\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode() + body)
        status, headers, error = read_response(sock)
        assert status == 400, (headers, error)
        assert "Content-Length and Transfer-Encoding" in json_error(status, headers, error)["error"]
        assert headers.get("connection", "").lower() == "close"
        # Closed after the answer: whatever else was sent on it is never read as a request.
        assert _recv_eof(sock, CLOSE_BOUND) == b""


def test_one_length_either_way_still_works_on_one_keep_alive_connection(server: Server) -> None:
    pixels = _pixels()
    with socket.create_connection(address(server), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(pixels))
            status, _, body = read_response(sock)
            assert status == 200 and 0 <= json.loads(body)["label"] <= 9, body
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(pixels)}\r\n\r\n".encode() + pixels)
            status, _, body = read_response(sock)
            assert status == 200 and 0 <= json.loads(body)["label"] <= 9, body
        sock.setblocking(True)  # is_open() peeks without waiting (a timeout would wait)
        assert is_open(sock)
