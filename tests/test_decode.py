"""Request bodies to model inputs (ipcserve.decode) and results to JSON (ipcserve.encode).

Function-level tests with real inputs: real image files made by Pillow or written byte by
byte, real JSON text, real threads for the decode memory budget.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ipcserve import decode, encode


# -- encode: results to JSON ---------------------------------------------------------------

def test_encode_module_owns_to_jsonable() -> None:
    # decode.py is about HTTP bodies -> model inputs; results -> JSON live in encode.py.
    assert encode.__all__ == ["to_jsonable"]
    assert "to_jsonable" not in decode.__all__ and not hasattr(decode, "to_jsonable")


def test_to_jsonable_converts_numpy_and_non_finite() -> None:
    result = {"a": np.arange(3, dtype=np.int64), 1: (np.float32(0.5), math.nan, -math.inf), "ok": [True, None, "s"]}
    assert encode.to_jsonable(result) == {"a": [0, 1, 2], "1": [0.5, None, None], "ok": [True, None, "s"]}


@pytest.mark.parametrize("value, what", [(b"raw", "bytes"), (object(), "object"), ({"k": {1, 2}}, "set")])
def test_to_jsonable_refuses_what_json_cannot_carry(value: object, what: str) -> None:
    with pytest.raises(TypeError, match=what):
        encode.to_jsonable(value)
