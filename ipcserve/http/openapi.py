"""Standard interfaces: ``GET /openapi.json`` (OpenAPI 3.1, built from the served models),
``GET /docs`` (an offline page that renders it) and the V2 inference protocol (:mod:`.v2`).

The document is built per request from what is registered: each model's predict route with
its request body (its JSON Schema, pydantic model's schema, or its ``predict`` signature),
image models' multipart and raw bodies, the error body every failure answers, and the API
key as a bearer security scheme when one is set.
"""

from __future__ import annotations

import inspect
import pathlib
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from ..engine import events
from . import v2

__all__ = ["openapi_document", "register"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_V2_ERROR = {"$ref": "#/components/schemas/V2Error"}
_JSON = "application/json"


def register(bp: Blueprint) -> None:
    """Add ``/openapi.json``, ``/docs`` and the V2 routes to ipcserve's blueprint."""
    bp.add_url_rule("/openapi.json", "openapi", _openapi)
    bp.add_url_rule("/docs", "docs", _docs)
    bp.register_blueprint(v2.blueprint())


def _openapi() -> Response:
    return jsonify(openapi_document())


def _docs() -> Response:
    page = pathlib.Path(__file__).resolve().parent / "static" / "docs.html"
    return Response(page.read_bytes(), content_type="text/html; charset=utf-8")


def _errors(*statuses: int, body: dict[str, Any] = _ERROR) -> dict[str, Any]:
    text = {400: "bad input", 401: "missing or wrong API key", 404: "no such model",
            405: "method not allowed", 409: "a reload of this model is already running",
            413: "body, image or array too large",
            415: "unsupported content type", 429: "shed (shed_status=429); see Retry-After",
            499: "client disconnected", 500: "the model's answer could not be sent",
            502: "the ML process died with this request in flight (not retried elsewhere: "
                 "it may be what killed it)",
            503: "overloaded, loading, restarting or draining; see Retry-After",
            504: "the deadline passed"}
    return {str(s): {"description": text[s], "content": {_JSON: {"schema": body}}}
            for s in statuses}


def _request_schema(endpoint: Any) -> dict[str, Any]:
    schema = endpoint.schema
    if isinstance(schema, dict):
        return dict(schema)
    if schema is not None and hasattr(schema, "model_json_schema"):
        return dict(schema.model_json_schema())
    if schema is not None and hasattr(schema, "DESCRIPTOR"):
        from .schemas import json_schema_of_message

        return json_schema_of_message(schema)
    signature = v2.signature_of(endpoint.ml)
    if signature is not None:  # one sample: each input without its batch dimension
        return {"type": "object", "additionalProperties": False,
                "required": [t["name"] for t in signature["inputs"]],
                "properties": {t["name"]: _sample_schema(t) for t in signature["inputs"]}}
    properties: dict[str, Any] = {}
    required: list[str] = []
    try:
        parameters = inspect.signature(endpoint.ml.predict).parameters.values()
    except (TypeError, ValueError):
        parameters = []  # type: ignore[assignment]
    for p in parameters:
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            properties[p.name] = {}
            if p.default is p.empty:
                required.append(p.name)
    result: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        result["required"] = required
    return result


def _sample_schema(tensor: dict[str, Any]) -> dict[str, Any]:
    datatype = tensor.get("datatype", "")
    schema: dict[str, Any] = {"type": "number" if datatype.startswith("FP") else
                              "boolean" if datatype == "BOOL" else "integer"}
    for dim in reversed(list(tensor.get("shape", []))[1:]):
        schema = {"type": "array", "items": schema}
        if isinstance(dim, int) and dim >= 0:
            schema.update(minItems=dim, maxItems=dim)
    return schema


def _predict_operation(endpoint: Any, operation_id: str) -> dict[str, Any]:
    content: dict[str, Any] = {_JSON: {"schema": _request_schema(endpoint)}}
    if endpoint.kind == "image":
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "contentMediaType": "image/*"}}}}
        content["image/*"] = {"schema": {"type": "string", "contentMediaType": "image/*"}}
    statuses = [400, 413, 415, 429, 499, 500, 502, 503, 504]
    ok: dict[str, Any] = {"description": "the model's answer (JSON; NDJSON or SSE when the "
                                         "model streams)",
                          "content": {_JSON: {"schema": {}},
                                      "application/x-ndjson": {"schema": {}},
                                      "text/event-stream": {"schema": {}}}}
    if endpoint.cache_settings is not None:
        ok["headers"] = {"X-IPCServe-Cache": {
            "description": "hit: answered from the response cache; miss: computed",
            "schema": {"type": "string", "enum": ["hit", "miss"]}}}
    return {"operationId": operation_id, "summary": f"run model {endpoint.name}",
            "tags": ["predict"], "requestBody": {"required": True, "content": content},
            "responses": {"200": ok, **_errors(*statuses)}}


def _get(operation_id: str, summary: str, schema: dict[str, Any], *errors: int,
         tag: str = "status", error_body: dict[str, Any] = _ERROR) -> dict[str, Any]:
    return {"get": {"operationId": operation_id, "summary": summary, "tags": [tag],
                    "responses": {"200": {"description": "OK",
                                          "content": {_JSON: {"schema": schema}}},
                                  **_errors(*errors, body=error_body)}}}


_NUMBERS = {"type": "array", "items": {"type": ["number", "null"]}}
_SERIES = {"type": "object",
           "required": ["t", "requests", "rate", "p50_ms", "p95_ms", "p99_ms", "batch_mean",
                        "batch_max", "queue_depth"],
           "properties": {"t": {"type": "array", "items": {"type": "number"}},
                          "requests": {"type": "object", "additionalProperties": {
                              "type": "array", "items": {"type": "integer"}}},
                          "rate": {"type": "array", "items": {"type": "number"}},
                          "p50_ms": _NUMBERS, "p95_ms": _NUMBERS, "p99_ms": _NUMBERS,
                          "batch_mean": _NUMBERS, "batch_max": _NUMBERS,
                          "queue_depth": {"type": "array", "items": {"type": "integer"}}}}
_HISTORY = {"type": "object", "required": ["bucket_seconds", "span_seconds", "now", "models"],
            "properties": {"bucket_seconds": {"type": "number"},
                           "span_seconds": {"type": "number"}, "now": {"type": "number"},
                           "pid": {"type": "integer"},
                           "models": {"type": "object", "additionalProperties": _SERIES}}}
_EVENTS = {"type": "object", "required": ["object", "data"],
           "properties": {"object": {"const": "list"}, "pid": {"type": "integer"},
                          "data": {"type": "array", "items": {
               "type": "object", "required": ["id", "time", "kind", "model", "message"],
               "properties": {"id": {"type": "integer"}, "time": {"type": "number"},
                              "kind": {"type": "string", "enum": list(events.KINDS)},
                              "model": {"type": ["string", "null"]},
                              "message": {"type": "string"}}}}}}


def _tensor_schema(with_data: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": list(v2.DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "parameters": {"type": "object"},
    }
    required = ["name", "datatype", "shape"]
    if with_data:
        properties["data"] = {"type": "array"}
        required.append("data")
    return {"type": "object", "required": required, "properties": properties}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of this app's ipcserve routes (call inside a request or
    app context)."""
    from .. import __version__

    state = current_app.extensions["ipcserve"]
    ext = state.ext
    prefix = ext.url_prefix.rstrip("/")
    paths: dict[str, Any] = {}
    for name, endpoint in ext.endpoints.items():
        paths[f"{prefix}/v1/models/{name}/predict"] = {
            "post": _predict_operation(endpoint, f"predict_{name}")}
    if ext.default is not None:
        paths[f"{prefix}/predict"] = {
            "post": _predict_operation(ext.endpoints[ext.default], "predict_default")}
    model_entry = {"type": "object", "required": ["id", "name", "kind", "url", "status"],
                   "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                  "kind": {"type": "string"}, "url": {"type": "string"},
                                  "status": {"type": "object"}}}
    names = sorted(ext.endpoints)
    paths[f"{prefix}/v1/models"] = _get("list_models", "the served models", {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "array", "items": model_entry}}})
    reloaded = {"type": "object",
                "required": ["model", "generation", "previous_generation", "load_seconds",
                             "drained"],
                "properties": {"model": {"type": "string"}, "generation": {"type": "integer"},
                               "previous_generation": {"type": "integer"},
                               "load_seconds": {"type": "number"},
                               "drained": {"type": "boolean"}}}
    for name in names:
        paths[f"{prefix}/v1/models/{name}"] = _get(f"model_{name}", f"model {name}",
                                                    model_entry, 404)
        paths[f"{prefix}/v1/models/{name}/reload"] = {"post": {
            "operationId": f"reload_{name}", "tags": ["models"],
            "summary": f"load a new version of {name} and switch to it without dropping a "
                       "request",
            "responses": {"200": {"description": "the new version serves",
                                  "content": {_JSON: {"schema": reloaded}}},
                          **_errors(404, 409, 500, 503)}}}
        paths[f"{prefix}/v1/models/{name}/reload"]["post"]["responses"]["500"]["description"] = (
            "the new version failed to load; the old one keeps serving")
    paths[f"{prefix}/healthz"] = _get("healthz", "liveness", {"type": "object"})
    paths[f"{prefix}/readyz"] = _get("readyz", "readiness (503 until every model is ready)",
                                     {"type": "object"}, 503)
    paths[f"{prefix}/openapi.json"] = _get("openapi", "this document", {"type": "object"})
    paths[f"{prefix}/v1/history"] = _get(
        "history", "each model's last 15 minutes in time buckets (this web process)",
        _HISTORY)
    paths[f"{prefix}/v1/events"] = _get(
        "events", "ML process starts, crashes, restarts, reloads and drains, newest first "
        "(this web process)", _EVENTS, 400)
    paths[f"{prefix}/v1/events"]["get"]["parameters"] = [{
        "name": "limit", "in": "query", "required": False,
        "description": f"at most this many events (1 to {events.MAX_EVENTS})",
        "schema": {"type": "integer", "minimum": 1, "maximum": events.MAX_EVENTS}}]
    # V2: for the models with a tensor signature.
    tensor_models = [n for n in names if v2.signature_of(ext.endpoints[n].ml) is not None]
    # The V2 health and server routes always answer.
    paths[f"{prefix}/v2/health/live"] = _get(
        "v2_live", "V2 liveness", {"type": "object", "required": ["live"],
                                   "properties": {"live": {"type": "boolean"}}},
        tag="v2")
    paths[f"{prefix}/v2/health/ready"] = _get(
        "v2_ready", "V2 readiness", {"type": "object", "required": ["ready"],
                                     "properties": {"ready": {"type": "boolean"}}},
        503, tag="v2", error_body={"type": "object"})
    paths[f"{prefix}/v2"] = _get("v2_server", "V2 server metadata", {
        "type": "object", "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "extensions": {"type": "array", "items": {"type": "string"}}}},
        tag="v2")
    for name in tensor_models:
        base = f"{prefix}/v2/models/{name}"
        paths[base] = _get(f"v2_model_{name}", f"V2 metadata of {name}", {
            "type": "object", "required": ["name", "platform", "inputs", "outputs"],
            "properties": {"name": {"type": "string"}, "platform": {"type": "string"},
                           "versions": {"type": "array", "items": {"type": "string"}},
                           "inputs": {"type": "array", "items": _tensor_schema(False)},
                           "outputs": {"type": "array", "items": _tensor_schema(False)}}},
            404, tag="v2", error_body=_V2_ERROR)
        paths[f"{base}/ready"] = _get(f"v2_ready_{name}", f"V2 readiness of {name}", {
            "type": "object", "required": ["name", "ready"],
            "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
            404, 503, tag="v2", error_body={"type": "object"})
        paths[f"{base}/infer"] = {"post": {
            "operationId": f"v2_infer_{name}", "summary": f"V2 inference on {name}",
            "tags": ["v2"],
            "requestBody": {"required": True, "content": {_JSON: {"schema": {
                "type": "object", "required": ["inputs"],
                "properties": {"id": {"type": "string"},
                               "inputs": {"type": "array", "items": _tensor_schema(True)},
                               "outputs": {"type": "array", "items": {
                                   "type": "object", "required": ["name"],
                                   "properties": {"name": {"type": "string"}}}}}}}}},
            "responses": {"200": {"description": "the output tensors", "content": {_JSON: {
                "schema": {"type": "object", "required": ["model_name", "outputs"],
                           "properties": {"model_name": {"type": "string"},
                                          "model_version": {"type": "string"},
                                          "id": {"type": "string"},
                                          "outputs": {"type": "array",
                                                      "items": _tensor_schema(True)}}}}}},
                          **_errors(400, 404, 413, 429, 500, 502, 503, 504, body=_V2_ERROR)}}}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "ipcserve", "version": __version__,
                 "description": "Models served by ipcserve. Errors answer "
                                "{\"error\": ..., \"type\": ...}; V2 routes answer "
                                "{\"error\": ...} as the Open Inference Protocol defines."},
        "paths": paths,
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error", "type"],
                      "properties": {"error": {"type": "string"}, "type": {"type": "string"}}},
            "V2Error": {"type": "object", "required": ["error"],
                        "properties": {"error": {"type": "string"}}}}},
    }
    if state.api_key is not None:
        document["components"]["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer",
                       "description": "the server's API key: Authorization: Bearer <key>"}}
        document["security"] = [{"apiKey": []}]
        for path, item in paths.items():
            if path.endswith(("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")):
                item["get"]["security"] = []
            else:
                for operation in item.values():
                    operation["responses"].update(_errors(401))
    return document
