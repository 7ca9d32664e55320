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

from ..engine.mlprocess import MLProcess

__all__ = ["DATATYPES", "FROM_NUMPY", "platform_of", "sample_schema", "signature_of"]

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


def sample_schema(tensor: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one sample of ``tensor`` (its shape without the batch dimension)."""
    datatype = tensor.get("datatype", "")
    schema: dict[str, Any] = {"type": "number" if datatype.startswith("FP") else
                              "boolean" if datatype == "BOOL" else "integer"}
    for dim in reversed(list(tensor.get("shape", []))[1:]):
        schema = {"type": "array", "items": schema}
        if isinstance(dim, int) and dim >= 0:
            schema.update(minItems=dim, maxItems=dim)
    return schema
