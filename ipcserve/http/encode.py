"""Turn a model's result into something JSON can carry. No Flask import.

The counterpart of :mod:`ipcserve.decode` (HTTP bodies into model inputs): this module goes
the other way, from whatever ``predict`` returned to the JSON body of the answer.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MAX_RESULT_DEPTH", "fast_json", "to_jsonable"]

_orjson: Any
try:  # optional (pip install "ipcserve[fast]"): serialises numbers and numpy arrays natively
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

#: Deepest nesting of lists, tuples and dicts a result may have, counting those a numpy
#: array's ``tolist()`` makes (one per dimension). Deeper results, and results that contain themselves, are refused with a
#: TypeError instead of exhausting the stack here or in ``json.dumps``.
MAX_RESULT_DEPTH = 100


def to_jsonable(value: Any) -> Any:
    """Make a model result JSON-serialisable.

    Numpy arrays and scalars (anything with ``.tolist()``) become lists and numbers, tuples
    become lists, dict keys become strings, and ``NaN``/``inf`` become ``None``.

    Args:
        value: what the model returned.

    Returns:
        The same data built from dicts, lists, str, int, float, bool and None only.

    Raises:
        TypeError: the result holds something JSON cannot carry (bytes, a set, an arbitrary
            object); the HTTP layer answers it with a 500 ``ModelError``.
    """
    try:
        return _jsonable(value, 0)
    except RecursionError:  # pragma: no cover - only if called with the stack nearly full
        raise TypeError(_too_deep()) from None


def _too_deep() -> str:
    return (f"the model returned a result nested more than {MAX_RESULT_DEPTH} levels deep, or "
            "one that contains itself; return flatter data")


def _jsonable(value: Any, depth: int) -> Any:
    # ``depth`` counts the lists and dicts around ``value``, so the recursion below is at most
    # MAX_RESULT_DEPTH frames deep, whatever the model returned.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (dict, list, tuple)):
        if depth >= MAX_RESULT_DEPTH:
            raise TypeError(_too_deep())
        if isinstance(value, dict):
            return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
        return [_jsonable(v, depth + 1) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars, tensors
        plain = value.tolist()
        if hasattr(plain, "tolist") and not isinstance(plain, (dict, list, tuple)):
            # Another tolist() object (perhaps itself): following it could loop forever.
            raise TypeError(f"the model returned a {type(value).__name__} whose tolist() gives "
                            f"a {type(plain).__name__}, which JSON cannot carry")
        return _jsonable(plain, depth)
    if isinstance(value, bytes):
        raise TypeError("the model returned bytes, which JSON cannot carry")
    raise TypeError(f"the model returned a {type(value).__name__}, which JSON cannot carry")


def fast_json(value: Any) -> bytes | None:
    """The JSON body for ``value`` through orjson when it is installed, else None (use
    :func:`to_jsonable` and the standard encoder).

    Same document as ``json.dumps(to_jsonable(value), sort_keys=True)`` up to number
    spelling (``1e16`` vs ``1e+16``; the same float64 values): ``NaN``/``inf`` become ``null``, numpy arrays and
    scalars become lists and numbers, tuples lists. Anything orjson does not take as is
    (dict keys that are not strings, integers past 64 bits, tensors, other objects, nesting
    past orjson's limit) returns None, so the standard path decides, errors included. For a
    384-float embedding it is ~20x cheaper than the standard path.
    """
    if _orjson is None:
        return None
    try:
        data: bytes = _orjson.dumps(value, default=_tolist,
                                    option=_orjson.OPT_SORT_KEYS | _orjson.OPT_APPEND_NEWLINE)
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        return None
    return data


def _tolist(value: Any) -> Any:
    """orjson's fallback for numpy arrays and scalars: ``tolist()`` (C code), as the standard
    path does, so a float32 comes out as the same float64 digits on both paths (orjson's own
    numpy support would spell it as a shorter float32)."""
    if hasattr(value, "tolist") and callable(value.tolist):
        plain = value.tolist()
        if not hasattr(plain, "tolist") or isinstance(plain, (dict, list, tuple)):
            return plain
    raise TypeError(type(value).__name__)
