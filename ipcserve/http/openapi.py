"""``GET /openapi.json`` (OpenAPI 3.1) and ``GET /docs`` (an offline page that renders it).

The document is built per request from the route registry (:mod:`.routes`): every
registered route that is ``documented``, with its request body, its answers and its error
statuses in its surface's error shape. A route expanded per model (each model's predict
route with that model's request schema) is one path per model. When an API key is set it
is a bearer security scheme, every route but the open ones needs it and may answer 401.
Nothing here knows a surface: a new route is in the document because it is registered.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

from flask import Response, jsonify

from .. import __version__
from .routes import IPCSERVE_ERRORS, STATUS_TEXT, Route
from .serving import Served, served

__all__ = ["ROUTES", "openapi_document"]

_PAGE = pathlib.Path(__file__).resolve().parent / "static" / "docs.html"
_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def _path(rule: str, params: dict[str, str]) -> str:
    """A Flask rule as an OpenAPI path: expanded variables filled in, the others ``{name}``."""
    return _VARIABLE.sub(lambda m: params.get(m.group(1), "{" + m.group(1) + "}"), rule)


def _operation(state: Served, route: Route, params: dict[str, str], method: str) -> dict[str, Any]:
    suffix = "".join("_" + re.sub(r"\W", "_", v) for v in params.values())
    ok = route.ok(state, params) if callable(route.ok) else route.ok
    operation: dict[str, Any] = {
        "operationId": f"{route.name}{suffix}" + ("" if len(route.methods) == 1 else f"_{method}"),
        "summary": route.summary.format(**params), "tags": [route.tag or route.surface.name],
        "responses": {"200": ok}}
    variables = [m.group(1) for m in _VARIABLE.finditer(route.rule) if m.group(1) not in params]
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in variables] + list(route.parameters)
    if parameters:
        operation["parameters"] = parameters
    body = route.request(state, params) if route.request is not None else None
    if body is not None:
        operation["requestBody"] = body
    statuses = list(route.errors)
    if state.guarded and not route.open:
        statuses.append(401)
    if state.keys is not None and not route.open:
        statuses += [403, 429]
    schema = {"$ref": f"#/components/schemas/{route.surface.component}"}
    for status in sorted(statuses):
        operation["responses"][str(status)] = {"description": STATUS_TEXT[status],
                                               "content": {"application/json": {"schema": schema}}}
    operation["responses"].update(route.responses)
    if state.guarded and route.open:
        operation["security"] = []
    return operation


def openapi_document(state: Served | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of this app's ipcserve routes (inside a request or app
    context when ``state`` is not given)."""
    state = served() if state is None else state
    prefix = state.url_prefix.rstrip("/")
    paths: dict[str, Any] = {}
    for route in state.routes.values():
        if not route.documented:
            continue
        for params in route.expand(state) if route.expand is not None else [{}]:
            item = paths.setdefault(prefix + _path(route.rule, params) or "/", {})
            for method in route.methods:
                item[method.lower()] = _operation(state, route, params, method.lower())
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "ipcserve", "version": __version__,
                 "description": "Models served by ipcserve. Errors answer "
                                "{\"error\": ..., \"type\": ...}; the OpenAI routes answer in "
                                "OpenAI's error shape and the V2 routes {\"error\": ...}, as "
                                "those protocols define."},
        "paths": paths,
        "components": {"schemas": {route.surface.component: route.surface.error_schema
                                   for route in state.routes.values()}},
    }
    if state.guarded:
        document["components"]["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer",
                       "description": "the server's API key: Authorization: Bearer <key>"}}
        document["security"] = [{"apiKey": []}]
    return document


def _openapi() -> Response:
    return jsonify(openapi_document())


def _docs() -> Response:
    return Response(_PAGE.read_bytes(), content_type="text/html; charset=utf-8")


ROUTES = [
    Route("/openapi.json", "openapi", _openapi, IPCSERVE_ERRORS, summary="this document",
          tag="docs", ok={"description": "OpenAPI 3.1",
                          "content": {"application/json": {"schema": {"type": "object"}}}}),
    Route("/docs", "docs", _docs, IPCSERVE_ERRORS, open=True, tag="docs",
          summary="a page that renders this document (offline, no CDN)",
          ok={"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}),
]
