"""The route registry: every ipcserve route is registered once, with what it needs.

A surface (:mod:`.native`, :mod:`.openai`, :mod:`.v2`, :mod:`.status`, :mod:`.openapi`)
declares its routes as :class:`Route` rows; the extension adds them to one blueprint with
:func:`add`. From the rows, and nowhere else, come:

* the API key check (:func:`require_key`): every route needs the key unless it is ``open``;
* the error answers (:func:`handle_error`): one handler, the body in the route's surface's
  shape (:class:`Surface`), the status and headers from :func:`.serving.failure_of`;
* the OpenAPI document (:mod:`.openapi` walks the rows; a row that is not ``documented``
  is left out, and that is a decision written in the row).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, g, request
from werkzeug.exceptions import HTTPException

from ..engine.errors import IPCServeError
from .serving import Failure, Served, error_response, failure_of, served

__all__ = ["IPCSERVE_ERRORS", "Route", "Surface", "add", "handle_error", "open_paths",
           "require_key"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Surface:
    """A protocol's error shape.

    Attributes:
        name: the surface (``native``, ``openai``, ``v2``).
        error_body: the JSON body of a failure.
        error_schema: the JSON Schema of that body, for the OpenAPI document.
        component: the schema's name among the document's components.
    """

    name: str
    error_body: Callable[[Failure], Any]
    error_schema: dict[str, Any]
    component: str = "Error"


def _ipcserve_body(failure: Failure) -> dict[str, Any]:
    error = failure.error
    if isinstance(error, IPCServeError):
        body = error.to_dict()  # ModelError adds model_error_type
        body["type"] = failure.type
        return body
    return {"error": failure.message, "type": failure.type}


#: ipcserve's own error body ``{"error": <message>, "type": <name>}``: the native routes,
#: the status routes and every error outside a route (unknown URL, wrong method).
IPCSERVE_ERRORS = Surface("native", _ipcserve_body, {
    "type": "object", "required": ["error", "type"],
    "properties": {"error": {"type": "string"}, "type": {"type": "string"},
                   "model_error_type": {"type": "string"}}})

#: What each documented error status means, for the OpenAPI document.
STATUS_TEXT = {
    400: "bad input", 401: "missing or wrong API key",
    403: "the API key may not use this model", 404: "no such model",
    405: "method not allowed", 409: "a reload of this model is already running",
    413: "body, image or array too large", 415: "unsupported content type",
    429: "the API key is over its quota, or shed (shed_status=429); see Retry-After",
    499: "client disconnected",
    500: "the model raised, or its answer could not be sent",
    502: "the ML process died with this request in flight (not retried elsewhere: it may be "
         "what killed it)",
    503: "overloaded, loading, restarting or draining; see Retry-After",
    504: "the deadline passed"}


@dataclasses.dataclass(frozen=True)
class Route:
    """One route of one surface.

    Attributes:
        rule: the Flask rule, e.g. ``/v1/models/<name>/predict``.
        name: the Flask endpoint name, unique within ipcserve's blueprint.
        view: the view function.
        surface: whose error shape its errors take.
        methods: the HTTP methods it answers.
        open: answers without the API key (probes, the status page's shell, the docs).
        summary / tag: for the OpenAPI document; ``summary`` may use the rule's variables
            (``"run model {name}"``).
        ok: the OpenAPI ``200`` response object, or a function ``(state, params) -> it``.
        errors: the error statuses it can answer besides 401 (added when a key is set),
            each with its surface's error body.
        responses: other documented responses by status, as OpenAPI response objects
            (a ``503`` of ``/readyz`` is its usual body, not an error body).
        request: ``(state, params) -> requestBody`` for the OpenAPI document, or None.
        expand: ``state -> [params, ...]``: one documented path per entry, the rule's
            variables filled in (e.g. one per model, with that model's request schema);
            None documents the rule once, its variables as path parameters.
        parameters: OpenAPI query parameters.
        documented: False leaves it out of the OpenAPI document.
    """

    rule: str
    name: str
    view: Callable[..., Any]
    surface: Surface
    methods: tuple[str, ...] = ("GET",)
    open: bool = False
    summary: str = ""
    tag: str = ""
    ok: dict[str, Any] | Callable[[Served, dict[str, str]], dict[str, Any]] = \
        dataclasses.field(default_factory=lambda: {"description": "OK"})
    errors: tuple[int, ...] = ()
    responses: dict[str, Any] = dataclasses.field(default_factory=dict)
    request: Callable[[Served, dict[str, str]], dict[str, Any] | None] | None = None
    expand: Callable[[Served], list[dict[str, str]]] | None = None
    parameters: tuple[dict[str, Any], ...] = ()
    documented: bool = True


def add(bp: Blueprint, state: Served, route: Route) -> None:
    """Register ``route`` on ``bp`` and in ``state.routes``."""
    endpoint = f"{bp.name}.{route.name}"
    if endpoint in state.routes:
        raise ValueError(f"two routes are named {route.name!r}")
    bp.add_url_rule(route.rule, route.name, route.view, methods=list(route.methods))
    state.routes[endpoint] = route


def open_paths(routes: list[Route]) -> list[str]:
    """The rules of the routes that answer without the API key, in registry order."""
    return [route.rule for route in routes if route.open]


def require_key() -> None:
    """``before_request``: every route but the open ones needs ``Authorization: Bearer``
    with the server's key or a team key (whose quotas it counts against); a CORS preflight
    (``OPTIONS``) needs none, and never reaches a model.

    Raises:
        UnauthorizedError: a key is needed and the request did not send one.
        RateLimitedError: its team key is over its quota.
    """
    state = served()
    if not state.guarded or request.method == "OPTIONS":
        return
    route = state.routes.get(request.endpoint or "")
    if route is not None and route.open:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # WSGI gives header values as latin-1 text: encoding them back gives the bytes the
    # client sent, so a non-ASCII key sent as UTF-8 (curl's way) compares equal.
    try:
        sent = token.strip().encode("latin-1")
    except UnicodeEncodeError:
        sent = b""
    g.ipcserve_key = state.authorize(sent if scheme.lower() == "bearer" else b"",
                                     "send 'Authorization: Bearer <key>'")


def handle_error(error: Exception) -> Response:
    """The one error handler of ipcserve's blueprint: the route's surface shapes the body.

    An unexpected exception (a bug) is logged with its traceback here and answered 500
    without it; ipcserve's own errors were logged where the request failed (the serving
    core) or are the client's to fix.
    """
    state = served()
    route = state.routes.get(request.endpoint or "")
    surface = route.surface if route is not None else IPCSERVE_ERRORS
    if not isinstance(error, (IPCServeError, HTTPException)):
        logger.exception("unhandled error in %s %s", request.method, request.path)
    failure = failure_of(error, state.shed_status)
    return error_response(failure, surface.error_body(failure))
