"""The HTTP servers the benchmark compares, one per process.

``python benchmarks/servers.py APP MODEL PORT`` prints ``READY`` once it serves
``POST /predict`` on 127.0.0.1:PORT. MODEL is ``echo`` (returns the body), ``mlp`` (the
matmul MLP of models.py) or ``minilm`` (all-MiniLM-L6-v2 sentence embeddings). APP is:

- ``naive``: the recipe ipcserve replaces: a global model in the Flask process behind a
  lock, on waitress (8 threads);
- ``fastapi``: FastAPI + uvicorn, a global model behind a lock (a sync endpoint: FastAPI
  runs it in its thread pool);
- ``litserve``: LitServe with batching (32 items, 5 ms batch timeout), its own
  inference worker process;
- ``ipcserve``: ``ipcserve serve``'s app and server settings with ``--max-batch-size 32``;
- ``ipcserve-wait``: the same with ``max_batch_wait=0.005``;
- ``flask-call`` (echo only, for breakdown.py): the naive handler calling the model
  through ``MLProcess.call``, without ipcserve's HTTP layer.

Every server runs its model with one torch thread: the benchmark pins each server to one
core (``taskset``), so the comparison is per core.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def load_single(model: str) -> Callable[[dict[str, Any]], Any]:
    """The model as a plain function of one request body (naive, FastAPI)."""
    if model == "echo":
        return lambda body: body
    import torch

    torch.set_num_threads(1)
    if model == "mlp":
        from models import make_mlp

        net = make_mlp()

        def run(body: dict[str, Any]) -> Any:
            with torch.inference_mode():
                return net(torch.tensor([body["x"]], dtype=torch.float32))[0].tolist()
        return run
    from ipcserve.adapters.hf import TransformersModel

    from models import minilm_path

    tm = TransformersModel(minilm_path(), task="feature-extraction", normalize=True)
    tm.load()
    return lambda body: tm.predict_batch([body["text"]])[0]


def naive_app(model: str) -> Any:
    from flask import Flask, jsonify, request

    app = Flask("naive")
    lock = threading.Lock()
    run = load_single(model)

    @app.post("/predict")
    def predict() -> Any:
        body = request.get_json()
        with lock:
            return jsonify(run(body))

    return app


def flask_call_app(model: str) -> Any:
    """For the breakdown only: the naive Flask handler, but the model behind
    ``MLProcess.call`` (no ipcserve extension): ipcserve minus its HTTP layer."""
    from flask import Flask, jsonify, request

    from models import Echo

    assert model == "echo", "flask-call serves the echo model only"
    ml = Echo(name="echo", max_batch_size=32)
    ml.start()
    app = Flask("flask-call")

    @app.post("/predict")
    def predict() -> Any:
        return jsonify(ml.call((), request.get_json()).value)

    return app


def serve_fastapi(model: str, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI, Request

    app = FastAPI()
    lock = threading.Lock()
    run = load_single(model)

    @app.post("/predict")
    def predict(body: dict[str, Any]) -> Any:  # sync: FastAPI runs it in its thread pool
        with lock:
            return run(body)

    del Request
    print("READY", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_litserve(model: str, port: int) -> None:
    import litserve as ls

    from lit_api import BenchAPI

    api = BenchAPI(model, max_batch_size=32, batch_timeout=0.005, api_path="/predict")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    print("READY", flush=True)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False,
               num_api_servers=1)


def ipcserve_app(model: str, batch_wait: float = 0.0) -> Any:
    from ipcserve.server.cli import create_app
    from ipcserve.flask import IPCServe

    # max_inflight above the benchmark's 64 connections: wrk reconnects at once when it
    # closes a connection, and the request it left may still hold its place for a moment.
    settings: dict[str, Any] = dict(max_batch_size=32, max_batch_wait=batch_wait,
                                    max_inflight=128)
    # Placement (benchmarks/cpus.py): the ML process's CPUs and niceness, as --cpus / --nice.
    if os.environ.get("BENCH_ML_CPUS"):
        settings["cpus"] = os.environ["BENCH_ML_CPUS"]
    if os.environ.get("BENCH_ML_NICE"):
        settings["nice"] = int(os.environ["BENCH_ML_NICE"])
    if model == "echo":
        from models import Echo

        ml: Any = Echo(name="echo", **settings)
    elif model == "mlp":
        from models import MLP

        ml = MLP(name="mlp", **settings)
    else:
        from ipcserve.adapters.hf import TransformersModel

        from models import minilm_path

        ml = TransformersModel(minilm_path(), task="feature-extraction", normalize=True,
                               name="minilm", **settings)
    app = create_app([(ml, "json")])
    IPCServe.of(app).start()
    return app


def serve_waitress(app: Any, port: int) -> None:
    import logging

    import waitress

    # waitress logs a warning per queued task under load; it would drown the report.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=8, backlog=2048,
                                    connection_limit=1000)
    print("READY", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass


def serve_ipcserve(model: str, port: int, batch_wait: float) -> None:
    """The app ``ipcserve serve`` builds, on the server ``ipcserve serve`` configures."""
    from ipcserve.flask import IPCServe
    from ipcserve.server.waitress_conf import create_server

    app = ipcserve_app(model, batch_wait)
    server = create_server(app, host="127.0.0.1", port=port)
    print("READY", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        IPCServe.of(app).drain(grace=1)


def main() -> None:
    kind, model, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "naive":
        serve_waitress(naive_app(model), port)
    elif kind == "flask-call":
        serve_waitress(flask_call_app(model), port)
    elif kind == "fastapi":
        serve_fastapi(model, port)
    elif kind == "litserve":
        serve_litserve(model, port)
    elif kind == "ipcserve":
        serve_ipcserve(model, port, 0.0)
    elif kind == "ipcserve-wait":
        serve_ipcserve(model, port, 0.005)
    else:
        raise SystemExit(f"unknown server {kind!r}")


if __name__ == "__main__":
    main()
