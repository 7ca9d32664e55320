"""Tensor signatures: which named, typed tensors a model takes and gives.

A model takes part in the V2 protocol (:mod:`.v2`) when it has a signature: its declared
``tensor_signature`` (``{"inputs": [{"name", "datatype", "shape"}], "outputs": [...]}``,
the first dimension of each being the batch), else the inputs and outputs of the ONNX
graph its ``path`` names, read once in the web process. The native route's OpenAPI schema
uses it too (one sample: each input without its batch dimension). A model says which V2
``platform`` it is with ``tensor_platform`` (default ``"python"``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from ..engine.errors import InputError
from ..engine.mlprocess import MLProcess

__all__ = ["DATATYPES", "FROM_NUMPY", "check_sample", "platform_of", "sample_schema",
           "signature_of"]

logger = logging.getLogger(__name__)

#: V2 datatype -> numpy dtype name.
DATATYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
#: numpy dtype name -> V2 datatype.
FROM_NUMPY = {v: k for k, v in DATATYPES.items()}
_ORT_TYPES = {f"tensor({v})": k for k, v in DATATYPES.items() if not v.startswith("float")}
_ORT_TYPES.update({"tensor(float)": "FP32", "tensor(double)": "FP64",
                   "tensor(float16)": "FP16"})

# Per model object: a reload's new version reads its graph again.
_cache: weakref.WeakKeyDictionary[MLProcess, dict[str, Any] | None] = weakref.WeakKeyDictionary()
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
        if ml in _cache:
            return _cache[ml]
        path = getattr(ml, "path", None)
        signature = None
        if path is not None and str(path).endswith(".onnx"):
            try:
                signature = _onnx_signature(str(path))
            except Exception:  # an unreadable graph: no V2 for it, said once
                logger.exception("model %s: cannot read the ONNX graph's signature", ml.name)
        _cache[ml] = signature
        return signature


def platform_of(ml: MLProcess) -> str:
    """The model's V2 platform name (``onnxruntime_onnx``, ``pytorch_libtorch``, ``python``)."""
    return str(getattr(ml, "tensor_platform", "python"))


def _bounds(datatype: str) -> tuple[float, float] | None:
    """The smallest and largest value of a numeric datatype (None: BOOL, or any JSON number)."""
    import numpy as np

    if datatype == "BOOL" or datatype == "FP64":
        return None
    dtype = np.dtype(DATATYPES[datatype])
    info = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
    return float(info.min), float(info.max)


def sample_schema(tensor: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one sample of ``tensor`` (its shape without the batch dimension),
    values bounded to what the datatype holds; :func:`check_sample` enforces the same."""
    datatype = tensor.get("datatype", "")
    schema: dict[str, Any] = {"type": "number" if datatype.startswith("FP") else
                              "boolean" if datatype == "BOOL" else "integer"}
    bounds = _bounds(datatype) if datatype in DATATYPES else None
    if bounds is not None:
        schema.update(minimum=bounds[0], maximum=bounds[1])
    for dim in reversed(list(tensor.get("shape", []))[1:]):
        schema = {"type": "array", "items": schema}
        if isinstance(dim, int) and dim >= 0:
            schema.update(minItems=dim, maxItems=dim)
    return schema


def _check_value(value: Any, dims: list[int], datatype: str, where: str) -> None:
    if dims:
        what = "lists" if len(dims) > 1 else "booleans" if datatype == "BOOL" else \
            "numbers" if datatype.startswith("FP") else "integers"
        count = f"{dims[0]} " if dims[0] >= 0 else ""
        if not isinstance(value, list) or (dims[0] >= 0 and len(value) != dims[0]):
            got = f"{len(value)}" if isinstance(value, list) else f"a {type(value).__name__}"
            raise InputError(f"field {where!r} must be a list of {count}{what} ({datatype}, "
                             f"shape {dims}), got {got}")
        for i, item in enumerate(value):
            _check_value(item, dims[1:], datatype, f"{where}[{i}]")
        return
    if datatype == "BOOL":
        if not isinstance(value, bool):
            raise InputError(f"field {where!r} must be true or false, got {value!r}")
        return
    integer = not datatype.startswith("FP")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and isinstance(value, float) and not value.is_integer()):
        raise InputError(f"field {where!r} must be {'an integer' if integer else 'a number'} "
                         f"({datatype}), got {value!r}")
    bounds = _bounds(datatype)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise InputError(f"field {where!r}: {value!r} is out of the range of {datatype}")


def check_sample(body: dict[str, Any], signature: dict[str, Any]) -> None:
    """Check a native JSON body against the tensor signature: one field per input, each one
    sample of it (its shape without the batch dimension, values its datatype holds).

    Raises:
        InputError: naming the field, e.g. ``field 'pixels' must be a list of 64``.
    """
    names = [spec["name"] for spec in signature["inputs"]]
    if sorted(body) != sorted(names):
        raise InputError(f"this model takes the fields {names}, got {sorted(body)}")
    for spec in signature["inputs"]:
        _check_value(body[spec["name"]], [int(d) for d in spec["shape"][1:]], spec["datatype"],
                     spec["name"])
