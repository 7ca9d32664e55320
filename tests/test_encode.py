"""``encode.fast_json`` (orjson, when installed) gives the same document as the standard
path (``to_jsonable`` + ``json``), and declines what it does not take as is."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ipcserve.http import encode

SAME = [
    {"label": 3, "probabilities": [0.1, 0.2, 0.7]},
    np.arange(384, dtype=np.float32) / 7,                     # an embedding
    {"b": (1, 2.5, None), "a": [True, False, "x"]},          # tuples, key order
    [math.nan, math.inf, -math.inf, 1e16, -0.0, 2 ** 63 - 1],  # NaN/inf -> null
    {"nested": [[np.float32(0.5), np.int64(7)], {"k": np.array([[1, 2], [3, 4]])}]},
    "text", 7, None,
]


@pytest.mark.parametrize("value", SAME, ids=range(len(SAME)))
def test_the_fast_path_gives_the_standard_document(value: object) -> None:
    standard = json.loads(json.dumps(encode.to_jsonable(value), sort_keys=True))
    fast = encode.fast_json(value)
    if fast is None:
        pytest.importorskip("orjson", reason="the fast path needs orjson (ipcserve[fast])")
        raise AssertionError("orjson is installed but the fast path declined plain data")
    assert fast.endswith(b"\n")
    assert json.loads(fast) == standard


@pytest.mark.parametrize("value", [{1: "a"}, 2 ** 70, {"x": b"bytes"}, {"s": {1, 2}}, object()],
                         ids=["int-key", "big-int", "bytes", "set", "object"])
def test_what_orjson_does_not_take_as_is_goes_the_standard_way(value: object) -> None:
    assert encode.fast_json(value) is None
