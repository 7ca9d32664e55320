"""``gunicorn -c python:ipcserve.gunicorn_conf``: gunicorn settings and hooks (a stable
import path; the implementation and its notes are :mod:`ipcserve.server.gunicorn_conf`)."""

from __future__ import annotations

from .server.gunicorn_conf import bind, graceful_timeout, on_exit, preload_app, timeout, when_ready

__all__ = ["bind", "graceful_timeout", "on_exit", "preload_app", "timeout", "when_ready"]
