"""The Open Inference Protocol V2 over REST (KServe / Triton's HTTP API).

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready`` (open, like ``/healthz`` and
``/readyz``, and as ready as ``/readyz``), ``GET /v2``, ``GET /v2/models/<name>``,
``GET /v2/models/<name>/ready`` and ``POST /v2/models/<name>/infer`` with typed tensors
(JSON: ``datatype``, ``shape``, ``data``), or with the binary tensor data extension: the
``Inference-Header-Content-Length`` header says how long the JSON header is, and the raw
bytes of each input with ``parameters.binary_data_size`` follow it, in order; an output
asked for with ``parameters.binary_data`` (or every output, with the request's
``parameters.binary_data_output``) is answered the same way. tritonclient's HTTP client
sends and asks for binary data by default. A raw tensor reaches the model as a numpy view
on the request's bytes: never JSON text, never a Python list.

A model takes part when it has a tensor signature (:mod:`.tensors`). The first dimension of
each tensor is the batch: the rows of one request go to the model as ONE request of
several items (``MLProcess.call_batch``: one admission, one round trip, handed to
``predict_batch`` together where the model has it), through the serving core like every
other surface (deadline from arrival, cancellation when the client leaves, metrics).
Every malformed request is a 400 whose message names the field (``inputs[0].shape``).
Errors answer the protocol's ``{"error": "<message>"}`` with ipcserve's status.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response, jsonify, request

from .. import __version__
from ..engine.errors import InputError, NotFoundError
from . import decode, encode, tensors
from .routes import Route, Surface
from .serving import Endpoint, Failure, Served, exchange, served

__all__ = ["BINARY_HEADER", "MAX_ROWS", "ROUTES", "V2_ERRORS"]

#: The most rows (first dimension) one request may carry.
MAX_ROWS = tensors.MAX_ROWS
#: The binary tensor data extension's header: the length of the body's JSON part.
BINARY_HEADER = "Inference-Header-Content-Length"
_KEYS = ("id", "parameters", "inputs", "outputs")
_BINARY = "application/octet-stream"


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
    return jsonify({"name": "ipcserve", "version": __version__, "extensions": list(tensors.EXTENSIONS)})


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
def _header_length(data: bytes) -> int | None:
    """The binary extension's JSON header length, or None for a JSON-only request."""
    raw = request.headers.get(BINARY_HEADER)
    if raw is None:
        return None
    if not raw.strip().isdigit() or int(raw) > len(data):
        raise InputError(f"the {BINARY_HEADER} header must be the JSON header's length in "
                         f"bytes, from 0 to the body's {len(data)}, got {raw!r}")
    return int(raw)


def _binary_size(params: dict[str, Any], where: str) -> int | None:
    size = params.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InputError(f"{where}.parameters.binary_data_size must be an integer >= 0")
    return size


def _inputs(body: dict[str, Any], signature: dict[str, Any], binary: memoryview | None
            ) -> dict[str, Any]:
    """The input tensors by name, as numpy arrays: from ``data`` (JSON), or views on the
    binary part of the body (``binary_data_size``), in the order of ``inputs``."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError("'inputs' must be a non-empty list of tensors")
    declared = {spec["name"]: spec for spec in signature["inputs"]}
    given: dict[str, Any] = {}
    offset = 0
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise InputError(f"{where} must be an object with name, datatype, shape and data")
        name, datatype, shape = tensors.check_input(item.get("name"), item.get("datatype"),
                                                    item.get("shape"), where, declared)
        params = item.get("parameters", {})
        if not isinstance(params, dict):
            raise InputError(f"{where}.parameters must be an object")
        size = _binary_size(params, where)
        if size is None:
            if not isinstance(item.get("data"), list):
                raise InputError(f"{where}.data must be a list of {datatype} values")
            array = tensors.array_from_values(item["data"], datatype, shape, f"{where}.data")
        elif binary is None:
            raise InputError(f"{where}.parameters.binary_data_size: binary data needs the "
                             f"{BINARY_HEADER} header (the JSON header's length)")
        elif "data" in item:
            raise InputError(f"{where}.data: a tensor sent as binary data "
                             "(binary_data_size) has no data field")
        elif offset + size > len(binary):
            raise InputError(f"{where}.parameters.binary_data_size: {size} bytes from offset "
                             f"{offset}, but the binary data is {len(binary)} bytes")
        else:
            array = tensors.array_from_bytes(binary[offset:offset + size], datatype, shape,
                                             f"{where}.parameters.binary_data_size")
            offset += size
        if name in given:
            raise InputError(f"{where}.name: input {name!r} is given twice")
        given[name] = array
    if binary is not None and offset != len(binary):
        raise InputError(f"the body has {len(binary) - offset} bytes of binary data that no "
                         "input's parameters.binary_data_size claims")
    return given


def _flag(params: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InputError(f"{where}.{key} must be true or false")
    return value


def _outputs_wanted(body: dict[str, Any], signature: dict[str, Any]) -> list[tuple[str, bool]]:
    """The outputs to answer, each with whether it goes as binary data."""
    names = [spec["name"] for spec in signature["outputs"]]
    binary = _flag(body.get("parameters", {}), "binary_data_output", "parameters", False)
    wanted = body.get("outputs")
    if wanted is None:
        return [(name, binary) for name in names]
    if not isinstance(wanted, list):
        raise InputError(f"'outputs' must be a list of {{\"name\"}} objects; outputs: {names}")
    chosen = []
    for i, out in enumerate(wanted):
        if not isinstance(out, dict) or out.get("name") not in names:
            raise InputError(f"outputs[{i}].name must be an output of this model: {names}")
        params = out.get("parameters", {})
        if not isinstance(params, dict):
            raise InputError(f"outputs[{i}].parameters must be an object")
        if params.get("classification"):
            raise InputError(f"outputs[{i}].parameters.classification: this server does not "
                             "have the classification extension")
        chosen.append((out["name"], _flag(params, "binary_data", f"outputs[{i}].parameters",
                                          binary)))
    return chosen


def _items(body: dict[str, Any], signature: dict[str, Any], binary: memoryview | None
           ) -> list[Any]:
    """The model's items, one per row: the row of the one input, or ``{name: row}``."""
    unknown = sorted(set(body) - set(_KEYS))
    if unknown:
        raise InputError(f"unknown field(s) {unknown}; a V2 request has {list(_KEYS)}")
    if "id" in body and not isinstance(body["id"], str):
        raise InputError("'id' must be a string")
    if not isinstance(body.get("parameters", {}), dict):
        raise InputError("'parameters' must be an object")
    return tensors.items_of(_inputs(body, signature, binary), signature)


def _answer(name: str, body: dict[str, Any], outputs: list[tuple[str, Any, bool]]) -> Response:
    """The infer answer: JSON, or (an output asked for as binary data) the JSON header then
    each binary output's raw bytes, its length in the extension's header."""
    answer: dict[str, Any] = {"model_name": name, "model_version": "1", "outputs": []}
    raw: list[bytes] = []
    for out, array, binary in outputs:
        datatype = tensors.FROM_NUMPY[array.dtype.name]
        tensor: dict[str, Any] = {"name": out, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw.append(tensors.raw_bytes(array))
            tensor["parameters"] = {"binary_data_size": len(raw[-1])}
        else:
            tensor["data"] = encode.to_jsonable(array.reshape(-1))
        answer["outputs"].append(tensor)
    if "id" in body:
        answer["id"] = body["id"]
    if not raw:
        return jsonify(answer)
    header = json.dumps(answer, separators=(",", ":")).encode()
    response = Response(b"".join([header, *raw]), content_type=_BINARY)
    response.headers[BINARY_HEADER] = str(len(header))
    return response


def _infer(name: str) -> Response:
    endpoint, signature = _tensor_model(name)
    with exchange(endpoint) as ex:
        ex.admit()  # before the body is parsed: under overload it never is
        data = request.get_data(cache=False)
        length = _header_length(data)
        if length is None:
            body, binary = decode.parse_json_object(data), None
        else:
            body = decode.parse_json_object(data[:length])
            binary = memoryview(data)[length:]  # the tensors are views on it: no copy
        items = _items(body, signature, binary)
        wanted = _outputs_wanted(body, signature)
        results = ex.call_batch(items).value
        return _answer(name, body, [(out, tensors.output_array(results, out, signature), raw)
                                    for out, raw in wanted])


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
    json_body = {"schema": {
        "type": "object", "required": ["inputs"], "additionalProperties": False,
        "properties": {"id": {"type": "string"}, "parameters": {"type": "object"},
                       "inputs": {"type": "array", "minItems": len(inputs),
                                  "maxItems": len(inputs),
                                  "items": {"oneOf": [_input_schema(s) for s in inputs]}},
                       "outputs": {"type": "array", "items": {
                           "type": "object", "required": ["name"], "additionalProperties": False,
                           "properties": {"name": {"enum": outputs},
                                          "parameters": {"type": "object"}}}}}}}
    return {"required": True, "content": {_JSON: json_body, _BINARY: {"schema": {
        "type": "string", "format": "binary",
        "description": f"the binary tensor data extension: the JSON request (its length in "
                       f"the {BINARY_HEADER} header), then the raw little-endian bytes of "
                       "each input whose parameters.binary_data_size says how many, in the "
                       "order of inputs"}}}}


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _binary_ok(ok: dict[str, Any]) -> dict[str, Any]:
    ok["content"][_BINARY] = {"schema": {
        "type": "string", "format": "binary",
        "description": f"an output was asked for as binary data: the JSON answer (its length "
                       f"in the {BINARY_HEADER} header), then those outputs' raw bytes"}}
    ok["headers"] = {BINARY_HEADER: {"schema": {"type": "integer", "minimum": 0},
                                     "description": "with binary outputs: the JSON part's length"}}
    return ok


_BINARY_PARAMETER = {"name": BINARY_HEADER, "in": "header", "required": False,
                     "schema": {"type": "integer", "minimum": 0},
                     "description": "the binary tensor data extension: the length in bytes of "
                                    "the JSON part of an application/octet-stream body"}
_READY = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
_MODEL_READY = {"type": "object", "required": ["name", "ready"],
                "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}
_OUTPUT = {"type": "object", "required": ["name", "datatype", "shape"],
           "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                          "shape": {"type": "array", "items": {"type": "integer"}},
                          "data": {"type": "array"}, "parameters": {"type": "object"}}}

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
          errors=(400, 413, 429, 499, 500, 502, 503, 504), parameters=(_BINARY_PARAMETER,),
          ok=_binary_ok(_ok({"type": "object", "required": ["model_name", "outputs"],
                             "properties": {"model_name": {"type": "string"},
                                            "model_version": {"type": "string"},
                                            "id": {"type": "string"},
                                            "outputs": {"type": "array", "items": _OUTPUT}}},
                            "the output tensors"))),
]
