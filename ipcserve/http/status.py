"""The status page's data: ``GET /v1/history`` and ``GET /v1/events``.

* ``/v1/history``: each model's last 15 minutes in time buckets (:mod:`ipcserve.history`):
  requests by outcome and per second, latency p50/p95/p99, batch size, queue depth.
* ``/v1/events``: ML processes started, crashed (with the exit cause), restarted, killed
  by the watchdog, circuits opened, reloads and drains, newest first
  (:mod:`ipcserve.events`); ``?limit=N`` keeps the first N.

Both are this web process's view (see docs/status-page.md for gunicorn) and need the API key
when one is set, like every ``/v1`` route (the blueprint's ``before_request`` check).
"""

from __future__ import annotations

import os

from flask import Blueprint, Response, current_app, jsonify, request

from ..engine import events
from ..engine.errors import InputError

__all__ = ["register"]

#: The most events one ``/v1/events`` answer holds.
MAX_LIMIT = events.MAX_EVENTS


def register(bp: Blueprint) -> None:
    """Add ``/v1/history`` and ``/v1/events`` to ipcserve's blueprint."""
    bp.add_url_rule("/v1/history", "history", _history)
    bp.add_url_rule("/v1/events", "events", _events)


def _history() -> Response:
    state = current_app.extensions["ipcserve"]
    # "pid": which web process answered (each gunicorn worker has its own history).
    snapshot = state.metrics.history.snapshot(list(state.ext.endpoints))
    return jsonify({**snapshot, "pid": os.getpid()})


def _events() -> Response:
    state = current_app.extensions["ipcserve"]
    raw = request.args.get("limit")
    limit = MAX_LIMIT
    if raw is not None:
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise InputError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw!r}")
        limit = int(raw)
    found = events.LOG.newest(limit, set(state.ext.endpoints))
    return jsonify({"object": "list", "data": found, "pid": os.getpid()})
