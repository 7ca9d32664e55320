"""The Open Inference Protocol V2 over REST (KServe / Triton's HTTP API).

Routes (nested in ipcserve's blueprint, so they share its prefix and API key):
``GET /v2/health/live``, ``GET /v2/health/ready`` (open, like ``/healthz``), ``GET /v2``,
``GET /v2/models/<name>``, ``GET /v2/models/<name>/ready`` and
``POST /v2/models/<name>/infer`` with typed tensors (JSON; ``datatype``, ``shape``, ``data``).

A model takes part when it has a tensor signature: ONNX models (``OnnxModel`` and the
built-in digits model) from their graph, read once in the web process; any other model by
declaring it, e.g. ``ml.tensor_signature = {"inputs": [{"name": "x", "datatype": "FP32",
"shape": [-1, 4]}], "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}``.
The first dimension of each tensor is the batch: each row becomes one model call (one
sample, as the native endpoint takes it), so concurrent rows are batched by the engine.
Errors answer the protocol's ``{"error": "<message>"}`` with ipcserve's status.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from . import decode, encode
from ..engine.errors import InputError, IPCServeError, ModelError, NotFoundError, WorkerUnavailableError
from ..engine.mlprocess import MLProcess

__all__ = ["DATATYPES", "blueprint", "signature_of"]

logger = logging.getLogger(__name__)

#: V2 datatype -> numpy dtype name.
DATATYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
_FROM_NUMPY = {v: k for k, v in DATATYPES.items()}
_ORT_TYPES = {f"tensor({v})": k for k, v in DATATYPES.items() if not v.startswith("float")}
_ORT_TYPES.update({"tensor(float)": "FP32", "tensor(double)": "FP64",
                   "tensor(float16)": "FP16"})
_MAX_ROWS = 1024

_cache: dict[int, dict[str, Any] | None] = {}
_cache_lock = threading.Lock()


def _onnx_signature(path: str) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def spec(arg: Any) -> dict[str, Any]:
        shape = [d if isinstance(d, int) else -1 for d in (arg.shape or [])]
        return {"name": arg.name, "datatype": _ORT_TYPES.get(arg.type, "BYTES"), "shape": shape}

    return {"inputs": [spec(i) for i in session.get_inputs()],
            "outputs": [spec(o) for o in session.get_outputs()]}


def signature_of(ml: MLProcess) -> dict[str, Any] | None:
    """``{"inputs": [...], "outputs": [...]}`` (V2 tensor metadata) or None: the model's
    declared ``tensor_signature``, else its ONNX graph's inputs and outputs."""
    declared = getattr(ml, "tensor_signature", None)
    if declared is not None:
        return dict(declared)
    with _cache_lock:
        if id(ml) in _cache:
            return _cache[id(ml)]
        path = getattr(ml, "path", None)
        if path is None and type(ml).__name__ == "DigitsClassifier":
            from ..adapters.digits import DIGITS_ONNX_PATH

            path = DIGITS_ONNX_PATH
        signature = None
        if path is not None and str(path).endswith(".onnx"):
            try:
                signature = _onnx_signature(str(path))
            except Exception:  # pragma: no cover - an unreadable graph: no V2 for it
                logger.exception("model %s: cannot read the ONNX graph's signature", ml.name)
        _cache[id(ml)] = signature
        return signature


def blueprint() -> Blueprint:
    """The V2 routes; :class:`ipcserve.IPCServe` nests them in its own blueprint."""
    bp = Blueprint("v2", __name__)
    bp.register_error_handler(IPCServeError, _error)
    bp.register_error_handler(HTTPException, _error)
    bp.register_error_handler(Exception, _internal_error)
    bp.add_url_rule("/v2/health/live", "live", _live)
    bp.add_url_rule("/v2/health/ready", "ready", _ready)
    bp.add_url_rule("/v2", "server", _server)
    bp.add_url_rule("/v2/models/<name>", "model", _model)
    bp.add_url_rule("/v2/models/<name>/ready", "model_ready", _model_ready)
    bp.add_url_rule("/v2/models/<name>/infer", "infer", _infer, methods=["POST"])
    return bp


#: Endpoints that answer without the API key (health checks).
OPEN_ENDPOINTS = ("ipcserve.v2.live", "ipcserve.v2.ready")


def _error(exc: IPCServeError | HTTPException) -> Response:
    from .extension import error_response

    response = error_response(exc)  # status and Retry-After as everywhere else
    message = (response.get_json(silent=True) or {}).get("error", "")
    body = jsonify({"error": message})
    body.status_code = response.status_code
    if "Retry-After" in response.headers:
        body.headers["Retry-After"] = response.headers["Retry-After"]
    return body


def _internal_error(exc: Exception) -> Response:
    logger.exception("unhandled error in %s %s", request.method, request.path)
    response = jsonify({"error": "the server hit an unexpected error; see its log"})
    response.status_code = 500
    return response


def _endpoints() -> dict[str, Any]:
    endpoints: dict[str, Any] = current_app.extensions["ipcserve"].ext.endpoints
    return endpoints


def _tensor_model(name: str) -> tuple[MLProcess, dict[str, Any]]:
    endpoint = _endpoints().get(name)
    signature = None if endpoint is None else signature_of(endpoint.ml)
    if endpoint is None or signature is None:
        known = sorted(n for n, e in _endpoints().items() if signature_of(e.ml) is not None)
        raise NotFoundError(f"no model named {name!r} with a tensor signature; models: "
                            f"{', '.join(known) or 'none'}")
    return endpoint.ml, signature


def _live() -> Response:
    return jsonify({"live": True})


def _ready() -> Response:
    ext = current_app.extensions["ipcserve"].ext
    ready = bool(ext.endpoints) and all(e.ml.ready for e in ext.endpoints.values()) \
        and not ext.draining.is_set()
    response = jsonify({"ready": ready})
    response.status_code = 200 if ready else 503
    return response


def _server() -> Response:
    from .. import __version__

    return jsonify({"name": "ipcserve", "version": __version__, "extensions": []})


def _model(name: str) -> Response:
    ml, signature = _tensor_model(name)
    return jsonify({"name": name, "versions": ["1"], "platform": _platform(ml),
                    "inputs": signature["inputs"], "outputs": signature["outputs"]})


def _platform(ml: MLProcess) -> str:
    kind = type(ml).__name__
    if kind in ("OnnxModel", "DigitsClassifier"):
        return "onnxruntime_onnx"
    if kind == "TorchModel":
        return "pytorch_libtorch"
    return "python"


def _model_ready(name: str) -> Response:
    ml, _ = _tensor_model(name)
    response = jsonify({"name": name, "ready": bool(ml.ready)})
    response.status_code = 200 if ml.ready else 503
    return response


def _tensor(item: Any, where: str) -> tuple[str, Any]:
    import numpy as np

    if not isinstance(item, dict):
        raise InputError(f"{where} must be an object with name, datatype, shape and data")
    name, datatype, shape, data = (item.get(k) for k in ("name", "datatype", "shape", "data"))
    if not isinstance(name, str):
        raise InputError(f"{where}: 'name' must be a string")
    if datatype not in DATATYPES:
        raise InputError(f"input {name!r}: datatype must be one of {', '.join(DATATYPES)}, "
                         f"got {datatype!r}")
    if not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"input {name!r}: 'shape' must be a non-empty list of integers >= 0")
    if data is None:
        raise InputError(f"input {name!r}: 'data' is missing")
    try:
        array = np.asarray(data, dtype=DATATYPES[datatype])
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"input {name!r}: 'data' does not convert to {datatype}") from None
    count = int(np.prod(shape))
    if array.size != count:
        raise InputError(f"input {name!r}: shape {shape} needs {count} values, got {array.size}")
    if datatype.startswith("FP") and not np.isfinite(array).all():
        raise InputError(f"input {name!r}: values must be finite")
    return name, array.reshape(shape)


def _infer(name: str) -> Response:
    import numpy as np

    ml, signature = _tensor_model(name)
    ext = current_app.extensions["ipcserve"].ext
    if ext.draining.is_set():
        raise WorkerUnavailableError("the server is shutting down")
    body = decode.parse_json_object(request.get_data(cache=False))
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError("'inputs' must be a non-empty list of tensors")
    tensors = dict(_tensor(item, f"inputs[{i}]") for i, item in enumerate(inputs))
    declared = [spec["name"] for spec in signature["inputs"]]
    if sorted(tensors) != sorted(declared):
        raise InputError(f"this model takes the inputs {declared}, got {sorted(tensors)}")
    rows = {len(a) for a in tensors.values()}
    if len(rows) != 1:
        raise InputError("every input must have the same first (batch) dimension")
    count = rows.pop()
    if count > _MAX_ROWS:
        raise InputError(f"at most {_MAX_ROWS} rows per request, got {count}")
    wanted = body.get("outputs")
    names = [spec["name"] for spec in signature["outputs"]]
    if wanted is not None:
        if not isinstance(wanted, list) or not all(
                isinstance(o, dict) and o.get("name") in names for o in wanted):
            raise InputError(f"'outputs' must list outputs of this model by name: {names}")
        names = [o["name"] for o in wanted]
    deadline = time.monotonic() + ml.config.timeout
    results = []
    for row in range(count):
        sample = {k: v[row] for k, v in tensors.items()}
        args = (sample[declared[0]],) if len(declared) == 1 else (sample,)
        _, admission = _endpoints()[name].admit()  # the version serving now (reloads)
        with admission:
            results.append(admission.call(args, {}, deadline=deadline).value)
    outputs = []
    for out_name in names:
        values = [r[out_name] if isinstance(r, dict) and out_name in r else r for r in results]
        if any(isinstance(v, dict) for v in values):
            raise ModelError(f"the model's answer has no tensor {out_name!r}")
        array = np.asarray([np.asarray(v) for v in values])
        declared_type = next((o.get("datatype") for o in signature["outputs"]
                              if o["name"] == out_name), None)
        if declared_type in DATATYPES:
            array = array.astype(DATATYPES[declared_type])
        datatype = _FROM_NUMPY.get(array.dtype.name)
        if datatype is None:
            array = array.astype("float64")
            datatype = "FP64"
        outputs.append({"name": out_name, "datatype": datatype, "shape": list(array.shape),
                        "data": encode.to_jsonable(array.reshape(-1))})
    answer: dict[str, Any] = {"model_name": name, "model_version": "1", "outputs": outputs}
    if isinstance(body.get("id"), str):
        answer["id"] = body["id"]
    return jsonify(answer)
