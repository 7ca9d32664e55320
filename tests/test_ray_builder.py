"""ipcserve.ray without a cluster: the app builder's arguments and errors, the lazy import,
and the replica class's health, autoscaling and shutdown hooks on a real ML process."""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
import sys
from typing import Any

import pytest
from conftest import wait_until

from ipcserve import ConfigError
from ipcserve.flask import IPCServe
from ipcserve.ray import IPCServeReplica, parse_args


def test_builder_args_split_into_serve_options_and_ipcserve_settings() -> None:
    options, settings = parse_args({
        "model": "models:Doubler", "num_replicas": "2", "max_batch_size": "8",
        "max_batch_wait": "0.005", "num_cpus": "0.5", "num_gpus": "1", "api_key": "k",
        "devices": "cuda:0", "health_check_period_s": "2"})
    assert options == {"num_replicas": 2, "health_check_period_s": 2.0,
                       "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1.0},
                       # Serve queues (and routes elsewhere) what one replica would shed.
                       "max_ongoing_requests": 64}
    assert settings == {"model": ["models:Doubler"], "max_batch_size": 8,
                        "max_batch_wait": 0.005, "api_key": "k", "devices": ("cuda:0",)}


def test_builder_autoscaling_and_max_ongoing_requests() -> None:
    options, settings = parse_args({"config": "team.toml", "min_replicas": "1",
                                    "max_replicas": "4", "target_ongoing_requests": "8",
                                    "max_inflight": "16"})
    assert options == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                              "target_ongoing_requests": 8.0},
                       "max_ongoing_requests": 16}
    assert settings == {"config": "team.toml", "max_inflight": 16}
    options, _ = parse_args({"num_replicas": "auto", "max_ongoing_requests": "5"})
    assert options == {"num_replicas": "auto", "max_ongoing_requests": 5}


@pytest.mark.parametrize("args, message", [
    ({"num_replicas": "two"}, "num_replicas must be an integer >= 1 or 'auto', got 'two'"),
    ({"num_replicas": "0"}, "num_replicas must be an integer >= 1 or 'auto', got '0'"),
    ({"num_cpus": "-1"}, "num_cpus must be a number >= 0, got '-1'"),
    ({"max_batch_size": "eight"}, "max_batch_size must be int, got 'eight'"),
    ({"max_batch_size": "0"}, "max_batch_size must be an integer >= 1, got 0"),
    ({"start_method": "thread"}, "start_method must be one of spawn, forkserver, fork"),
    ({"require_api_key": "maybe"}, "require_api_key must be"),
    ({"hang_timeout": "0.1", "heartbeat_interval": "0.5"}, "heartbeat_interval (0.5) must be below"),
    ({"port": "8000"}, "port is a setting of the waitress server"),
    ({"host": "0.0.0.0"}, "host is a setting of the waitress server"),
    ({"max_batch_sise": "8"},
     "unknown setting 'max_batch_sise'; did you mean 'max_batch_size'? known: access_log, "
     "access_log_bodies, api_key,"),
    ({"num_replicas": "2", "max_replicas": "4"}, "max_replicas configure autoscaling; leave out"),
])
def test_builder_errors_name_the_key(args: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(args)
    assert message in str(info.value)
    assert "IPCSERVE_" not in str(info.value)  # the key as the user wrote it


def test_import_does_not_import_ray_or_flask() -> None:
    code = ("import sys, ipcserve, ipcserve.ray\n"
            "ipcserve.ray.parse_args({'model': 'digits', 'num_replicas': '2'})\n"
            "print(sorted(m for m in ('ray', 'a2wsgi', 'flask') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_deployment_and_app_without_a_cluster() -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install "
                        "'ipcserve[ray]' (CI installs it on Python 3.11)")
    from ray import serve

    import ipcserve.ray

    deployment = ipcserve.ray.deployment(num_replicas=3)
    assert isinstance(deployment, serve.Deployment)
    assert (deployment.name, deployment.num_replicas) == ("ipcserve", 3)
    application = ipcserve.ray.app({"model": "models:Doubler", "num_replicas": "2"})
    assert isinstance(application, serve.Application)
    with pytest.raises(ConfigError, match="unknown setting 'modle'"):
        ipcserve.ray.app({"modle": "models:Doubler"})


@pytest.mark.timeout(60)
def test_replica_health_autoscaling_stats_and_shutdown() -> None:
    # The replica class on its own (Serve calls these hooks): a real ML process.
    replica = IPCServeReplica(model="models:Doubler", circuit_breaker_threshold="1",
                              restart_backoff="30", max_restart_backoff="30")
    try:
        replica.check_health()  # healthy
        assert replica.record_autoscaling_stats() == {"ipcserve_inflight": 0.0}
        client: Any = replica.flask_app.test_client()
        assert client.post("/predict", json={"x": 4}).get_json() == 8
        # One crash opens the circuit (threshold 1) and the restart is 30 s away: the
        # replica reports itself unhealthy so that Ray replaces it.
        assert client.post("/predict", json={"x": "exit"}).status_code == 502
        wait_until(lambda: IPCServe.of(replica.flask_app).endpoints[
            "doubler"].ml.status.get("circuit_open"), timeout=10, what="the circuit opening")
        with pytest.raises(RuntimeError, match="circuit breaker is open; replace this replica"):
            replica.check_health()
    finally:
        asyncio.run(replica.shutdown())  # Serve's shutdown hook: drains, stops the ML process
    assert IPCServe.of(replica.flask_app).draining.is_set()


@pytest.mark.timeout(60)
def test_replica_health_agrees_with_readyz_during_a_drain_delay() -> None:
    import threading

    replica = IPCServeReplica(model="digits")
    ext = IPCServe.of(replica.flask_app)
    client: Any = replica.flask_app.test_client()
    drain = threading.Thread(target=ext.drain, kwargs={"grace": 5, "delay": 30})
    try:
        replica.check_health()
        assert client.get("/readyz").status_code == 200
        drain.start()  # /readyz turns 503 at once; requests are still served for 30 s
        wait_until(ext.unready.is_set, what="the drain to begin")
        probes = [client.get(p).status_code for p in ("/readyz", "/v2/health/ready",
                                                      "/v2/models/digits/ready")]
        assert probes == [503, 503, 503]
        with pytest.raises(RuntimeError, match="draining"):
            replica.check_health()
        assert client.post("/predict", json={"pixels": [0.0] * 64}).status_code == 200
    finally:
        ext.drain(grace=0)  # cuts the delay short
        if drain.ident is not None:
            drain.join(10)
        asyncio.run(replica.shutdown())


def test_the_serve_config_example_is_valid() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with ray[serve] and kubernetes-validate")
    path = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "ray" / "serve.yaml"
    config = yaml.safe_load(path.read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "ipcserve.ray:app"
    options, settings = parse_args(application["args"])
    assert options["num_replicas"] == 2 and settings["model"] == ["digits"]
    schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve is not installed")
    schema.ServeDeploySchema.model_validate(config)  # what `serve deploy` checks first


@pytest.mark.timeout(60)
def test_replica_whose_model_fails_to_load_leaves_no_ml_process(tmp_path: pathlib.Path) -> None:
    import multiprocessing

    from ipcserve import IPCServeError

    config = tmp_path / "models.toml"
    config.write_text('[models.good]\nmodel = "models:Doubler"\n\n'
                      '[models.bad]\nmodel = "models:FailsToLoad"\n')
    with pytest.raises(IPCServeError, match="failed to load"):
        IPCServeReplica(config=str(config))
    # The model that did load is stopped with the replica's constructor, not left running
    # until Ray kills the actor.
    assert multiprocessing.active_children() == []


def _through_middleware(inner: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """The ASGI messages ReplicaLostAsJSON sends for one request to ``inner``."""
    from ipcserve.ray import ReplicaLostAsJSON

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(ReplicaLostAsJSON(inner)(scope, receive, send))
    return sent


def test_a_request_whose_replica_died_is_a_json_502_and_answers_pass_untouched() -> None:
    import json

    async def replica_died(scope: Any, receive: Any, send: Any) -> None:
        return None  # what Serve's proxy does when the replica actor dies mid-request

    sent = _through_middleware(replica_died, {"type": "http", "path": "/predict"})
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 502
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body["type"] == "WorkerCrashedError" and "replica" in body["error"], body

    async def answered(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": b"busy"})

    sent = _through_middleware(answered, {"type": "http", "path": "/predict"})
    assert [(m.get("status"), m.get("body")) for m in sent] == [(503, None), (None, b"busy")]
    assert _through_middleware(replica_died, {"type": "lifespan"}) == []

    # The replica died after its answer's headers, before the body (seen in test_ray's
    # cluster test as a client's IncompleteRead): the headers were held, the client gets
    # the 502 instead of a broken response.
    async def died_after_the_start(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"68")]})

    sent = _through_middleware(died_after_the_start, {"type": "http", "path": "/predict"})
    assert [m.get("status") for m in sent] == [502, None], sent
    assert json.loads(sent[1]["body"])["type"] == "WorkerCrashedError"


def test_proxy_middlewares_are_starlette_middlewares() -> None:
    pytest.importorskip("starlette",
                        reason="Serve's proxy middlewares need starlette (ipcserve[ray])")
    from starlette.middleware import Middleware

    from ipcserve.ray import ReplicaLostAsJSON, proxy_middlewares

    (middleware,) = proxy_middlewares()
    assert isinstance(middleware, Middleware) and middleware.cls is ReplicaLostAsJSON
