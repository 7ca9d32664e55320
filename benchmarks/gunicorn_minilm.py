"""WSGI module for the memory benchmark: MiniLM served to every gunicorn worker by one ML process."""

import os

from ipcserve.adapters.hf import TransformersModel
from ipcserve.server.cli import create_app

from models import minilm_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
app = create_app([(TransformersModel(minilm_path(), task="feature-extraction", normalize=True,
                                     name="minilm", max_batch_size=32), "json")])
