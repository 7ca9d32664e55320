"""The Open Inference Protocol V2 over REST (KServe / Triton's HTTP API).

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready`` (open, like ``/healthz`` and
``/readyz``, and as ready as ``/readyz``), ``GET /v2``, ``GET /v2/models/<name>``,
``GET /v2/models/<name>/ready`` and ``POST /v2/models/<name>/infer`` with typed tensors
(JSON: ``datatype``, ``shape``, ``data``).

A model takes part when it has a tensor signature (:mod:`.tensors`). The first dimension of
each tensor is the batch: the rows of one request go to the model as ONE request of
several items (``MLProcess.call_batch``: one admission, one round trip, handed to
``predict_batch`` together where the model has it), through the serving core like every
other surface (deadline from arrival, cancellation when the client leaves, metrics).
Every malformed request is a 400 whose message names the field (``inputs[0].shape``).
Errors answer the protocol's ``{"error": "<message>"}`` with ipcserve's status.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request

from .. import __version__
from ..engine.errors import InputError, ModelError, NotFoundError
from . import decode, encode, tensors
from .routes import Route, Surface
from .serving import Endpoint, Failure, Served, exchange, served

__all__ = ["MAX_ROWS", "ROUTES", "V2_ERRORS"]

#: The most rows (first dimension) one request may carry.
MAX_ROWS = 1024
_KEYS = ("id", "parameters", "inputs", "outputs")


def _error_body(failure: Failure) -> dict[str, Any]:
    return {"error": failure.message}


#: The protocol's error shape.
V2_ERRORS = Surface("v2", _error_body, {"type": "object", "required": ["error"],
                                        "properties": {"error": {"type": "string"}}}, "V2Error")


def _tensor_model(name: str) -> tuple[Endpoint, dict[str, Any]]:
    models = served().models
    endpoint = models.endpoints.get(name)
    signature = None if endpoint is None else tensors.signature_of(endpoint.ml)
    if endpoint is None or signature is None:
        known = sorted(n for n, e in models.endpoints.items()
                       if tensors.signature_of(e.ml) is not None)
        raise NotFoundError(f"no model named {name!r} with a tensor signature; models: "
                            f"{', '.join(known) or 'none'}")
    return endpoint, signature


def _live() -> Response:
    return jsonify({"live": True})


def _ready() -> Response:
    ready = served().models.readiness().ready
    response = jsonify({"ready": ready})
    response.status_code = 200 if ready else 503
    return response


def _server() -> Response:
    return jsonify({"name": "ipcserve", "version": __version__, "extensions": []})


def _model(name: str) -> Response:
    endpoint, signature = _tensor_model(name)
    return jsonify({"name": name, "versions": ["1"], "platform": tensors.platform_of(endpoint.ml),
                    "inputs": signature["inputs"], "outputs": signature["outputs"]})


def _model_ready(name: str) -> Response:
    _tensor_model(name)
    ready = served().models.readiness().model_ready(name)
    response = jsonify({"name": name, "ready": ready})
    response.status_code = 200 if ready else 503
    return response


# -- infer ----------------------------------------------------------------------------
def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor(item: Any, where: str, declared: dict[str, dict[str, Any]]) -> tuple[str, Any]:
    """One input tensor, checked against the model's signature, as a numpy array."""
    import numpy as np

    if not isinstance(item, dict):
        raise InputError(f"{where} must be an object with name, datatype, shape and data")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str):
        raise InputError(f"{where}.name must be a string")
    spec = declared.get(name)
    if spec is None:
        raise InputError(f"{where}.name: this model takes the inputs {list(declared)}, "
                         f"got {name!r}")
    if not isinstance(datatype, str) or datatype not in tensors.DATATYPES:
        raise InputError(f"{where}.datatype must be one of {', '.join(tensors.DATATYPES)}, "
                         f"got {datatype!r}")
    if datatype != spec["datatype"]:
        raise InputError(f"{where}.datatype: input {name!r} is {spec['datatype']}, got {datatype}")
    if not isinstance(shape, list) or not shape or not all(_is_count(d) for d in shape):
        raise InputError(f"{where}.shape must be a non-empty list of integers >= 0")
    expected = spec["shape"]
    if len(shape) != len(expected) or any(e >= 0 and d != e for d, e in zip(shape[1:], expected[1:])):
        raise InputError(f"{where}.shape: input {name!r} has the shape {expected} (-1: any), "
                         f"got {shape}")
    if not 1 <= shape[0] <= MAX_ROWS:
        raise InputError(f"{where}.shape: the first (batch) dimension must be from 1 to "
                         f"{MAX_ROWS}, got {shape[0]}")
    if not isinstance(item.get("parameters", {}), dict):
        raise InputError(f"{where}.parameters must be an object")
    data = item.get("data")
    if not isinstance(data, list):
        raise InputError(f"{where}.data must be a list of {datatype} values")
    try:
        array = np.asarray(data, dtype=tensors.DATATYPES[datatype])
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{where}.data does not convert to {datatype}") from None
    count = int(np.prod(shape))
    if array.size != count:
        raise InputError(f"{where}.data: shape {shape} needs {count} values, got {array.size}")
    if datatype.startswith("FP") and not np.isfinite(array).all():
        raise InputError(f"{where}.data: values must be finite")
    return name, array.reshape(shape)


def _outputs_wanted(body: dict[str, Any], signature: dict[str, Any]) -> list[str]:
    names = [spec["name"] for spec in signature["outputs"]]
    wanted = body.get("outputs")
    if wanted is None:
        return names
    if not isinstance(wanted, list):
        raise InputError(f"'outputs' must be a list of {{\"name\"}} objects; outputs: {names}")
    for i, out in enumerate(wanted):
        if not isinstance(out, dict) or out.get("name") not in names:
            raise InputError(f"outputs[{i}].name must be an output of this model: {names}")
        if not isinstance(out.get("parameters", {}), dict):
            raise InputError(f"outputs[{i}].parameters must be an object")
    return [out["name"] for out in wanted]


def _items(body: dict[str, Any], signature: dict[str, Any]) -> list[Any]:
    """The model's items, one per row: the row of the one input, or ``{name: row}``."""
    unknown = sorted(set(body) - set(_KEYS))
    if unknown:
        raise InputError(f"unknown field(s) {unknown}; a V2 request has {list(_KEYS)}")
    if "id" in body and not isinstance(body["id"], str):
        raise InputError("'id' must be a string")
    if not isinstance(body.get("parameters", {}), dict):
        raise InputError("'parameters' must be an object")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError("'inputs' must be a non-empty list of tensors")
    declared = {spec["name"]: spec for spec in signature["inputs"]}
    given: dict[str, Any] = {}
    for i, item in enumerate(inputs):
        name, array = _tensor(item, f"inputs[{i}]", declared)
        if name in given:
            raise InputError(f"inputs[{i}].name: input {name!r} is given twice")
        given[name] = array
    if sorted(given) != sorted(declared):
        raise InputError(f"this model takes the inputs {list(declared)}, got {list(given)}")
    rows = {len(a) for a in given.values()}
    if len(rows) != 1:
        raise InputError("every input must have the same first (batch) dimension")
    names = list(declared)
    if len(names) == 1:
        return list(given[names[0]])
    return [{name: given[name][row] for name in names} for row in range(rows.pop())]


def _output(results: list[Any], name: str, signature: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    values = [r[name] if isinstance(r, dict) and name in r else r for r in results]
    if any(isinstance(v, dict) for v in values):
        raise ModelError(f"the model's answer has no tensor {name!r}")
    array = np.asarray([np.asarray(v) for v in values])
    declared = next((o.get("datatype") for o in signature["outputs"] if o["name"] == name), None)
    if declared in tensors.DATATYPES:
        array = array.astype(tensors.DATATYPES[declared])
    datatype = tensors.FROM_NUMPY.get(array.dtype.name)
    if datatype is None:
        array, datatype = array.astype("float64"), "FP64"
    return {"name": name, "datatype": datatype, "shape": list(array.shape),
            "data": encode.to_jsonable(array.reshape(-1))}


def _infer(name: str) -> Response:
    endpoint, signature = _tensor_model(name)
    with exchange(endpoint) as ex:
        ex.admit()  # before the body is parsed: under overload it never is
        body = decode.parse_json_object(request.get_data(cache=False))
        items = _items(body, signature)
        names = _outputs_wanted(body, signature)
        results = ex.call_batch(items).value
        answer: dict[str, Any] = {"model_name": name, "model_version": "1",
                                  "outputs": [_output(results, n, signature) for n in names]}
        if "id" in body:
            answer["id"] = body["id"]
        return jsonify(answer)


# -- the OpenAPI rows ------------------------------------------------------------------
_JSON = "application/json"


def _tensor_meta() -> dict[str, Any]:
    return {"type": "object", "required": ["name", "datatype", "shape"],
            "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                           "shape": {"type": "array", "items": {"type": "integer"}}}}


def _tensor_models(state: Served) -> list[dict[str, str]]:
    return [{"name": n} for n, e in state.models.endpoints.items()
            if tensors.signature_of(e.ml) is not None]


def _input_schema(spec: dict[str, Any]) -> dict[str, Any]:
    dims: list[dict[str, Any]] = [{"type": "integer", "minimum": 1, "maximum": MAX_ROWS}]
    dims += [{"const": d} if d >= 0 else {"type": "integer", "minimum": 0} for d in spec["shape"][1:]]
    rank = len(spec["shape"])
    return {"type": "object", "required": ["name", "datatype", "shape", "data"],
            "additionalProperties": False,
            "properties": {"name": {"const": spec["name"]}, "datatype": {"const": spec["datatype"]},
                           "shape": {"type": "array", "prefixItems": dims, "minItems": rank,
                                     "maxItems": rank},
                           "data": {"type": "array",
                                    "items": {"type": ["number", "boolean", "array"]}},
                           "parameters": {"type": "object"}}}


def _infer_body(state: Served, params: dict[str, str]) -> dict[str, Any]:
    signature = tensors.signature_of(state.models.get(params["name"]).ml) or {}
    inputs = signature.get("inputs", [])
    outputs = [o["name"] for o in signature.get("outputs", [])]
    return {"required": True, "content": {_JSON: {"schema": {
        "type": "object", "required": ["inputs"], "additionalProperties": False,
        "properties": {"id": {"type": "string"}, "parameters": {"type": "object"},
                       "inputs": {"type": "array", "minItems": len(inputs),
                                  "maxItems": len(inputs),
                                  "items": {"oneOf": [_input_schema(s) for s in inputs]}},
                       "outputs": {"type": "array", "items": {
                           "type": "object", "required": ["name"], "additionalProperties": False,
                           "properties": {"name": {"enum": outputs},
                                          "parameters": {"type": "object"}}}}}}}}}


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


_READY = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
_MODEL_READY = {"type": "object", "required": ["name", "ready"],
                "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}
_OUTPUT = {"type": "object", "required": ["name", "datatype", "shape", "data"],
           "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                          "shape": {"type": "array", "items": {"type": "integer"}},
                          "data": {"type": "array"}}}

ROUTES = [
    Route("/v2/health/live", "v2_live", _live, V2_ERRORS, open=True, tag="v2",
          summary="V2 liveness", ok=_ok({"type": "object", "required": ["live"],
                                          "properties": {"live": {"const": True}}})),
    Route("/v2/health/ready", "v2_ready", _ready, V2_ERRORS, open=True, tag="v2",
          summary="V2 readiness (as /readyz)", ok=_ok(_READY),
          responses={"503": _ok(_READY, "not ready, or draining")}),
    Route("/v2", "v2_server", _server, V2_ERRORS, tag="v2", summary="V2 server metadata",
          ok=_ok({"type": "object", "required": ["name", "version", "extensions"],
                  "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                 "extensions": {"type": "array", "items": {"type": "string"}}}})),
    Route("/v2/models/<name>", "v2_model", _model, V2_ERRORS, tag="v2",
          summary="V2 metadata of {name}", expand=_tensor_models,
          ok=_ok({"type": "object", "required": ["name", "platform", "inputs", "outputs"],
                  "properties": {"name": {"type": "string"}, "platform": {"type": "string"},
                                 "versions": {"type": "array", "items": {"type": "string"}},
                                 "inputs": {"type": "array", "items": _tensor_meta()},
                                 "outputs": {"type": "array", "items": _tensor_meta()}}})),
    Route("/v2/models/<name>/ready", "v2_model_ready", _model_ready, V2_ERRORS, tag="v2",
          summary="V2 readiness of {name}", expand=_tensor_models, ok=_ok(_MODEL_READY),
          responses={"503": _ok(_MODEL_READY, "not ready, or draining")}),
    Route("/v2/models/<name>/infer", "v2_infer", _infer, V2_ERRORS, ("POST",), tag="v2",
          summary="V2 inference on {name}", expand=_tensor_models, request=_infer_body,
          errors=(400, 413, 429, 499, 500, 502, 503, 504),
          ok=_ok({"type": "object", "required": ["model_name", "outputs"],
                  "properties": {"model_name": {"type": "string"},
                                 "model_version": {"type": "string"}, "id": {"type": "string"},
                                 "outputs": {"type": "array", "items": _OUTPUT}}},
                 "the output tensors")),
]
