"""A team's model server through real HTTP: several models from one TOML file, reload without
dropping a request, and the response cache. Every server here is the real ``python app.py``."""

from __future__ import annotations

import concurrent.futures
import logging
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import free_port, wait_until
from server import ROOT, Server
from measure import sample

pytestmark = pytest.mark.timeout(120)

logger = logging.getLogger(__name__)

# Spawned ML processes import the module from this directory afresh on every start; no
# bytecode cache, so a rewrite within the same second is never shadowed by a stale .pyc.
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}

VERSIONED = '''
from ipcserve import MLProcess

VERSION = {version}


class Versioned(MLProcess):
    def load(self):
        {load}

    def predict(self, x=0):
        return {{"version": VERSION, "x": x}}
'''


def write_versioned(directory: Path, version: int, load: str = "pass") -> None:
    (directory / "versioned.py").write_text(VERSIONED.format(version=version, load=load))


def write_config(directory: Path, text: str) -> Path:
    path = directory / "models.toml"
    path.write_text(textwrap.dedent(text))
    return path


def models_of(server: Server, headers: dict[str, str] | None = None) -> dict[str, Any]:
    listing = requests.get(f"{server.url}/v1/models", headers=headers, timeout=10).json()
    return {m["id"]: m for m in listing["data"]}


def served(model: dict[str, Any]) -> int:
    return sum(w["served"] for w in model["status"]["workers"])


# -- the config file ---------------------------------------------------------------------
def test_three_models_from_one_toml_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, """
        [server]
        threads = 12
        idle_timeout = 30

        [models.digits]
        model = "digits"

        [models.double]
        model = "models:Doubler"
        workers = 2
        default = true

        [models.nap]
        model = "models:Sleeper"
        timeout = 5
        """)
    server = Server("--config", str(config))
    try:
        models = models_of(server)
        assert sorted(models) == ["digits", "double", "nap"]
        assert models["digits"]["kind"] == "image" and models["double"]["kind"] == "json"
        assert len(models["double"]["status"]["workers"]) == 2  # its own engine setting
        assert all(m["revision"] == 1 and m["load_seconds"] is not None for m in models.values())
        # Every model answers at its own URL; the default one at /predict too.
        digits = requests.post(f"{server.url}/v1/models/digits/predict",
                               json={"pixels": [0.0] * 64}, timeout=10)
        assert digits.status_code == 200 and 0 <= digits.json()["label"] <= 9
        assert requests.post(f"{server.url}/v1/models/double/predict", json={"x": 21},
                             timeout=10).json() == 42
        assert requests.post(f"{server.url}/predict", json={"x": 4}, timeout=10).json() == 8
        nap = requests.post(f"{server.url}/v1/models/nap/predict", json={"seconds": 0}, timeout=10)
        assert nap.status_code == 200 and nap.json()["slept"] == 0
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        for name in ("digits", "double", "nap"):
            assert f'ipcserve_requests_total{{model="{name}",status="200"}} 1.0' in metrics \
                or (name == "double" and 'model="double",status="200"} 2.0' in metrics)
            assert f'ipcserve_model_ready{{model="{name}"}} 1.0' in metrics
    finally:
        assert server.stop() == 0, server.output


def test_repeating_model_on_the_command_line_serves_each(tmp_path: Path) -> None:
    server = Server("--model", "models:Doubler", "--model", "models:Sleeper")
    try:
        assert sorted(models_of(server)) == ["doubler", "sleeper"]
        assert requests.post(f"{server.url}/predict", json={"x": 1}, timeout=10).json() == 2
    finally:
        assert server.stop() == 0, server.output


BAD_CONFIGS = [
    ("[server]\nport = 'eighty'\n[models.a]\nmodel = 'models:Doubler'\n", "[server] port"),
    ("[server]\nthreds = 4\n[models.a]\nmodel = 'models:Doubler'\n", "[server] threds: unknown key"),
    ("[server]\napi_key = 'secret'\n[models.a]\nmodel = 'models:Doubler'\n", "api_key_env"),
    ("[server]\napi_key_env = 'IPCSERVE_TEST_UNSET_VAR'\n[models.a]\nmodel = 'models:Doubler'\n",
     "IPCSERVE_TEST_UNSET_VAR is not set"),
    ("[models.a]\nmodel = 'models:Doubler'\nworkers = 0\n", "[models.a]: workers must be an integer >= 1"),
    ("[models.a]\nmodel = 'models:Doubler'\nwrkers = 2\n", "[models.a] wrkers: unknown key"),
    ("[models.a]\nworkers = 2\n", "[models.a] model: required"),
    ("[models.a]\nmodel = 'models:Doubler'\ntimeout = 'soon'\n", "[models.a] timeout"),
    ("[models.a]\nmodel = 'models:Doubler'\ncache_ttl = 5\n", "cache_ttl and cache_size need cache = true"),
    ("[models.a]\nmodel = 'models:Doubler'\ncache = true\ncache_size = 0\n", "cache_size must be an integer >= 1"),
    ("[server]\ncache_timeout = 0\n[models.a]\nmodel = 'models:Doubler'\n",
     "[server] cache_timeout: must be a number of seconds > 0"),
    ("[cache]\ntimeout = 1\n[models.a]\nmodel = 'models:Doubler'\n",
     "[cache] timeout: the keys of [cache] are flask-caching's settings, such as CACHE_TYPE and "
     "CACHE_REDIS_URL; ipcserve's own cache_timeout (seconds per backend operation) goes in [server]"),
    ("[models.a]\nmodel = 'models:NoSuchModel'\n", "[models.a] model: cannot import"),
    ("[models.a]\nmodel = 'models:Doubler'\nkind = 'video'\n", "[models.a] kind"),
    ("[server]\nport = 8000\n", "no model"),
    ("[models.a\nmodel = 'x'\n", "not valid TOML"),
    ("[modles.a]\nmodel = 'models:Doubler'\n", "unknown table(s) [modles]"),
]


@pytest.mark.parametrize("text,expected", BAD_CONFIGS, ids=[e for _, e in BAD_CONFIGS])
def test_a_bad_config_file_exits_2_naming_file_table_and_key(tmp_path: Path, text: str,
                                                             expected: str) -> None:
    config = tmp_path / "models.toml"
    config.write_text(text)
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**__import__("os").environ, **env})
    assert done.returncode == 2, done.stderr
    assert str(config) in done.stderr and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_model_flag_and_config_file_together_is_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[models.a]\nmodel = 'models:Doubler'\n")
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "--config", str(config),
                           "--model", "digits"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert done.returncode == 2 and "both name models" in done.stderr, done.stderr


# -- reload ------------------------------------------------------------------------------
def test_reload_under_load_drops_nothing_and_serves_only_new_code_after(tmp_path: Path) -> None:
    write_versioned(tmp_path, 1)
    config = write_config(tmp_path, """
        [models.versioned]
        model = "versioned:Versioned"
        workers = 2
        """)
    server = Server("--config", str(config), env={"PYTHONPATH": str(tmp_path), **NO_PYC})
    url = f"{server.url}/v1/models/versioned/predict"
    stop = threading.Event()
    answers: list[tuple[float, int, Any]] = []  # (sent at, status, version)
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                sent = time.monotonic()
                reply = session.post(url, json={"x": 1}, timeout=30)
                version = reply.json().get("version") if reply.status_code == 200 else reply.text
                with lock:
                    answers.append((sent, reply.status_code, version))

    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            clients = [pool.submit(client) for _ in range(16)]
            wait_until(lambda: len(answers) >= 200, timeout=30, what="traffic on version 1")
            write_versioned(tmp_path, 2)
            reload = requests.post(f"{server.url}/v1/models/versioned/reload", timeout=60)
            reloaded_at = time.monotonic()
            assert reload.status_code == 200, reload.text
            assert reload.json()["revision"] == 2 and reload.json()["drained"] is True
            seen = len(answers)
            wait_until(lambda: len(answers) >= seen + 200, timeout=30, what="traffic on version 2")
            stop.set()
            for future in clients:
                future.result(30)
    finally:
        stop.set()
        code = server.stop()
    assert code == 0, server.output
    statuses = {status for _, status, _ in answers}
    assert statuses == {200}, [a for a in answers if a[1] != 200][:5]
    after = [version for sent, _, version in answers if sent > reloaded_at]
    assert after and set(after) == {2}
    assert {version for _, _, version in answers} == {1, 2}


def test_a_failing_reload_keeps_the_old_version_serving(tmp_path: Path) -> None:
    write_versioned(tmp_path, 1)
    server = Server("--model", "versioned:Versioned", env={"PYTHONPATH": str(tmp_path), **NO_PYC})
    reload_url = f"{server.url}/v1/models/versioned/reload"
    predict_url = f"{server.url}/v1/models/versioned/predict"
    try:
        write_versioned(tmp_path, 2, load='raise RuntimeError("weights file v2.bin is corrupt")')
        failed = requests.post(reload_url, timeout=60)
        assert failed.status_code == 500
        assert failed.json()["type"] == "ReloadError"
        assert "v2.bin is corrupt" in failed.json()["error"]
        assert "revision 1 keeps serving" in failed.json()["error"]
        assert requests.post(predict_url, json={"x": 3}, timeout=10).json() == {"version": 1, "x": 3}
        model = models_of(server)["versioned"]
        assert model["revision"] == 1 and model["last_reload"]["ok"] is False
        assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
        # Fixed: the next reload goes through.
        write_versioned(tmp_path, 3)
        assert requests.post(reload_url, timeout=60).json()["revision"] == 2
        assert requests.post(predict_url, json={"x": 3}, timeout=10).json() == {"version": 3, "x": 3}
    finally:
        code = server.stop()
    assert code == 0, server.output
    assert "reload failed, revision 1 keeps serving" in server.output
    assert "v2.bin is corrupt" in server.output


def test_reload_needs_the_api_key_and_names_unknown_models(tmp_path: Path) -> None:
    server = Server("--model", "models:Doubler", "--api-key", "team-key")
    try:
        denied = requests.post(f"{server.url}/v1/models/doubler/reload", timeout=10)
        assert denied.status_code == 401
        auth = {"Authorization": "Bearer team-key"}
        missing = requests.post(f"{server.url}/v1/models/nope/reload", headers=auth, timeout=10)
        assert missing.status_code == 404 and "doubler" in missing.json()["error"]
        done = requests.post(f"{server.url}/v1/models/doubler/reload", headers=auth, timeout=60)
        assert done.status_code == 200 and done.json()["revision"] == 2
    finally:
        assert server.stop() == 0, server.output


# -- the response cache ------------------------------------------------------------------
def test_cache_hits_repeats_and_forgets_after_a_reload(tmp_path: Path) -> None:
    config = write_config(tmp_path, """
        [server]
        api_key_env = "TEAM_KEY"

        [models.double]
        model = "models:Doubler"
        cache = true
        cache_ttl = 600
        cache_size = 100
        """)
    server = Server("--config", str(config), env={"TEAM_KEY": "k-123"})
    auth = {"Authorization": "Bearer k-123"}
    url = f"{server.url}/v1/models/double/predict"
    try:
        first = requests.post(url, json={"a": 1, "b": 2}, headers=auth, timeout=10)
        assert first.status_code == 200 and first.headers["X-IPCServe-Cache"] == "miss"
        computed = served(models_of(server, auth)["double"])
        # Same request, keys in another order and other spacing: one entry.
        again = requests.post(url, data='{ "b": 2,  "a": 1 }', headers={
            **auth, "Content-Type": "application/json"}, timeout=10)
        assert again.status_code == 200 and again.headers["X-IPCServe-Cache"] == "hit"
        assert again.json() == first.json() == {"a": 2, "b": 4}
        assert served(models_of(server, auth)["double"]) == computed  # the model never saw it
        # Never served to a request without the key.
        assert requests.post(url, json={"a": 1, "b": 2}, timeout=10).status_code == 401
        # Errors are never cached.
        for _ in range(2):
            bad = requests.post(url, json={"x": "raise"}, headers=auth, timeout=10)
            assert bad.status_code == 500 and "X-IPCServe-Cache" not in bad.headers
        metrics = requests.get(f"{server.url}/metrics", headers=auth, timeout=10).text
        assert 'ipcserve_cache_requests_total{model="double",result="hit"} 1.0' in metrics
        assert 'ipcserve_cache_requests_total{model="double",result="miss"} 3.0' in metrics
        # A reload forgets the model's answers.
        assert requests.post(f"{server.url}/v1/models/double/reload", headers=auth,
                             timeout=60).status_code == 200
        fresh = requests.post(url, json={"a": 1, "b": 2}, headers=auth, timeout=10)
        assert fresh.headers["X-IPCServe-Cache"] == "miss" and fresh.json() == {"a": 2, "b": 4}
        assert requests.post(url, json={"a": 1, "b": 2}, headers=auth,
                             timeout=10).headers["X-IPCServe-Cache"] == "hit"
    finally:
        assert server.stop() == 0, server.output


def test_uncached_models_send_no_cache_header() -> None:
    server = Server("--model", "models:Doubler")
    try:
        reply = requests.post(f"{server.url}/predict", json={"x": 2}, timeout=10)
        assert reply.status_code == 200 and "X-IPCServe-Cache" not in reply.headers
    finally:
        assert server.stop() == 0, server.output


def test_sighup_reloads_every_model_of_a_config_file(tmp_path: Path) -> None:
    write_versioned(tmp_path, 1)
    config = write_config(tmp_path, """
        [models.versioned]
        model = "versioned:Versioned"

        [models.double]
        model = "models:Doubler"
        """)
    server = Server("--config", str(config), env={"PYTHONPATH": str(tmp_path), **NO_PYC})
    try:
        write_versioned(tmp_path, 2)
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP reload done" in server.output, timeout=60, what="the reload")
        models = models_of(server)
        assert models["versioned"]["revision"] == 2 and models["double"]["revision"] == 2
        assert requests.post(f"{server.url}/v1/models/versioned/predict", json={"x": 0},
                             timeout=10).json()["version"] == 2
    finally:
        assert server.stop() == 0, server.output


def test_reloads_leak_no_file_descriptors_or_threads() -> None:
    server = Server("--model", "models:Doubler", "--workers", "2")
    pid = server.proc.pid

    def traffic() -> None:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: requests.post(
                f"{server.url}/predict", json={"x": i}, timeout=10).status_code, range(48)))
        assert codes == [200] * 48

    def counts() -> tuple[int, int]:
        return len(list(Path(f"/proc/{pid}/fd").iterdir())), len(list(Path(f"/proc/{pid}/task").iterdir()))

    try:
        traffic()
        fds, threads = counts()
        for revision in range(2, 6):
            reply = requests.post(f"{server.url}/v1/models/doubler/reload", timeout=60)
            assert reply.json()["revision"] == revision
            traffic()
        # Each version's pipes and supervisor threads go with it (a little slack for
        # connections the clients still hold open).
        later_fds, later_threads = counts()
        assert later_fds <= fds + 12, (fds, later_fds)
        assert later_threads <= threads + 4, (threads, later_threads)
    finally:
        assert server.stop() == 0, server.output


REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A real redis-server of our own on a free loopback port (Debian package), which a test
    can hang (SIGSTOP), resume, kill and start again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen([REDIS_SERVER or "redis-server", "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", str(self.directory)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(up, timeout=20, what="redis-server")
        finally:
            client.close()

    def pause(self) -> None:
        """Hang it: connections are accepted (by the kernel), nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a stopped process too
            self.proc.wait(10)
        self.proc = None


@pytest.fixture()
def redis_server(tmp_path: Path) -> Any:
    if REDIS_SERVER is None:
        pytest.skip("needs redis-server (Debian package redis-server, installed by .ci/run)")
    pytest.importorskip("redis", reason="needs the redis client (pip install redis)")
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def test_a_redis_cache_is_shared_between_servers_with_the_same_key(tmp_path: Path,
                                                                   redis_url: str) -> None:
    config = write_config(tmp_path, f"""
        [server]
        api_key_env = "TEAM_KEY"

        [cache]
        CACHE_TYPE = "RedisCache"
        CACHE_REDIS_URL = "{redis_url}"

        [models.double]
        model = "models:Doubler"
        cache = true
        """)
    one = Server("--config", str(config), env={"TEAM_KEY": "k-1"})
    two = Server("--config", str(config), env={"TEAM_KEY": "k-1"})
    other = Server("--config", str(config), env={"TEAM_KEY": "k-2"})
    body = {"x": 21}
    try:
        def ask(server: Server, key: str) -> requests.Response:
            return requests.post(f"{server.url}/v1/models/double/predict", json=body,
                                 headers={"Authorization": f"Bearer {key}"}, timeout=10)

        first = ask(one, "k-1")
        assert first.headers["X-IPCServe-Cache"] == "miss" and first.json() == 42
        shared = ask(two, "k-1")  # another server, same backend and key: computed once
        assert shared.headers["X-IPCServe-Cache"] == "hit" and shared.json() == 42
        assert served(models_of(two, {"Authorization": "Bearer k-1"})["double"]) == 0
        # A server with another API key never sees those entries.
        assert ask(other, "k-2").headers["X-IPCServe-Cache"] == "miss"
        backend = models_of(one, {"Authorization": "Bearer k-1"})["double"]["cache"]["backend"]
        assert backend == "RedisCache"
    finally:
        for server in (one, two, other):
            assert server.stop() == 0, server.output


# A backend that fails is a cache that is off, never an error: -------------------------
CACHE_TIMEOUT = 0.2
# What a request may take beyond the cache timeout on two shared, loaded cores.
LATENCY_MARGIN = 1.0


class CacheLoad:
    """Clients asking a cached model for a few inputs in a loop (mostly repeats: hits)."""

    def __init__(self, url: str, clients: int = 6) -> None:
        self.url = url
        self.answers: list[tuple[float, int, float, str | None]] = []  # sent, status, s, header
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"load-{i}")
                         for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, i: int) -> None:
        n = 0
        with requests.Session() as session:
            while not self._stop.is_set():
                n += 1
                sent = time.monotonic()
                try:
                    reply = session.post(self.url, json={"x": (i + n) % 5}, timeout=10)
                    status, header = reply.status_code, reply.headers.get("X-IPCServe-Cache")
                except requests.RequestException:  # a hung request: what must never happen
                    status, header = -1, None
                with self._lock:
                    self.answers.append((sent, status, time.monotonic() - sent, header))

    def count(self, since: float = 0.0, header: str | None = None) -> int:
        with self._lock:
            return sum(1 for sent, _, _, h in self.answers
                       if sent >= since and (header is None or h == header))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def _cached_double(tmp_path: Path, redis_url: str) -> Server:
    config = write_config(tmp_path, f"""
        [server]
        cache_timeout = {CACHE_TIMEOUT}

        [cache]
        CACHE_TYPE = "RedisCache"
        CACHE_REDIS_URL = "{redis_url}"

        [models.double]
        model = "models:Doubler"
        cache = true
        """)
    return Server("--config", str(config))


def _outage(tmp_path: Path, redis: RedisServer, stop: Any, restart: Any, error: str) -> None:
    """Load a Redis-backed cached model, ``stop`` Redis under it until 40 requests were
    answered, ``restart`` it, wait for hits again. Every request must have been answered 200
    within the cache timeout (plus a margin), and the errors counted, shown and logged."""
    server = _cached_double(tmp_path, redis.url)
    try:
        load = CacheLoad(f"{server.url}/v1/models/double/predict")
        try:
            wait_until(lambda: load.count(header="hit") >= 20, timeout=30, what="hits")
            stopped = time.monotonic()
            stop()
            wait_until(lambda: load.count(since=stopped) >= 40, timeout=30,
                       what="40 requests answered while Redis is down")
            restarted = time.monotonic()
            restart()
            wait_until(lambda: load.count(since=restarted, header="hit") >= 5, timeout=30,
                       what="hits again once Redis is back")
        finally:
            load.stop()
            if redis.proc is not None:
                redis.resume()  # a test that failed while it was hung
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        cache = models_of(server)["double"]["cache"]
    finally:
        assert server.stop() == 0, server.output
    summary = sorted({(status, header) for _, status, _, header in load.answers}, key=str)
    assert {status for _, status, _, _ in load.answers} == {200}, summary
    slowest = max(seconds for _, _, seconds, _ in load.answers)
    logger.warning("%s: %d requests, slowest %.3f s; cache %s", error, len(load.answers),
                   slowest, cache)
    assert slowest <= CACHE_TIMEOUT + LATENCY_MARGIN, slowest
    # Each request was a hit, a miss or a failed get; a failed get is not a miss.
    hits = _count(metrics, "ipcserve_cache_requests_total", model="double", result="hit")
    misses = _count(metrics, "ipcserve_cache_requests_total", model="double", result="miss")
    failed = _count(metrics, "ipcserve_cache_errors_total", model="double", op="get")
    assert failed >= 1 and hits + misses + failed == len(load.answers), (hits, misses, failed)
    assert hits == load.count(header="hit")
    # The model list says so, and that the backend works again.
    assert cache["errors"]["get"] == failed, cache
    assert cache["errors"]["set"] == _count(metrics, "ipcserve_cache_errors_total",
                                             model="double", op="set"), cache
    assert cache["failing"] is False and error in cache["last_error"]["error"], cache
    assert "the response cache (RedisCache) failed" in server.output
    assert "the response cache (RedisCache) works again" in server.output


@pytest.mark.slow
def test_a_hung_redis_costs_a_request_at_most_the_cache_timeout(tmp_path: Path,
                                                                redis_server: RedisServer) -> None:
    # SIGSTOP: Redis's port still accepts connections, nothing answers. Without a socket
    # timeout every cached request would hang with it.
    _outage(tmp_path, redis_server, redis_server.pause, redis_server.resume, "Timeout")


@pytest.mark.slow
def test_a_dead_redis_is_answered_by_the_model_and_counted_until_it_is_back(
        tmp_path: Path, redis_server: RedisServer) -> None:
    _outage(tmp_path, redis_server, redis_server.kill, redis_server.start, "ConnectionError")


def test_the_shipped_example_config_serves_its_three_models() -> None:
    example = ROOT / "examples" / "team"
    server = Server("--config", str(example / "models.toml"),
                    env={"PYTHONPATH": str(example)})
    try:
        assert sorted(models_of(server)) == ["digits", "lexicon", "words"]
        reply = requests.post(f"{server.url}/predict", json={"text": "a great, lovely day"},
                              timeout=10)
        assert reply.json() == {"label": "positive", "score": 2.0}
        assert reply.headers["X-IPCServe-Cache"] == "miss"
        assert requests.post(f"{server.url}/v1/models/words/predict", json={"text": "one two"},
                             timeout=10).json() == 2
    finally:
        assert server.stop() == 0, server.output


def _count(text: str, name: str, **labels: str) -> float:
    """A counter's sample, 0 before it was ever incremented."""
    return sample(text, name, **labels) or 0.0
