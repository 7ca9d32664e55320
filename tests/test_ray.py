"""ipcserve on Ray Serve (issue 16): a real two-node Ray cluster on this machine, two replicas
deployed through the app builder behind Serve's HTTP proxy, and faults injected into them:
an ML process killed (ipcserve restarts it), then a replica actor killed (Ray replaces it).

The cluster is shared by the module (starting it costs ~20 s of a 2-core machine) and shut
down in a finally block; the ML processes die with their replicas.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ipcserve[ray]' "
                    "(CI installs it on Python 3.11)")
pytest.importorskip("a2wsgi", reason="a2wsgi is not installed: pip install 'ipcserve[ray]'")
requests = pytest.importorskip("requests")

from conftest import free_port, wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = pathlib.Path(__file__).resolve().parent.parent
APP = "ipc"
CONFIG = """
[models.doubler]
model = "models:Doubler"
default = true
max_batch_size = 8

[models.streamer]
model = "models:Streamer"
max_inflight = 2

[models.sleeper]                   # the load of the fault test: 50 ms of work a request
model = "models:WhereSleeper"
"""


@dataclass
class Deployed:
    base: str  # the proxy's URL
    ray: Any  # the ray module, connected to the cluster


def _replica_names(ray: Any, app: str = APP) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#"))


def _running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    import ipcserve.ray

    config = tmp_path_factory.mktemp("ray") / "models.toml"
    config.write_text(CONFIG)
    # Ray's workers are processes that the raylets start with their environment: this tree
    # (not an installed ipcserve) and the test models must be first on their path.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "tests")] + ([saved] if saved else []))
    # No usage report, and no token file written into the home directory by a test. The
    # proxy would send everything to the replica on its own node while that one has room:
    # both "nodes" are this machine, and the test wants both replicas to get traffic.
    # The proxy answers a request whose replica died with ipcserve's JSON 502, as the
    # deployment guide says to configure it.
    ray_env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
               "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "ipcserve.ray:proxy_middlewares"}
    saved_env = {k: os.environ.get(k) for k in ray_env}
    os.environ.update(ray_env)
    cluster = None
    try:
        # Two nodes of one CPU each; a replica asks for a whole CPU, so there is one per node.
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 << 20})
        cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        port = free_port()
        # One proxy (both nodes are this machine: they cannot both listen on the port).
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(ipcserve.ray.app({"config": str(config), "num_replicas": "2", "num_cpus": "1",
                                    "health_check_period_s": "1"}),
                  name=APP, route_prefix="/", blocking=False)
        wait_until(lambda: _running_replicas() == 2, timeout=120, what="two RUNNING replicas")
        yield Deployed(f"http://127.0.0.1:{port}", ray)
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
            for key, value in [("PYTHONPATH", saved), *saved_env.items()]:
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _ml_pids(base: str, want: int, tries: int = 60) -> set[int]:
    """The sleeper's ML process pids seen through the proxy (its router spreads the calls)."""
    pids: set[int] = set()
    for _ in range(tries):
        r = requests.post(f"{base}/v1/models/sleeper/predict", json={}, timeout=10)
        assert r.status_code == 200, r.text
        pids.add(r.json()["pid"])
        if len(pids) >= want:
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_every_route_through_the_proxy(deployed: Deployed) -> None:
    base = deployed.base
    r = requests.post(f"{base}/v1/models/doubler/predict", json={"x": 21}, timeout=10)
    assert (r.status_code, r.json()) == (200, 42)
    assert r.headers["content-type"] == "application/json"
    assert r.headers.get("x-request-id")  # Serve's proxy adds one
    assert requests.post(f"{base}/predict", json={"x": 2}, timeout=10).json() == 4
    models = requests.get(f"{base}/v1/models", timeout=10).json()
    assert {m["id"] for m in models["data"]} == {"doubler", "streamer", "sleeper"}
    # Ray's workers (and the ML processes they start) run this tree.
    where = requests.post(f"{base}/v1/models/sleeper/predict", json={}, timeout=10).json()
    assert where["ipcserve"] == str(ROOT / "ipcserve" / "__init__.py")
    assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{base}/readyz", timeout=10).json()["ready"] is True
    metrics = requests.get(f"{base}/metrics", timeout=10)
    assert metrics.status_code == 200 and "ipcserve_requests_total" in metrics.text
    assert requests.get(f"{base}/openapi.json", timeout=10).json()["openapi"]
    assert requests.get(f"{base}/docs", timeout=10).status_code == 200
    # The Open Inference Protocol V2 and OpenAI surfaces, errors in their own shapes.
    assert requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 200
    not_tensor = requests.get(f"{base}/v2/models/doubler/ready", timeout=10)
    assert not_tensor.status_code == 404 and not_tensor.json()["error"]  # V2 is for tensor models
    chat = requests.post(f"{base}/v1/chat/completions", timeout=10, json={
        "model": "doubler", "messages": [{"role": "user", "content": "hi"}]})
    assert 400 <= chat.status_code < 500 and chat.json()["error"]["message"], chat.text
    assert "<html" in requests.get(f"{base}/", timeout=10).text.lower()
    # Errors keep their status and JSON body.
    bad = requests.post(f"{base}/predict", data=b"{not json", timeout=10,
                        headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]
    raised = requests.post(f"{base}/predict", json={"x": "raise"}, timeout=10)
    assert raised.status_code == 500 and raised.json()["model_error_type"] == "ValueError"
    missing = requests.post(f"{base}/v1/models/nope/predict", json={"x": 1}, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]
    # A crash answers its request 502 (WorkerCrashedError: not resent blindly, the input may
    # be what killed the process), and ipcserve restarts the ML process.
    crashed = requests.post(f"{base}/predict", json={"x": "exit"}, timeout=10)
    assert crashed.status_code == 502, crashed.text
    assert crashed.json()["type"] == "WorkerCrashedError"
    # Overload: 503 + Retry-After. The streamer admits 2 at once per replica; five streams of
    # 2 s each at once put at least three on one replica (whichever way Serve routes them).
    with requests.Session() as session:
        streams = [session.post(f"{base}/v1/models/streamer/predict",
                                json={"n": 8, "delay": 0.25}, stream=True, timeout=10)
                   for _ in range(5)]
        for r in streams:  # read to the end: the next check needs the streamer idle
            r.content
    shed = [r for r in streams if r.status_code == 503]
    assert shed and len(shed) <= 3 and all(r.status_code == 200 for r in streams if r not in shed)
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["type"] == "OverloadedError"
               for r in shed)
    # A stream's items arrive as they are made, not all at the end.
    with requests.post(f"{base}/v1/models/streamer/predict", json={"n": 4, "delay": 0.25},
                       stream=True, timeout=10) as stream:
        assert stream.headers["content-type"].startswith("application/x-ndjson")
        arrived = [(time.monotonic(), json.loads(line)) for line in stream.iter_lines() if line]
    assert [item["i"] for _, item in arrived] == [0, 1, 2, 3]
    assert arrived[-1][0] - arrived[0][0] > 0.5, "the proxy buffered the stream"
    with requests.post(f"{base}/v1/models/streamer/predict", json={"n": 2}, stream=True,
                       headers={"Accept": "text/event-stream"}, timeout=10) as sse:
        assert sse.headers["content-type"].startswith("text/event-stream")
        events = [line for line in sse.iter_lines() if line.startswith(b"data:")]
    assert len(events) >= 2, events
    wait_until(lambda: requests.get(f"{base}/readyz", timeout=10).status_code == 200,
               timeout=30, what="the crashed ML process restarted")


@dataclass
class Answer:
    sent: float
    done: float
    status: int  # 0: no HTTP answer (connection error)
    retry_after: str | None
    body: str


class Load:
    """Threads sending predictions of 50 ms through the proxy until stopped (bounded: 4
    threads, one request at a time each, 10 s timeout per request), so that requests are in
    flight in the ML processes whenever a fault strikes."""

    def __init__(self, base: str, threads: int = 4) -> None:
        self.base = base
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=f"load-{i}")
                        for i in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        with session:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = session.post(f"{self.base}/v1/models/sleeper/predict",
                                     json={"seconds": 0.05}, timeout=10)
                    answer = Answer(sent, time.monotonic(), r.status_code,
                                    r.headers.get("Retry-After"), r.text[:300])
                except requests.RequestException as exc:
                    answer = Answer(sent, time.monotonic(), 0, None, repr(exc))
                with self.lock:
                    self.answers.append(answer)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def wait_more(self, n: int, timeout: float = 30) -> None:
        start = self.count()
        wait_until(lambda: self.count() >= start + n, timeout=timeout, what=f"{n} more answers")


def test_killed_ml_process_then_killed_replica(deployed: Deployed) -> None:
    ray, base = deployed.ray, deployed.base
    pids = _ml_pids(base, want=2)
    assert len(pids) == 2, f"expected the ML processes of two replicas, saw {pids}"
    replicas = _replica_names(ray)
    assert len(replicas) == 2, replicas
    with Load(base) as load:
        load.wait_more(20)
        # 1. SIGKILL one replica's ML process: ipcserve answers its in-flight requests 502
        # and restarts it; the replica stays (Ray is not involved).
        ml_victim = min(pids)
        os.kill(ml_victim, signal.SIGKILL)
        ml_killed_at = time.monotonic()
        load.wait_more(20)
        wait_until(lambda: len(_ml_pids(base, want=2) - pids) >= 1, timeout=30,
                   what="a restarted ML process answering")
        assert _replica_names(ray) == replicas, "Ray replaced a replica for an ML crash"
        # 2. Kill one replica actor: Serve routes to the other and starts a new replica.
        pids = _ml_pids(base, want=2)
        victim = replicas[0]
        namespace = "serve"
        ray.kill(ray.get_actor(victim, namespace=namespace), no_restart=True)
        actor_killed_at = time.monotonic()
        # Its ML process sees its parent die and exits: no orphan.
        wait_until(lambda: any(not _alive(p) for p in pids), timeout=15,
                   what="the killed replica's ML process exiting")
        load.wait_more(20)
        wait_until(lambda: _running_replicas() == 2 and _replica_names(ray) != replicas
                   and len(_replica_names(ray)) == 2, timeout=90, what="Ray replacing the replica")
        replaced_at = time.monotonic()
        load.wait_more(20)
    answers = load.answers
    # Every request was answered, fast unless it was served.
    by_status: dict[int, int] = {}
    for a in answers:
        by_status[a.status] = by_status.get(a.status, 0) + 1
    report = (f"{len(answers)} answers {by_status}; ML killed at +0, actor killed at "
              f"+{actor_killed_at - ml_killed_at:.2f}s, replaced at +{replaced_at - ml_killed_at:.2f}s")
    odd = sorted({(a.status, a.body[:120]) for a in answers if a.status not in (200, 503)})
    report += f"; non-200/503 answers: {odd}"
    print(report)
    # Requests being computed when their process died, the ML process (ipcserve answers)
    # or the whole replica actor (Serve's proxy, through ipcserve.ray.proxy_middlewares):
    # 502 WorkerCrashedError as JSON at once, never resent (the request may be what killed
    # it). Requests arriving while the ML process restarts: 503 + Retry-After, or served.
    crashed = [a for a in answers if a.status == 502]
    for a in crashed:
        died = [t for t in (ml_killed_at, actor_killed_at) if a.sent <= t <= a.done]
        assert died and a.done - died[0] < 5, (a, report)
        assert "WorkerCrashedError" in a.body, (a, report)
    unavailable = [a for a in answers if a.status == 503]
    assert all(a.retry_after and int(a.retry_after) >= 1 for a in unavailable), report
    assert all(a.done - a.sent < 1.5 for a in unavailable), report
    assert not [a for a in answers if a.status not in (200, 502, 503)], report
    assert len(crashed) <= 8, report  # at most the 4 clients' requests, twice
    assert by_status.get(200, 0) >= 60, report


def test_open_circuit_makes_ray_replace_the_replica(deployed: Deployed) -> None:
    from ray import serve

    import ipcserve.ray

    ray, base = deployed.ray, f"{deployed.base}/fragile"
    # One crash opens the circuit, and the next restart is a minute away: only Ray can
    # bring this model back, by replacing the replica (check_health fails).
    serve.run(ipcserve.ray.app({
        "model": "models:Doubler", "circuit_breaker_threshold": "1", "restart_backoff": "60",
        "max_restart_backoff": "60", "num_replicas": "1", "num_cpus": "0",
        "health_check_period_s": "1", "name": "fragile"}),
        name="fragile", route_prefix="/fragile", blocking=False)
    try:
        wait_until(lambda: _fragile_answer(base) == 42, timeout=60, what="the fragile app")
        before = _replica_names(ray, "fragile")
        assert len(before) == 1
        crashed = requests.post(f"{base}/predict", json={"x": "exit"}, timeout=10)
        assert crashed.status_code == 502, crashed.text
        down = requests.post(f"{base}/predict", json={"x": 21}, timeout=10)
        assert down.status_code == 503 and down.headers["Retry-After"], down.text
        wait_until(lambda: _replica_names(ray, "fragile") not in ([], before)
                   and _fragile_answer(base) == 42, timeout=60,
                   what="Ray replacing the replica whose circuit is open")
    finally:
        serve.delete("fragile")


def _fragile_answer(base: str) -> Any:
    try:
        r = requests.post(f"{base}/predict", json={"x": 21}, timeout=5)
    except requests.RequestException:
        return None
    return r.json() if r.status_code == 200 else None
