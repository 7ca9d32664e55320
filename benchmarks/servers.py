"""The HTTP servers the benchmark compares, one per process.

``python benchmarks/servers.py APP MODEL PORT`` where APP is ``ipcserve`` (the model in an
ML process) or ``naive`` (the recipe ipcserve replaces: a global model in the Flask
process behind a lock), MODEL is ``echo``, ``mlp`` or ``minilm``. Prints ``READY`` when
it serves.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def naive_app(model: str) -> Any:
    from flask import Flask, jsonify, request

    app = Flask("naive")
    lock = threading.Lock()
    if model == "echo":
        def run(body: dict) -> Any:
            return body
    elif model == "mlp":
        import torch

        from models import make_mlp

        net = make_mlp()

        def run(body: dict) -> Any:
            with torch.inference_mode():
                return net(torch.tensor([body["x"]], dtype=torch.float32))[0].tolist()
    else:
        from ipcserve.adapters.hf import TransformersModel

        from models import minilm_path

        tm = TransformersModel(minilm_path(), task="feature-extraction", normalize=True)
        tm.load()

        def run(body: dict) -> Any:
            return tm.predict_batch([body["text"]])[0]

    @app.post("/predict")
    def predict() -> Any:
        body = request.get_json()
        with lock:
            return jsonify(run(body))

    return app


def ipcserve_app(model: str, workers: int = 1) -> Any:
    from ipcserve.cli import create_app
    from ipcserve.flask import IPCServe

    if model == "echo":
        from models import Echo

        ml: Any = Echo(name="echo", workers=workers)
    elif model == "mlp":
        from models import MLP

        ml = MLP(name="mlp", workers=workers, max_batch_size=32)
    else:
        from ipcserve.adapters.hf import TransformersModel

        from models import minilm_path

        ml = TransformersModel(minilm_path(), task="feature-extraction", normalize=True,
                               name="minilm", workers=workers, max_batch_size=32)
    app = create_app([(ml, "json")])
    IPCServe.of(app).start()
    return app


def main() -> None:
    import logging

    import waitress

    # waitress logs a warning per queued task under load; it would drown the report.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    kind, model, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if kind == "naive":
        import torch

        torch.set_num_threads(1)
        app = naive_app(model)
    else:
        app = ipcserve_app(model)
    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=8, backlog=2048,
                                    connection_limit=1000)
    print("READY", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if kind == "ipcserve":
            from ipcserve.flask import IPCServe

            IPCServe.of(app).drain(grace=1)


if __name__ == "__main__":
    main()
