"""Many models and versions on one box (issue 29), through the real ``python app.py``: lazy
models loaded on demand and evicted by the model pool, idle unloads, warm-up before ready, a
traffic split between versions with a canary, a pinned version, a shadow, an automatic
rollback, and promote / roll back through the API. Every model here runs in real ML
processes; the ML processes alive are read from ``/proc``."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import random
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import wait_until
from server import Server

from ipcserve.engine.errors import ConfigError
from ipcserve.server import config_file

pytestmark = pytest.mark.timeout(120)

KEY = "many-models-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def ml_pids(server: Server) -> set[int]:
    """The server's ML processes alive now (its spawned children; not the resource tracker)."""
    pid = server.proc.pid
    found = set()
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(int(child))
        except OSError:
            continue  # exited meanwhile
    return found


def predict(server: Server, model: str, x: Any = 1, session: Any = requests,
            headers: dict[str, str] | None = None, timeout: float = 60) -> requests.Response:
    return session.post(f"{server.url}/v1/models/{model}/predict", json={"x": x},
                        headers=headers, timeout=timeout)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus series (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def versions_of(server: Server, model: str) -> dict[str, Any]:
    answer = requests.get(f"{server.url}/v1/models/{model}/versions", headers=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    return {v["version"]: v for v in answer.json()["versions"]}


def events(server: Server, kind: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    data = requests.get(f"{server.url}/v1/events", headers=headers, timeout=10).json()["data"]
    return [e for e in data if e["kind"] == kind]


class Watch:
    """Samples the server's ML processes from /proc until stopped: the most alive at once."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.most = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watch-ml-processes")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.002):
            self.most = max(self.most, len(ml_pids(self.server)))

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(10)


# -- the model pool -------------------------------------------------------------------------
@pytest.mark.slow
def test_ten_lazy_models_never_more_than_three_loaded_under_sixteen_clients(tmp_path: Path) -> None:
    tables = "".join(f"""
        [models.m{i}]
        model = "models:Tagged"
        load = "lazy"
        timeout = 30
        """ for i in range(10))
    config = write(tmp_path, "models.toml", "[server]\nmax_loaded_models = 3\n" + tables)
    server = Server("--config", str(config))
    try:
        # Lazy models that are not loaded leave the server ready: it loads them on demand.
        assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
        assert ml_pids(server) == set()
        rng = random.Random(29)
        plan = [[f"m{rng.randrange(10)}" for _ in range(4)] for _ in range(16)]

        def client(models: list[str]) -> list[tuple[str, int, float, Any]]:
            answers = []
            with requests.Session() as session:
                for model in models:
                    began = time.monotonic()
                    answer = predict(server, model, 21, session)
                    answers.append((model, answer.status_code, time.monotonic() - began,
                                    answer.json()))
            return answers

        began = time.monotonic()
        with Watch(server) as watch, concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = [a for answers in pool.map(client, plan) for a in answers]
        elapsed = time.monotonic() - began
        assert len(results) == 64
        failed = [(m, s, b) for m, s, _, b in results if s != 200]
        assert not failed, failed
        assert all(b["y"] == 42 and b["tag"] == "a" for *_, b in results)
        assert max(seconds for _, _, seconds, _ in results) < 30  # within every deadline
        assert 1 <= watch.most <= 3, watch.most
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        loads = metric(metrics, "ipcserve_model_loads_total", reason="demand")
        evictions = metric(metrics, "ipcserve_model_unloads_total", reason="evicted")
        called = {m for m, *_ in results}
        assert loads >= len(called) > 3
        # Whatever was loaded is still loaded or was evicted: loads = loaded now + evictions.
        assert loads == metric(metrics, "ipcserve_loaded_models") + evictions
        assert metric(metrics, "ipcserve_loaded_models") <= 3
        assert len(events(server, "loaded")) == loads and len(events(server, "evicted")) == evictions
        print(f"64 requests over 10 lazy models, 3 loaded at most: {elapsed:.1f}s, "
              f"{loads:.0f} loads, {evictions:.0f} evictions, at most {watch.most} ML processes")
    finally:
        assert server.stop() == 0, server.output
    assert ml_pids(server) == set()


def test_a_lazy_load_is_shared_and_bounded_by_each_request_deadline(tmp_path: Path) -> None:
    config = write(tmp_path, "models.toml", """
        [models.lazy]
        model = "models:Tagged"
        load = "lazy"

        [models.slowload]
        model = "models:SlowLoad"
        load = "lazy"
        timeout = 0.5
        """)
    server = Server("--config", str(config))
    try:
        assert ml_pids(server) == set()
        listing = requests.get(f"{server.url}/v1/models", timeout=10).json()
        assert {m["id"]: (m["load"]["mode"], m["load"]["state"]) for m in listing["data"]} == {
            "lazy": ("lazy", "unloaded"), "slowload": ("lazy", "unloaded")}
        # Eight first requests at once: one load, every one answered by it.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: predict(server, "lazy", i), range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert len({a.json()["pid"] for a in answers}) == 1
        assert versions_of(server, "lazy")["1"]["loads"] == {"demand": 1}
        # A load longer than the deadline: 504 at the deadline, never admitted; the load goes on
        # and a later request is served by it.
        began = time.monotonic()
        late = predict(server, "slowload", 1)
        took = time.monotonic() - began
        assert late.status_code == 504, late.text
        assert late.json()["type"] == "QueueDeadlineError" and "loading" in late.json()["error"]
        assert took < 1.4, took  # the load takes 1.5 s: the answer did not wait for it
        wait_until(lambda: versions_of(server, "slowload")["1"]["state"] == "loaded", 30,
                   "the load to finish after its first request gave up")
        assert predict(server, "slowload", 2).json() == 4
        assert versions_of(server, "slowload")["1"]["loads"] == {"demand": 1}
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert metric(metrics, "ipcserve_requests_total", model="slowload", status="504") == 1
        # A reload of a lazy model reloads what is loaded (nothing left unreloaded).
        reloaded = requests.post(f"{server.url}/v1/models/lazy/reload", timeout=60).json()
        assert reloaded["versions"] == ["1"] and reloaded["revision"] == 2
        assert predict(server, "lazy", 3).json()["pid"] != answers[0].json()["pid"]
    finally:
        assert server.stop() == 0, server.output


def test_eviction_waits_for_the_requests_in_flight(tmp_path: Path) -> None:
    config = write(tmp_path, "models.toml", """
        [server]
        max_loaded_models = 1

        [models.sleeper]
        model = "models:Sleeper"
        load = "lazy"

        [models.tagged]
        model = "models:Tagged"
        load = "lazy"
        """)
    server = Server("--config", str(config))
    try:
        done: dict[str, float] = {}

        def call(model: str, body: dict[str, Any]) -> requests.Response:
            answer = requests.post(f"{server.url}/v1/models/{model}/predict", json=body,
                                   timeout=60)
            done[model if model == "tagged" else f"sleeper {body['seconds']}"] = time.monotonic()
            return answer

        def pool() -> dict[str, Any]:
            return requests.get(f"{server.url}/v1/models", timeout=10).json()["pool"]

        with Watch(server) as watch, concurrent.futures.ThreadPoolExecutor(2) as threads:
            slow = threads.submit(call, "sleeper", {"seconds": 1.0})
            wait_until(lambda: versions_of(server, "sleeper")["1"]["inflight"] == 1, 30,
                       "the sleeper's request to be in flight")
            other = threads.submit(call, "tagged", {"x": 5})  # needs the only slot
            wait_until(lambda: pool()["waiting"] == 1, 30, "the tagged model's load to wait")
            # A busy model is not evicted: it still takes requests while the load waits.
            quick = call("sleeper", {"seconds": 0})
            assert quick.status_code == 200 and "tagged" not in done
            assert slow.result(60).status_code == 200
            assert other.result(60).status_code == 200 and other.result().json()["y"] == 10
        assert quick.json()["pid"] == slow.result().json()["pid"]
        # The in-flight request was answered first, then the model was evicted.
        assert done["sleeper 1.0"] <= done["tagged"]
        assert watch.most == 1
        evicted = events(server, "evicted")
        assert [e["model"] for e in evicted] == ["sleeper"]
    finally:
        assert server.stop() == 0, server.output


def test_idle_unload_and_the_memory_budget(tmp_path: Path) -> None:
    # 1 MB holds no ML process: each load evicts whatever else is loaded (a model larger
    # than the whole budget still loads when nothing else is).
    config = write(tmp_path, "models.toml", """
        [server]
        max_loaded_memory = "1MB"

        [models.a]
        model = "models:Tagged"
        load = "lazy"

        [models.b]
        model = "models:TaggedB"
        load = "lazy"

        [models.idle]
        model = "models:Tagged"
        load = "lazy"
        idle_unload = 0.5
        """)
    server = Server("--config", str(config))
    try:
        with Watch(server) as watch:
            for model in ("a", "b", "a", "b"):
                assert predict(server, model).status_code == 200
        assert watch.most == 1
        assert versions_of(server, "a")["1"]["loads"] == {"demand": 2}
        assert versions_of(server, "a")["1"]["unloads"] == {"evicted": 2}
        assert versions_of(server, "b")["1"]["unloads"] == {"evicted": 1}
        pid = predict(server, "idle").json()["pid"]
        wait_until(lambda: versions_of(server, "idle")["1"]["unloads"] == {"idle": 1}, 10,
                   "the idle model to be unloaded")
        assert not Path(f"/proc/{pid}").exists() or pid not in ml_pids(server)
        assert ml_pids(server) == set()
        listing = {m["id"]: m for m in requests.get(f"{server.url}/v1/models", timeout=10).json()["data"]}
        assert listing["idle"]["load"]["unloaded_by"] == "idle"
        assert listing["a"]["load"]["unloaded_by"] == "evicted"
        unloaded = events(server, "unloaded")
        assert [e["model"] for e in unloaded] == ["idle"] and "0.5s" in unloaded[0]["message"]
        assert predict(server, "idle").status_code == 200  # loaded again on demand
        assert versions_of(server, "idle")["1"]["loads"] == {"demand": 2}
    finally:
        assert server.stop() == 0, server.output


# -- warm-up ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_warm_up_makes_the_first_request_as_fast_as_the_hundredth(tmp_path: Path) -> None:
    write(tmp_path, "warm.jsonl", '{"x": 1}\n\n{"x": 2}\n')
    config = write(tmp_path, "models.toml", """
        [models.cold]
        model = "models:SlowFirstCall"

        [models.warm]
        model = "models:SlowFirstCall"
        warmup = "warm.jsonl"

        [models.coded]
        model = "models:WarmInCode"
        """)
    server = Server("--config", str(config), wait_ready=False)
    try:
        # Readiness waits for the warm-up (2 s in every ML process).
        assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 503
        server.wait_ready(60)

        def timed(model: str) -> float:
            began = time.monotonic()
            assert predict(server, model, 3, session).json()["y"] == 6
            return time.monotonic() - began

        with requests.Session() as session:
            for model in ("warm", "coded"):
                first = timed(model)
                hundredth = [timed(model) for _ in range(99)][-1]
                print(f"{model}: first request {first * 1000:.1f} ms, hundredth "
                      f"{hundredth * 1000:.1f} ms")
                assert first < max(0.25, 5 * hundredth), (model, first, hundredth)
            cold = timed("cold")  # the control: no warm-up, the first call pays
            assert cold >= 2.0, cold
    finally:
        assert server.stop() == 0, server.output


# -- versions ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def versioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = write(tmp_path_factory.mktemp("versions"), "models.toml", """
        [server]
        api_key_env = "MANY_MODELS_KEY"

        [models.canary]                  # 10 % to v2
        stable = "v1"
        [models.canary.versions.v1]
        model = "models:Tagged"
        [models.canary.versions.v2]
        model = "models:TaggedB"
        weight = 10

        [models.flaky]                   # v2 fails every other request
        stable = "v1"
        rollback_error_rate = 0.2
        rollback_window = 30
        rollback_min_requests = 10
        [models.flaky.versions.v1]
        model = "models:PidlessTagged"
        [models.flaky.versions.v2]
        model = "models:FailsHalf"
        weight = 20

        [models.shadowed]                # v3 gets copies; it disagrees on odd inputs
        stable = "v1"
        shadow = "v3"
        [models.shadowed.versions.v1]
        model = "models:PidlessTagged"
        [models.shadowed.versions.v3]
        model = "models:ShadowTagged"

        [models.managed]                 # v2 on standby: promoted through the API
        stable = "v1"
        [models.managed.versions.v1]
        model = "models:Tagged"
        [models.managed.versions.v2]
        model = "models:TaggedB"

        [models.lazy]
        model = "models:Tagged"
        load = "lazy"
        """)
    server = Server("--config", str(config), env={"MANY_MODELS_KEY": KEY})
    try:
        yield server
    finally:
        assert server.stop() == 0, server.output


@pytest.mark.slow
def test_a_ten_percent_canary_serves_ten_percent_and_a_header_pins_a_version(versioned: Server) -> None:
    host, port = versioned.url.removeprefix("http://").split(":")

    def batch(count: int) -> list[tuple[str, str]]:
        # http.client on one keep-alive connection: the client's own cost stays small next
        # to the server's, so 2,000 requests take seconds on two cores.
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {**AUTH, "Content-Type": "application/json"}
        out = []
        try:
            for i in range(count):
                conn.request("POST", "/v1/models/canary/predict", json.dumps({"x": i}), headers)
                answer = conn.getresponse()
                body = answer.read()
                assert answer.status == 200, body
                out.append((answer.headers["X-IPCServe-Version"], json.loads(body)["tag"]))
        finally:
            conn.close()
        return out

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = [a for part in pool.map(batch, [500] * 4) for a in part]
    assert len(answers) == 2000
    # The answer's header names the version that computed it.
    assert all((label, tag) in (("v1", "a"), ("v2", "b")) for label, tag in answers)
    canary = sum(label == "v2" for label, _ in answers)
    print(f"canary share over 2000 requests: {canary / 20:.1f} %")
    assert 180 <= canary <= 220, canary  # 10 % ± 2 %
    # A tester pins a version, whatever its weight; an unknown one is a 400 naming the header.
    for label, tag in (("v2", "b"), ("v1", "a")):
        pinned = predict(versioned, "canary", 1, headers={**AUTH, "X-IPCServe-Version": label})
        assert pinned.json()["tag"] == tag and pinned.headers["X-IPCServe-Version"] == label
    wrong = predict(versioned, "canary", 1, headers={**AUTH, "X-IPCServe-Version": "v9"})
    assert wrong.status_code == 400 and "X-IPCServe-Version" in wrong.json()["error"]
    # Per-version metrics and history.
    metrics = requests.get(f"{versioned.url}/metrics", headers=AUTH, timeout=10).text
    assert metric(metrics, "ipcserve_version_requests_total", model="canary", version="v2",
                  status="200") == canary + 1
    assert metric(metrics, "ipcserve_version_share", model="canary", version="v2") == 10
    history = requests.get(f"{versioned.url}/v1/history", headers=AUTH, timeout=10).json()
    series = history["models"]["canary@v2"]["requests"]["200"]
    assert sum(series) == canary + 1


def test_a_canary_failing_half_its_requests_is_rolled_back_within_the_window(versioned: Server) -> None:
    statuses: list[tuple[int, str]] = []
    with requests.Session() as session:
        session.headers.update(AUTH)
        while not events(versioned, "rolled-back", AUTH) and len(statuses) < 400:
            for i in range(10):
                answer = predict(versioned, "flaky", i, session)
                statuses.append((answer.status_code, answer.headers["X-IPCServe-Version"]))
        rolled = events(versioned, "rolled-back", AUTH)
        assert [(e["model"], e["version"], e["reason"]) for e in rolled] == [("flaky", "v2", "auto")]
        # 10 canary requests (1 in 5), 5 of them failed: past 20 % after the 10th of them,
        # long before the 30 s window ends; every request after that one went to v1.
        canary = [i for i, (_, label) in enumerate(statuses) if label == "v2"]
        assert len(canary) == 10, statuses
        assert [statuses[i][0] for i in canary] == [500, 200] * 5
        assert all(status == 200 and label == "v1" for status, label in statuses[canary[-1] + 1:])
        after = [predict(versioned, "flaky", i, session) for i in range(300)]
    assert [a.status_code for a in after] == [200] * 300  # 0 failed requests after the rollback
    assert {a.headers["X-IPCServe-Version"] for a in after} == {"v1"}
    assert versions_of(versioned, "flaky")["v2"]["weight"] == 0
    metrics = requests.get(f"{versioned.url}/metrics", headers=AUTH, timeout=10).text
    assert metric(metrics, "ipcserve_rollbacks_total", model="flaky", version="v2", reason="auto") == 1


def test_shadow_answers_are_compared_and_never_reach_a_client(versioned: Server) -> None:
    with requests.Session() as session:
        session.headers.update(AUTH)
        answers = [predict(versioned, "shadowed", i, session) for i in range(100)]
    assert [a.status_code for a in answers] == [200] * 100
    assert [a.json() for a in answers] == [{"y": 2 * i, "tag": "a"} for i in range(100)]
    assert {a.headers["X-IPCServe-Version"] for a in answers} == {"v1"}
    wait_until(lambda: sum(versions_of(versioned, "shadowed")["v3"]["shadow_results"].values()) == 100,
               30, "the shadow to compare every copy")
    assert versions_of(versioned, "shadowed")["v3"]["shadow_results"] == {"agree": 50, "disagree": 50}
    metrics = requests.get(f"{versioned.url}/metrics", headers=AUTH, timeout=10).text
    assert metric(metrics, "ipcserve_shadow_results_total", model="shadowed", version="v3",
                  result="disagree") == 50
    assert "the shadow version v3 answered differently" in versioned.output


def test_promote_weight_and_roll_back_through_the_api_need_the_key(versioned: Server) -> None:
    url = f"{versioned.url}/v1/models/managed/versions"
    assert requests.post(f"{url}/v2/promote", timeout=10).status_code == 401
    promoted = requests.post(f"{url}/v2/promote", headers=AUTH, timeout=10)
    assert promoted.status_code == 200 and promoted.json()["stable"] == "v2"
    tags = [predict(versioned, "managed", i, headers=AUTH).json()["tag"] for i in range(10)]
    assert tags == ["b"] * 10
    # The old stable version as a 50 % canary, then rolled back.
    weighted = requests.post(f"{url}/v1/weight", json={"weight": 50}, headers=AUTH, timeout=10)
    assert weighted.status_code == 200, weighted.text
    tags = [predict(versioned, "managed", i, headers=AUTH).json()["tag"] for i in range(10)]
    assert sorted(tags) == ["a"] * 5 + ["b"] * 5
    assert requests.post(f"{url}/v1/weight", json={"weight": 150}, headers=AUTH,
                         timeout=10).status_code == 400
    assert requests.post(f"{url}/v2/weight", json={"weight": 5}, headers=AUTH,
                         timeout=10).status_code == 409  # v2 is the stable one now
    rolled = requests.post(f"{url}/rollback", headers=AUTH, timeout=10)
    assert rolled.status_code == 200
    assert {v["version"]: v["share"] for v in rolled.json()["versions"]} == {"v1": 0, "v2": 100}
    tags = [predict(versioned, "managed", i, headers=AUTH).json()["tag"] for i in range(10)]
    assert tags == ["b"] * 10
    kinds = [e["kind"] for e in requests.get(f"{versioned.url}/v1/events", headers=AUTH,
                                             timeout=10).json()["data"] if e["model"] == "managed"]
    assert kinds[:3] == ["rolled-back", "weight-changed", "promoted"]


@pytest.mark.slow
@pytest.mark.browser
def test_the_status_page_shows_load_state_and_versions_with_weights(versioned: Server,
                                                                    tmp_path: Path) -> None:
    import chromium

    chromium.skip_unless_available()
    from chromium import text, wait_for

    with chromium.browser(tmp_path) as driver:
        driver.get(f"{versioned.url}/")
        driver.execute_script(f"document.getElementById('api-key').value = '{KEY}';")
        wait_for(driver, lambda d: text(d, '#models tr[data-model="canary"] .versions')
                 == "v1 90 % · v2 10 % canary", "the canary's versions with their shares")
        assert text(driver, '#models tr[data-model="shadowed"] .versions') == "v1 100 % · v3 shadow"
        assert text(driver, '#models tr[data-model="canary"] .state') == "ready"
        assert text(driver, '#models tr[data-model="canary"] .load') == "at start"
        assert text(driver, '#models tr[data-model="lazy"] .load') == "lazy"
        assert text(driver, '#models tr[data-model="lazy"] .state') == "not loaded"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_schemathesis_finds_nothing_wrong_with_the_versions_routes(tmp_path: Path) -> None:
    # test_openapi.py fuzzes a server whose models have no versions, where promote and
    # weight have no documented path; here they do (the same checks, these routes only).
    import os
    import subprocess
    import sys

    from test_openapi import SCHEMATHESIS_CONFIG

    runner = os.environ.get("IPCSERVE_SCHEMATHESIS_PYTHON") or sys.executable
    if runner == sys.executable:
        pytest.importorskip("schemathesis", reason="schemathesis has no wheel for this Python")
    config = write(tmp_path, "models.toml", """
        [models.canary]
        stable = "v1"
        [models.canary.versions.v1]
        model = "models:Tagged"
        [models.canary.versions.v2]
        model = "models:TaggedB"
        weight = 10
        [models.canary.versions.v3]
        model = "models:PidlessTagged"

        [models.lazy]
        model = "models:Tagged"
        load = "lazy"
        """)
    server = Server("--config", str(config))
    try:
        (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
        run = subprocess.run(
            [runner, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
             "--config-file", str(tmp_path / "schemathesis.toml"), "run",
             server.url + "/openapi.json", "--phases", "examples,coverage,fuzzing",
             "--max-examples", "60", "--workers", "1", "--seed", "1",
             "--suppress-health-check", "all", "--output-sanitize", "false",
             "--request-timeout", "30",
             "--include-path-regex", "/versions|^/v1/models/lazy(/reload)?$|^/v1/models$"],
            cwd=tmp_path, capture_output=True, text=True, timeout=240)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-20000:]
        assert "Tested: 15" in output, output[-5000:]
    finally:
        assert server.stop() == 0, server.output


# -- the config file --------------------------------------------------------------------------
@pytest.mark.parametrize("body, message", [
    ("""[models.m]\nstable = "v1"\n[models.m.versions.v1]\nmodel = "models:Tagged"\n
        [models.m.versions.v2]\nmodel = "models:TaggedB"\nweight = 120\n""",
     "[models.m.versions.v2] weight: must be a percentage from 0 to 100"),
    ("""[models.m.versions.v1]\nmodel = "models:Tagged"\n[models.m.versions.v2]\n
        model = "models:TaggedB"\n""", "[models.m] stable: required with several versions"),
    ("""[models.m]\nstable = "v1"\n[models.m.versions.v1]\nmodel = "models:Tagged"\nweight = 5\n""",
     "[models.m.versions.v1] weight: the stable version has no weight"),
    ("""[models.m]\nstable = "v1"\nshadow = "v2"\n[models.m.versions.v1]\nmodel = "models:Tagged"\n
        [models.m.versions.v2]\nmodel = "models:TaggedB"\nweight = 5\n""",
     "[models.m.versions.v2] weight: the shadow version has no weight"),
    ("""[models.m]\nstable = "v3"\n[models.m.versions.v1]\nmodel = "models:Tagged"\n""",
     "[models.m] stable: no version 'v3'"),
    ("""[models.m]\nmodel = "models:Tagged"\nstable = "v1"\n""",
     "[models.m] stable: names a version"),
    ("""[models.m]\nmodel = "models:Tagged"\nload = "later"\n""", "[models.m] load: must be"),
    ("""[models.m]\nmodel = "models:Tagged"\nidle_unload = 0\n""", "[models.m] idle_unload: must"),
    ("""[models.m]\nmodel = "models:Tagged"\nrollback_error_rate = 2\n""",
     "[models.m]: rollback_error_rate must be a number from 0 to 1"),
    ("""[models.m]\nmodel = "models:Tagged"\nwarmup = "bad.jsonl"\n""",
     "[models.m] warmup: "),
    ("""[models.m]\ncache = true\nstable = "v1"\n[models.m.versions.v1]\nmodel = "models:Tagged"\n""",
     "[models.m] cache: a model with versions has no response cache"),
    ("""[server]\nmax_loaded_models = 0\n[models.m]\nmodel = "models:Tagged"\n""",
     "[server] max_loaded_models: must be an integer >= 1, or none"),
    ("""[server]\nmax_loaded_memory = "lots"\n[models.m]\nmodel = "models:Tagged"\n""",
     "[server] max_loaded_memory: must be a number of bytes such as 2GiB"),
])
def test_the_config_file_names_the_table_and_key_of_a_mistake(tmp_path: Path, body: str,
                                                                message: str) -> None:
    write(tmp_path, "bad.jsonl", '{"x": 1}\n[1, 2]\n')
    path = write(tmp_path, "models.toml", body)
    with pytest.raises(ConfigError) as info:
        config_file.load(str(path), environ={})
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert message in str(info.value), str(info.value)


def test_the_config_file_reads_versions_warm_up_and_the_pool(tmp_path: Path) -> None:
    write(tmp_path, "examples.jsonl", '{"x": 1}\n{"x": 2, "y": [1, 2]}\n')
    path = write(tmp_path, "models.toml", """
        [server]
        max_loaded_models = 4
        max_loaded_memory = "2GiB"

        [models.m]
        stable = "v1"
        shadow = "v3"
        load = "lazy"
        idle_unload = 300
        warmup = "examples.jsonl"
        timeout = 5
        rollback_window = 120
        [models.m.versions.v1]
        model = "models:Tagged"
        [models.m.versions.v2]
        model = "models:TaggedB"
        weight = 10
        max_batch_size = 4
        [models.m.versions.v3]
        model = "models:ShadowTagged"
        """)
    plan = config_file.load(str(path), environ={})
    assert plan.server == {"max_loaded_models": 4, "max_loaded_memory": 2 * 1024 ** 3}
    (entry,) = plan.models
    assert (entry.lazy, entry.idle_unload, entry.shadow, entry.rollback.window) == (
        True, 300.0, "v3", 120.0)
    assert [(v.name, v.weight) for v in entry.versions] == [("v1", 0), ("v2", 10), ("v3", 0)]
    assert entry.versions[1].engine == {"timeout": 5.0, "max_batch_size": 4}
    assert entry.versions[2].warmup == ({"x": 1}, {"x": 2, "y": [1, 2]})


def test_the_example_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    plan = config_file.load(str(root / "examples" / "many" / "models.toml"), environ={})
    models = {m.name: m for m in plan.models}
    assert [m for m, e in models.items() if e.lazy] == ["acme", "globex", "initech", "umbrella"]
    ranker = models["ranker"]
    assert [(v.name, v.weight) for v in ranker.versions] == [("v1", 0), ("v2", 10), ("v3", 0)]
    assert ranker.shadow == "v3" and len(ranker.versions[1].warmup) == 2
