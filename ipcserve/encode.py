"""Turn a model's result into something JSON can carry. No Flask import.

The counterpart of :mod:`ipcserve.decode` (HTTP bodies into model inputs): this module goes
the other way, from whatever ``predict`` returned to the JSON body of the answer.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["to_jsonable"]


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
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars, tensors
        return to_jsonable(value.tolist())
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        raise TypeError("the model returned bytes, which JSON cannot carry")
    raise TypeError(f"the model returned a {type(value).__name__}, which JSON cannot carry")
