"""An image tagger and an image captioner, each its own model (and ML process).

Download the models once (on a machine with internet), then serve them offline::

    huggingface-cli download google/vit-base-patch16-224 --local-dir models/vit
    huggingface-cli download Salesforce/blip-image-captioning-base --local-dir models/blip
    python examples/image_models.py models/vit models/blip
    curl -s localhost:8000/v1/models/tagger/predict -F image=@cat.jpg
    # -> [{"label": "tabby, tabby cat", "score": 0.62}, ...]
    curl -s localhost:8000/v1/models/captioner/predict -H 'Content-Type: image/jpeg' \\
         --data-binary @cat.jpg
    # -> {"generated_text": "a cat laying on a couch"}
"""

from __future__ import annotations

import logging
import sys

from flask import Flask

from ipcserve.adapters.hf import TransformersModel
from ipcserve.server import serve
from ipcserve.flask import IPCServe


def main(tagger_dir: str, captioner_dir: str) -> None:
    app = Flask(__name__)
    ipc = IPCServe(app)
    ipc.add_model(TransformersModel(tagger_dir, task="image-classification", name="tagger",
                                    top_k=5, timeout=10), kind="image")
    ipc.add_model(TransformersModel(captioner_dir, task="image-text-to-text", name="captioner",
                                    max_new_tokens=30, timeout=30), kind="image")
    # waitress on 127.0.0.1:8000; starts the models (each in its own ML process) and, on
    # SIGTERM or Ctrl-C, drains requests in flight before stopping them.
    sys.exit(serve(app, host="127.0.0.1", port=8000))


if __name__ == "__main__":  # required: the spawn start method re-imports this file
    logging.basicConfig(level=logging.INFO)
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} TAGGER_DIR CAPTIONER_DIR")
    main(sys.argv[1], sys.argv[2])
