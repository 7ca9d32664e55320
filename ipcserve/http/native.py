"""ipcserve's own model API: predict, the model list, reload.

* ``POST /v1/models/<name>/predict`` for every model, and ``POST /predict`` for the default
  one: a JSON object (its fields are the model's keyword arguments), or for image models a
  multipart upload or a raw ``image/*`` body. A model whose ``predict`` is a generator
  answers with NDJSON, or SSE when the request accepts ``text/event-stream``.
* ``GET /v1/models`` (OpenAI's list shape, with each model's status) and
  ``GET /v1/models/<name>``.
* ``POST /v1/models/<name>/reload``: a new copy of its code and weights without dropping a
  request (:mod:`.reload`).
* ``GET /v1/models/<name>/versions`` and ``POST /v1/models/<name>/versions/<version>/promote``,
  ``.../<version>/weight`` (``{"weight": 10}``), ``.../versions/rollback``: the traffic split
  between a model's versions (:mod:`.versions`).

The request lifecycle is the serving core's (:func:`.serving.exchange`): this module only
turns the body into the model's arguments and the answer into JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Response, jsonify, request, url_for

from ..engine.channel import Stream
from ..engine.errors import InputError, IPCServeError, ModelError, UnsupportedMediaTypeError
from . import decode, encode, reload, schemas, tensors
from .cache import HEADER as CACHE_HEADER
from .routes import IPCSERVE_ERRORS, Route
from .serving import Endpoint, Exchange, Served, exchange, served

__all__ = ["ROUTES", "STREAM_TYPES", "describe", "request_schema"]

_NOTHING = object()
#: The streamed answer's content types: SSE when asked for by name, NDJSON otherwise.
STREAM_TYPES = ("text/event-stream", "application/x-ndjson")


def describe(endpoint: Endpoint) -> dict[str, Any]:
    """One model's entry: OpenAI's model object (``id``, ``object``, ``created``,
    ``owned_by``) plus ipcserve's fields (``kind``, ``task``, ``url``, ``status``...)."""
    ml = endpoint.ml
    settings = endpoint.cache_settings
    return {"id": endpoint.name, "object": "model", "created": endpoint.created,
            "owned_by": "ipcserve", "name": endpoint.name, "kind": endpoint.kind,
            "task": getattr(ml, "task", None),
            "url": url_for("ipcserve.predict", name=endpoint.name),
            "reload": url_for("ipcserve.reload", name=endpoint.name),
            "revision": endpoint.revision, "loaded_at": ml.loaded_at,
            "load_seconds": None if ml.load_seconds is None else round(ml.load_seconds, 3),
            "last_reload": endpoint.last_reload,
            "cache": None if settings is None else {
                "ttl": settings.ttl, "size": settings.size,
                "backend": endpoint.cache.backend if endpoint.cache else None,
                **(endpoint.cache.describe() if endpoint.cache else {})},
            "status": ml.status, "recent_latency": endpoint.latency(),
            # Loaded on demand or at start, and where it stands; every version with its share.
            "load": _load_of(endpoint), **endpoint.split.describe(),
            "versions_url": url_for("ipcserve.versions", name=endpoint.name),
            **_tokenizer_info(ml)}


def _tokenizer_info(ml: Any) -> dict[str, Any]:
    """A text-generation model's context length and special tokens (vLLM's
    ``max_model_len``), where the model can tell them without loading (TransformersModel
    reads its directory's JSON files)."""
    info = getattr(ml, "tokenizer_info", None)
    if getattr(ml, "task", None) != "text-generation" or not callable(info):
        return {}
    value = info()
    return value if isinstance(value, dict) else {}


def _load_of(endpoint: Endpoint) -> dict[str, Any]:
    stable = endpoint.split.versions[endpoint.split.stable]
    return {"mode": "lazy" if stable.lazy else "eager", "state": stable.state,
            "unloaded_by": stable.unloaded_by, "idle_unload": stable.idle_unload,
            "managed": endpoint.pool.managed(stable)}


def _inputs(endpoint: Endpoint, state: Served) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Decode the request into the model call's arguments."""
    mimetype = request.mimetype or ""
    if mimetype == "application/json" or mimetype.endswith("+json"):
        body = decode.parse_json_object(request.get_data(cache=False))
        if endpoint.schema is None:
            # A tensor model's documented body (one sample per input) is what it gets.
            signature = tensors.signature_of(endpoint.ml)
            if signature is not None:
                tensors.check_sample(body, signature)
        return (), decode.validate(body, endpoint.schema)
    if endpoint.kind == "json":
        raise UnsupportedMediaTypeError(
            f"send the inputs as a JSON object with Content-Type: application/json, got "
            f"{mimetype or 'no Content-Type'}")
    if mimetype == "multipart/form-data":
        files = request.files
        upload = files.get("image") or next(iter(files.values()), None)
        if upload is None:
            raise InputError("the multipart form has no file; upload the image in a field named 'image'")
        data = upload.read()
    elif mimetype.startswith("image/"):
        data = request.get_data(cache=False)
    else:
        raise UnsupportedMediaTypeError(
            "send an image as multipart/form-data (field 'image') or as a raw image/* body, or "
            f"JSON inputs; got {mimetype or 'no Content-Type'}")
    image = decode.open_image(data, state.max_pixels)  # header only: size checked, nothing decoded
    # The decoded pixels and the copies preprocessing makes count against the budget until
    # the model's input is built.
    with state.decode_budget.reserve(decode.decoded_bytes(image)):
        decode.load_image(image)
        if endpoint.preprocess is not None:
            try:
                return (endpoint.preprocess(image),), {}
            except IPCServeError:
                raise
            except Exception as exc:
                raise InputError(f"the image could not be prepared for the model: {exc}") from None
        import numpy as np

        return (np.asarray(image.convert("RGB")),), {}


def _predict(name: str | None = None) -> Response:
    state = served()
    endpoint = state.models.get(name)
    with exchange(endpoint) as ex:
        cache, lookup = endpoint.cache, None
        if cache is not None:  # counts the hit, the miss or the backend's error itself
            lookup = cache.lookup(endpoint.revision, request.mimetype or "", request.get_data())
            if lookup.hit is not None:
                return Response(lookup.hit[0], content_type=lookup.hit[1],
                                headers={CACHE_HEADER: "hit"})
        ex.admit()  # before decoding: under overload the body is never even parsed
        args, kwargs = _inputs(endpoint, state)
        # stream(), not call(): a model that does not stream gives one item, its answer.
        stream = ex.stream(args, kwargs)
        first = next(stream, _NOTHING)
        if stream.streaming:
            # SSE only when asked for by name (EventSource sends it); NDJSON otherwise (*/*).
            sse = any(kind == STREAM_TYPES[0] and quality > 0
                      for kind, quality in request.accept_mimetypes)
            return Response(ex.body(_frames(ex, stream, first, sse)),
                            mimetype=STREAM_TYPES[0] if sse else STREAM_TYPES[1],
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        fast = encode.fast_json(first) if endpoint.response_schema is None else None
        if fast is not None:  # orjson installed and the answer is plain data
            response = Response(fast, mimetype="application/json")
        else:
            answer = _jsonable(first)
            if endpoint.response_schema is not None:
                schemas.check_response(answer, endpoint.response_schema, endpoint.name)
            response = jsonify(answer)
        if cache is not None and lookup is not None:
            if lookup.key is not None:
                cache.set(lookup.key, response.get_data(), response.content_type)
            response.headers[CACHE_HEADER] = "miss"
        return response


def _jsonable(value: Any) -> Any:
    try:
        return encode.to_jsonable(value)
    except TypeError as exc:
        raise ModelError(str(exc)) from None


def _frame(sse: bool, value: Any, event: str | None = None) -> bytes:
    data = json.dumps(value, separators=(",", ":"))
    if not sse:
        return (data + "\n").encode()
    return (f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode()


def _frames(ex: Exchange, stream: Stream, first: Any, sse: bool) -> Iterator[bytes]:
    """One frame per item as the model makes it, then an ``end`` event (SSE) or nothing
    more (NDJSON); an error ends the stream with an ``error`` frame."""
    try:
        item = first
        while item is not _NOTHING:
            yield _frame(sse, _jsonable(item))
            item = next(stream, _NOTHING)
        if sse:
            yield _frame(sse, {"items": stream.count}, "end")
    except IPCServeError as exc:
        failure = ex.failed(exc)
        yield _frame(sse, IPCSERVE_ERRORS.error_body(failure), "error")


def _reload(name: str) -> Response:
    state = served()
    return jsonify(reload.reload(state.models, state.models.get(name).name))


def _versions(name: str) -> Response:
    return jsonify(served().models.get(name).split.describe())


def _promote(name: str, version: str) -> Response:
    return jsonify(served().models.get(name).split.promote(version))


def _roll_back(name: str) -> Response:
    return jsonify(served().models.get(name).split.roll_back("api"))


def _weight(name: str, version: str) -> Response:
    endpoint = served().models.get(name)
    body = decode.parse_json_object(request.get_data(cache=False))
    if set(body) != {"weight"}:
        raise InputError('send {"weight": <percent from 0 to 100>}')
    return jsonify(endpoint.split.set_weight(version, body["weight"]))


def _models() -> Response:
    # OpenAI's list shape, so that openai's client.models.list() works; "default" is ours.
    models = served().models
    return jsonify({"object": "list", "data": [describe(e) for e in models.endpoints.values()],
                    "default": models.default, "pool": models.pool.counts()})


def _model(name: str) -> Response:
    return jsonify(describe(served().models.get(name)))


# -- the OpenAPI rows ------------------------------------------------------------------
_JSON = "application/json"


def request_schema(endpoint: Endpoint) -> dict[str, Any]:
    """The JSON Schema of a model's JSON body: its declared schema, else one sample of its
    tensor signature, else its ``predict`` signature's parameters."""
    schema = endpoint.schema
    if isinstance(schema, dict):
        return dict(schema)
    if schema is not None and hasattr(schema, "model_json_schema"):
        return dict(schema.model_json_schema())
    if schema is not None and schemas.is_message_class(schema):
        return schemas.json_schema_of_message(schema)
    signature = tensors.signature_of(endpoint.ml)
    if signature is not None:  # one sample: each input without its batch dimension
        return {"type": "object", "additionalProperties": False,
                "required": [t["name"] for t in signature["inputs"]],
                "properties": {t["name"]: tensors.sample_schema(t) for t in signature["inputs"]}}
    return schemas.signature_schema(endpoint.ml.predict)


def _each_model(state: Served) -> list[dict[str, str]]:
    return [{"name": name} for name in state.models.endpoints]


def _each_version(state: Served) -> list[dict[str, str]]:
    # Every version, the stable one too (promoting it changes nothing; its weight is a 409):
    # a model without versions still documents the rules, as its version "1".
    return [{"name": name, "version": label} for name, e in state.models.endpoints.items()
            for label in e.split.versions]


def _default_model(state: Served) -> list[dict[str, str]]:
    return [] if state.models.default is None else [{}]


def _endpoint_of(state: Served, params: dict[str, str]) -> Endpoint:
    return state.models.get(params.get("name"))


def _predict_body(state: Served, params: dict[str, str]) -> dict[str, Any]:
    endpoint = _endpoint_of(state, params)
    content: dict[str, Any] = {_JSON: {"schema": request_schema(endpoint)}}
    if endpoint.kind == "image":
        image = {"type": "string", "contentMediaType": "image/*", "minLength": 1}
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": ["image"], "properties": {"image": image}}}
        content["image/*"] = {"schema": image}
    return {"required": True, "content": content}


def _predict_ok(state: Served, params: dict[str, str]) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "the model's answer (JSON; NDJSON or SSE when the "
                                         "model streams)",
                          "content": {_JSON: {"schema": {}}, STREAM_TYPES[1]: {"schema": {}},
                                      STREAM_TYPES[0]: {"schema": {
                                          "type": "object", "required": ["data"],
                                          "properties": {"data": {"type": "string"},
                                                         "event": {"enum": ["end", "error"]}}}}}}
    if _endpoint_of(state, params).cache_settings is not None:
        ok["headers"] = {CACHE_HEADER: {
            "description": "hit: answered from the response cache; miss: computed",
            "schema": {"type": "string", "enum": ["hit", "miss"]}}}
    return ok


_MODEL_ENTRY = {"type": "object", "required": ["id", "name", "kind", "url", "status", "revision"],
                "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                               "kind": {"type": "string"}, "url": {"type": "string"},
                               "revision": {"type": "integer"}, "status": {"type": "object"}}}
_RELOADED = {"type": "object",
             "required": ["model", "revision", "previous_revision", "load_seconds", "drained"],
             "properties": {"model": {"type": "string"}, "revision": {"type": "integer"},
                            "previous_revision": {"type": "integer"},
                            "load_seconds": {"type": "number"}, "drained": {"type": "boolean"},
                            "versions": {"type": "array", "items": {"type": "string"}}}}
_VERSION_ENTRY = {"type": "object", "required": ["version", "weight", "share", "role", "state"],
                  "properties": {"version": {"type": "string"}, "weight": {"type": "number"},
                                 "share": {"type": "number"},
                                 "role": {"enum": ["stable", "canary", "shadow", "standby"]},
                                 "state": {"enum": ["unloaded", "loading", "loaded",
                                                    "unloading", "failed"]}}}
_VERSIONS = {"type": "object", "required": ["model", "stable", "shadow", "versions"],
             "properties": {"model": {"type": "string"}, "stable": {"type": "string"},
                            "shadow": {"type": ["string", "null"]},
                            "rollback": {"type": "object"},
                            "versions": {"type": "array", "items": _VERSION_ENTRY}}}
_VERSIONS_OK = {"description": "the model's versions, their weights and shares",
                "content": {_JSON: {"schema": _VERSIONS}}}
_WEIGHT_BODY = {"required": True, "content": {_JSON: {"schema": {
    "type": "object", "required": ["weight"], "additionalProperties": False,
    "properties": {"weight": {"type": "number", "minimum": 0, "maximum": 100}}}}}}
_PREDICT_ERRORS = (400, 413, 415, 429, 499, 500, 502, 503, 504)

ROUTES = [
    Route("/v1/models/<name>/predict", "predict", _predict, IPCSERVE_ERRORS, ("POST",),
          summary="run model {name}", tag="predict", ok=_predict_ok, errors=_PREDICT_ERRORS,
          request=_predict_body, expand=_each_model),
    Route("/predict", "predict_default", _predict, IPCSERVE_ERRORS, ("POST",),
          summary="run the default model", tag="predict", ok=_predict_ok,
          errors=_PREDICT_ERRORS, request=_predict_body, expand=_default_model),
    Route("/v1/models", "models", _models, IPCSERVE_ERRORS, summary="the served models",
          tag="models", ok={"description": "OK", "content": {_JSON: {"schema": {
              "type": "object", "required": ["object", "data"],
              "properties": {"object": {"const": "list"},
                             "data": {"type": "array", "items": _MODEL_ENTRY},
                             "default": {"type": ["string", "null"]}}}}}}),
    Route("/v1/models/<name>", "model", _model, IPCSERVE_ERRORS, summary="model {name}",
          tag="models", ok={"description": "OK", "content": {_JSON: {"schema": _MODEL_ENTRY}}},
          expand=_each_model),
    Route("/v1/models/<name>/versions", "versions", _versions, IPCSERVE_ERRORS,
          summary="the versions of {name}: weights, shares, load state, outcomes",
          tag="models", ok=_VERSIONS_OK, expand=_each_model),
    Route("/v1/models/<name>/versions/<version>/promote", "promote", _promote,
          IPCSERVE_ERRORS, ("POST",), tag="models", ok=_VERSIONS_OK, expand=_each_version,
          summary="make version {version} of {name} the stable one (it gets the traffic the "
                  "canaries do not)"),
    Route("/v1/models/<name>/versions/<version>/weight", "weight", _weight, IPCSERVE_ERRORS,
          ("POST",), tag="models", ok=_VERSIONS_OK, errors=(400, 409), expand=_each_version,
          request=lambda state, params: _WEIGHT_BODY,
          summary="give canary {version} of {name} a percent of the traffic"),
    Route("/v1/models/<name>/versions/rollback", "rollback", _roll_back, IPCSERVE_ERRORS,
          ("POST",), tag="models", ok=_VERSIONS_OK, expand=_each_model,
          summary="every canary of {name} to weight 0: all traffic to the stable version"),
    Route("/v1/models/<name>/reload", "reload", _reload, IPCSERVE_ERRORS, ("POST",),
          summary="load a new version of {name} and switch to it without dropping a request",
          tag="models", ok={"description": "the new version serves",
                            "content": {_JSON: {"schema": _RELOADED}}},
          errors=(409, 503), expand=_each_model, responses={"500": {
              "description": "the new version failed to load; the old one keeps serving",
              "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}}),
]
