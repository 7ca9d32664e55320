"""gunicorn settings and hooks: many web workers, one set of ML processes.

Use it as ``gunicorn -c python:ipcserve.gunicorn_conf --workers 4 wsgi:app`` where
``wsgi.py`` builds the Flask app with :class:`~ipcserve.flask.IPCServe` and adds its models
at import time without starting them. The app is loaded once in the gunicorn master
(``preload_app``); ``when_ready`` starts the models there, before any web worker is
forked, so every worker inherits the same shared queue and status block and talks to the
same ML process - one copy of the model in memory however many web workers run.
``on_exit`` drains and stops the ML processes (:meth:`IPCServe.drain`) after gunicorn has
stopped its workers.

Import your own settings after these (``from ipcserve.gunicorn_conf import *``) to change
``bind``, ``workers`` or ``timeout``; keep ``preload_app = True``.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

preload_app = True
bind = "127.0.0.1:8000"
# Waiting on the ML process is I/O for gunicorn; a request's own deadline is IPCSERVE_TIMEOUT.
timeout = 120
graceful_timeout = 30


def _extension(server: Any) -> Any:
    from ipcserve.flask import IPCServe

    return IPCServe.of(server.app.wsgi())


def when_ready(server: Any) -> None:
    """In the master, after the app is preloaded and before workers fork: start the models."""
    ext = _extension(server)
    ext.start()
    server.log.info("ipcserve: models ready: %s", ", ".join(ext.endpoints))


def on_exit(server: Any) -> None:
    """In the master, after the workers stopped: drain and stop the ML processes."""
    _extension(server).drain()
    server.log.info("ipcserve: models stopped")
