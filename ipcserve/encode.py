"""Turn a model's result into something JSON can carry. No Flask import.

The counterpart of :mod:`ipcserve.decode` (HTTP bodies into model inputs): this module goes
the other way, from whatever ``predict`` returned to the JSON body of the answer.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MAX_RESULT_DEPTH", "to_jsonable"]

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
