"""Tensor signatures: which named, typed tensors a model takes and gives, and V2 tensors
to and from numpy arrays.

A model takes part in the V2 protocol (:mod:`.v2` over REST, :mod:`.v2_grpc` over gRPC)
when it has a signature: its declared ``tensor_signature`` (``{"inputs": [{"name",
"datatype", "shape"}], "outputs": [...]}``, the first dimension of each being the batch),
else the inputs and outputs of the ONNX graph its ``path`` names, read once in the web
process. The native route's OpenAPI schema uses it too (one sample: each input without its
batch dimension). A model says which V2 ``platform`` it is with ``tensor_platform``
(default ``"python"``).

Both V2 surfaces check a request's tensors here, with the same messages naming the field
(``inputs[0].shape``), and make the model's items here: one per row, numpy views on the
request's own bytes where the tensor came raw (the binary extension, gRPC's
``raw_input_contents``), so a large tensor reaches the ML process (through shared memory)
without ever becoming JSON text or Python lists.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from ..engine.errors import InputError, ModelError
from ..engine.mlprocess import MLProcess

__all__ = ["DATATYPES", "EXTENSIONS", "FROM_NUMPY", "MAX_ROWS", "array_from_bytes", "array_from_values",
           "check_input", "check_sample", "items_of", "output_array", "platform_of",
           "raw_bytes", "sample_schema", "signature_of"]

logger = logging.getLogger(__name__)

#: V2 datatype -> numpy dtype name.
DATATYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
#: numpy dtype name -> V2 datatype.
FROM_NUMPY = {v: k for k, v in DATATYPES.items()}
#: The most rows (first dimension) one request may carry.
MAX_ROWS = 1024
#: The V2 protocol extensions this server has (REST ``GET /v2``, gRPC ServerMetadata).
EXTENSIONS = ("binary_tensor_data",)
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


# -- V2 tensors ------------------------------------------------------------------------
def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_input(name: Any, datatype: Any, shape: Any, where: str,
                declared: dict[str, dict[str, Any]]) -> tuple[str, str, list[int]]:
    """Check one input tensor's name, datatype and shape against the model's inputs
    (``declared``: the signature's inputs by name). Returns the three, checked.

    Raises:
        InputError: naming the field, e.g. ``inputs[0].shape: input 'pixels' has the shape
            [-1, 64] (-1: any), got [1, 63]``.
    """
    if not isinstance(name, str):
        raise InputError(f"{where}.name must be a string")
    spec = declared.get(name)
    if spec is None:
        raise InputError(f"{where}.name: this model takes the inputs {list(declared)}, "
                         f"got {name!r}")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InputError(f"{where}.datatype must be one of {', '.join(DATATYPES)}, "
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
    return name, datatype, shape


def _count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def array_from_values(data: Any, datatype: str, shape: list[int], where: str) -> Any:
    """A tensor given as a list of values (V2 JSON ``data``, gRPC typed ``contents``) as a
    numpy array of ``shape``; ``where`` names the field in messages (``inputs[0].data``).

    Raises:
        InputError: not a list, values that do not convert, the wrong number of values,
            or a value a float datatype cannot hold (JSON's 1e300 as FP32).
    """
    import numpy as np

    try:
        array = np.asarray(data, dtype=DATATYPES[datatype])
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{where} does not convert to {datatype}") from None
    count = _count(shape)
    if array.size != count:
        raise InputError(f"{where}: shape {shape} needs {count} values, got {array.size}")
    if datatype.startswith("FP") and not np.isfinite(array).all():
        raise InputError(f"{where}: values must be finite")
    return array.reshape(shape)


def _wire_dtype(datatype: str) -> Any:
    import numpy as np

    # The protocol's raw tensors are little-endian, whatever this machine is.
    return np.dtype(DATATYPES[datatype]).newbyteorder("<")


def array_from_bytes(raw: Any, datatype: str, shape: list[int], where: str) -> Any:
    """A tensor given raw (little-endian, row-major: the V2 binary extension, gRPC's
    ``raw_input_contents``) as a numpy array of ``shape``: a view on ``raw``, no copy.

    Raises:
        InputError: ``raw``'s size is not what ``shape`` and ``datatype`` make.
    """
    import numpy as np

    dtype = _wire_dtype(datatype)
    size = _count(shape) * dtype.itemsize
    if len(memoryview(raw).cast("B")) != size:
        raise InputError(f"{where}: shape {shape} of {datatype} is {size} bytes, got "
                         f"{len(memoryview(raw).cast('B'))} bytes of raw data")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def items_of(given: dict[str, Any], signature: dict[str, Any]) -> list[Any]:
    """The model's items, one per row: the row of the one input, or ``{name: row}`` for a
    model of several inputs. Rows are views on the arrays, not copies.

    Raises:
        InputError: an input missing, or inputs whose first (batch) dimensions differ.
    """
    declared = [spec["name"] for spec in signature["inputs"]]
    if sorted(given) != sorted(declared):
        raise InputError(f"this model takes the inputs {declared}, got {list(given)}")
    rows = {len(a) for a in given.values()}
    if len(rows) != 1:
        raise InputError("every input must have the same first (batch) dimension")
    if len(declared) == 1:
        return list(given[declared[0]])
    return [{name: given[name][row] for name in declared} for row in range(rows.pop())]


def output_array(results: list[Any], name: str, signature: dict[str, Any]) -> Any:
    """Output ``name`` of the model's answers (one per row) as one array, in the datatype
    the signature declares (FP64 where the answer is of no V2 datatype).

    Raises:
        ModelError: an answer has no tensor ``name``.
    """
    import numpy as np

    values = [r[name] if isinstance(r, dict) and name in r else r for r in results]
    if any(isinstance(v, dict) for v in values):
        raise ModelError(f"the model's answer has no tensor {name!r}")
    array = np.asarray([np.asarray(v) for v in values])
    declared = next((o.get("datatype") for o in signature["outputs"] if o["name"] == name), None)
    if declared in DATATYPES:
        array = array.astype(DATATYPES[declared])
    if array.dtype.name not in FROM_NUMPY:
        array = array.astype("float64")
    return array


def raw_bytes(array: Any) -> bytes:
    """An array as the protocol's raw tensor bytes (little-endian, row-major)."""
    import numpy as np

    wire = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(wire).tobytes()
