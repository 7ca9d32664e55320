"""The status API: what an operator, a probe or a scraper reads.

* ``GET /healthz``: liveness (the web process answers); ``GET /readyz``: readiness, from
  the serving core's one reading (:meth:`.serving.Models.readiness`); ``GET /health``: the
  same readiness under the name LLM tools probe;
* ``GET /metrics``: Prometheus text;
* ``GET /``: the status page (charts, event log, try-it) and its files under
  ``/ipcserve-static/``; the page's data needs the API key like every ``/v1`` route;
* ``GET /v1/history``: each model's last 15 minutes in time buckets (:mod:`.history`);
* ``GET /v1/events``: ML processes started, crashed, restarted, killed by the watchdog,
  circuits opened, reloads and drains, newest first (:mod:`ipcserve.engine.events`);
  ``?limit=N`` keeps the first N.

History and events are this web process's view (see docs/status-page.md for gunicorn).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from flask import Response, jsonify, request, send_from_directory

from ..engine import events
from ..engine.errors import InputError
from .routes import IPCSERVE_ERRORS, Route
from .serving import served

__all__ = ["MAX_LIMIT", "ROUTES", "STATIC"]

#: The most events one ``/v1/events`` answer holds.
MAX_LIMIT = events.MAX_EVENTS
#: The status page's files.
STATIC = pathlib.Path(__file__).resolve().parent / "static"


def _healthz() -> Response:
    return jsonify({"status": "ok"})


def _readyz() -> Response:
    readiness = served().models.readiness()
    response = jsonify({"ready": readiness.ready, "draining": readiness.draining,
                        "models": readiness.models})
    response.status_code = 200 if readiness.ready else 503
    return response


def _metrics() -> Response:
    data, content_type = served().metrics.exposition()
    return Response(data, content_type=content_type)


def _index() -> Response:
    return Response((STATIC / "index.html").read_bytes(), content_type="text/html; charset=utf-8")


def _static(filename: str) -> Response:
    return send_from_directory(STATIC, filename, max_age=0)


def _history() -> Response:
    state = served()
    # "pid": which web process answered (each gunicorn worker has its own history).
    # Each model, and each version of a model with several ("model@version").
    snapshot = state.metrics.history.snapshot(state.models.history_names())
    keys = {} if state.keys is None else {"keys": state.keys.usage()}  # by the key's name
    return jsonify({**snapshot, "pid": os.getpid(), **keys})


def _events() -> Response:
    state = served()
    raw = request.args.get("limit")
    limit = MAX_LIMIT
    if raw is not None:
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise InputError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw!r}")
        limit = int(raw)
    found = events.LOG.newest(limit, set(state.models.endpoints))
    return jsonify({"object": "list", "data": found, "pid": os.getpid()})


# -- the OpenAPI rows ------------------------------------------------------------------
def _files(state: object) -> list[dict[str, str]]:
    return [{"filename": path.name} for path in sorted(STATIC.iterdir()) if path.is_file()]


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NUMBERS: dict[str, Any] = {"type": "array", "items": {"type": ["number", "null"]}}
_SERIES: dict[str, Any] = {"type": "object",
           "required": ["t", "requests", "rate", "p50_ms", "p95_ms", "p99_ms", "batch_mean",
                        "batch_max", "queue_depth"],
           "properties": {"t": {"type": "array", "items": {"type": "number"}},
                          "requests": {"type": "object", "additionalProperties": {
                              "type": "array", "items": {"type": "integer"}}},
                          "rate": {"type": "array", "items": {"type": "number"}},
                          "p50_ms": _NUMBERS, "p95_ms": _NUMBERS, "p99_ms": _NUMBERS,
                          "batch_mean": _NUMBERS, "batch_max": _NUMBERS,
                          "queue_depth": {"type": "array", "items": {"type": "integer"}}}}
_HISTORY: dict[str, Any] = {"type": "object", "required": ["bucket_seconds", "span_seconds", "now", "models"],
            "properties": {"bucket_seconds": {"type": "number"},
                           "span_seconds": {"type": "number"}, "now": {"type": "number"},
                           "pid": {"type": "integer"},
                           "models": {"type": "object", "additionalProperties": _SERIES},
                           "keys": {"type": "object", "additionalProperties": {
                               "type": "object", "required": ["requests", "limited", "tokens"],
                               "properties": {"requests": {"type": "integer"},
                                              "limited": {"type": "integer"},
                                              "tokens": {"type": "integer"}}}}}}
_EVENTS: dict[str, Any] = {"type": "object", "required": ["object", "data"],
           "properties": {"object": {"const": "list"}, "pid": {"type": "integer"},
                          "data": {"type": "array", "items": {
               "type": "object", "required": ["id", "time", "kind", "model", "message"],
               "properties": {"id": {"type": "integer"}, "time": {"type": "number"},
                              "kind": {"type": "string", "enum": list(events.KINDS)},
                              "model": {"type": ["string", "null"]},
                              "message": {"type": "string"}}}}}}
_READY: dict[str, Any] = {"type": "object", "required": ["ready", "draining", "models"],
          "properties": {"ready": {"type": "boolean"}, "draining": {"type": "boolean"},
                         "models": {"type": "object",
                                    "additionalProperties": {"type": "boolean"}}}}
_LIMIT: dict[str, Any] = {"name": "limit", "in": "query", "required": False,
          "description": f"at most this many events (1 to {MAX_LIMIT})",
          "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}}

ROUTES = [
    Route("/healthz", "healthz", _healthz, IPCSERVE_ERRORS, open=True, summary="liveness",
          tag="status", ok=_json({"type": "object", "required": ["status"],
                                  "properties": {"status": {"const": "ok"}}})),
    Route("/readyz", "readyz", _readyz, IPCSERVE_ERRORS, open=True, tag="status",
          summary="readiness: 503 until every model is ready, and while draining",
          ok=_json(_READY), responses={"503": _json(_READY, "not ready, or draining")}),
    # The name LLM servers use (vLLM, TGI): load generators and gateways probe it before
    # they start. The same reading as /readyz.
    Route("/health", "health", _readyz, IPCSERVE_ERRORS, open=True, tag="status",
          summary="readiness under the name LLM tools probe (as /readyz)",
          ok=_json(_READY), responses={"503": _json(_READY, "not ready, or draining")}),
    Route("/metrics", "metrics", _metrics, IPCSERVE_ERRORS, summary="Prometheus metrics",
          tag="status", ok={"description": "the Prometheus text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}}}),
    Route("/", "index", _index, IPCSERVE_ERRORS, open=True, tag="status",
          summary="the status page (its data needs the API key)",
          ok={"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}),
    Route("/ipcserve-static/<path:filename>", "static", _static, IPCSERVE_ERRORS, open=True,
          tag="status", summary="the status page's {filename}", expand=_files,
          ok={"description": "the file", "content": {"*/*": {"schema": {}}}}),
    Route("/v1/history", "history", _history, IPCSERVE_ERRORS, tag="status",
          summary="each model's last 15 minutes in time buckets (this web process)",
          ok=_json(_HISTORY)),
    Route("/v1/events", "events", _events, IPCSERVE_ERRORS, tag="status",
          summary="ML process starts, crashes, restarts, reloads and drains, newest first "
                  "(this web process)", ok=_json(_EVENTS), errors=(400,), parameters=(_LIMIT,)),
]
