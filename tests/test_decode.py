"""Request bodies to model inputs (ipcserve.http.decode) and results to JSON (ipcserve.http.encode).

Function-level tests with real inputs: real image files made by Pillow or written byte by
byte, real JSON text, real threads for the decode memory budget.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ipcserve.http import decode, encode
from ipcserve.engine.errors import InputError, UnsupportedMediaTypeError

# A complete EPS file: Pillow identifies it as EPS and, on load(), runs Ghostscript on it.
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"0 0 moveto 8 0 lineto 8 8 lineto closepath fill\nshowpage\n%%EOF\n")


def encoded(fmt: str, size: tuple[int, int] = (8, 6), mode: str = "RGB", **params: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 100, 50) if mode == "RGB" else 7).save(buf, format=fmt, **params)
    return buf.getvalue()


# -- encode: results to JSON ---------------------------------------------------------------

def test_encode_module_owns_to_jsonable() -> None:
    # decode.py is about HTTP bodies -> model inputs; results -> JSON live in encode.py.
    assert encode.__all__ == ["MAX_RESULT_DEPTH", "fast_json", "to_jsonable"]
    assert "to_jsonable" not in decode.__all__ and not hasattr(decode, "to_jsonable")


def test_to_jsonable_converts_numpy_and_non_finite() -> None:
    result = {"a": np.arange(3, dtype=np.int64), 1: (np.float32(0.5), math.nan, -math.inf), "ok": [True, None, "s"]}
    assert encode.to_jsonable(result) == {"a": [0, 1, 2], "1": [0.5, None, None], "ok": [True, None, "s"]}


def nested(levels: int, leaf: object = 1) -> object:
    """``levels`` lists one inside the other, built without recursion."""
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("value, what", [(b"raw", "bytes"), (object(), "object"), ({"k": {1, 2}}, "set")])
def test_to_jsonable_refuses_what_json_cannot_carry(value: object, what: str) -> None:
    with pytest.raises(TypeError, match=what):
        encode.to_jsonable(value)


@pytest.mark.parametrize("levels", [10_000, encode.MAX_RESULT_DEPTH + 1])
def test_to_jsonable_refuses_too_deep_results_without_recursion_error(levels: int) -> None:
    with pytest.raises(TypeError, match=f"more than {encode.MAX_RESULT_DEPTH} levels"):
        encode.to_jsonable({"out": nested(levels)})


def test_to_jsonable_refuses_a_result_that_contains_itself() -> None:
    loop: list[object] = [1]
    loop.append(loop)
    with pytest.raises(TypeError, match="levels"):
        encode.to_jsonable(loop)


def test_to_jsonable_keeps_results_at_the_depth_limit() -> None:
    limit = encode.MAX_RESULT_DEPTH
    assert encode.to_jsonable(nested(limit, np.int8(3))) == nested(limit, 3)
    assert encode.to_jsonable(nested(limit - 2, np.zeros((1, 1)))) == nested(limit, 0.0)
    with pytest.raises(TypeError, match="levels"):
        encode.to_jsonable(nested(limit - 1, np.zeros((1, 1))))


def test_to_jsonable_refuses_a_tolist_that_never_ends() -> None:
    class Endless:
        def tolist(self) -> Endless:
            return self

    with pytest.raises(TypeError, match="Endless"):
        encode.to_jsonable({"out": Endless()})


# -- decode: JSON bodies -----------------------------------------------------------------

def json_nested(levels: int, close: bool = True) -> bytes:
    """A JSON object whose field ``x`` makes the body ``levels`` levels deep."""
    inner = levels - 1
    return b'{"x": ' + b"[" * inner + b"1" + (b"]" * inner + b"}" if close else b"")


def test_json_at_the_depth_limit_parses() -> None:
    body = decode.parse_json_object(json_nested(decode.MAX_JSON_DEPTH))
    assert body == {"x": nested(decode.MAX_JSON_DEPTH - 1)}


@pytest.mark.parametrize("levels, close", [(decode.MAX_JSON_DEPTH + 1, True), (100_000, True),
                                           (100_000, False)], ids=["limit+1", "deep", "unclosed"])
def test_too_deep_json_is_400_not_recursion_error(levels: int, close: bool) -> None:
    with pytest.raises(InputError, match=f"nested more than {decode.MAX_JSON_DEPTH} levels") as info:
        decode.parse_json_object(json_nested(levels, close))
    assert info.value.http_status == 400


def test_deep_json_in_utf16_is_400() -> None:
    body = ('{"x": ' + "[" * 5000 + "]" * 5000 + "}").encode("utf-16")
    with pytest.raises(InputError, match="nested more than"):
        decode.parse_json_object(body)


@pytest.mark.parametrize("text", [
    '"' + "[" * 5000 + '"',                       # brackets inside a string are text
    '"\\\\\\"' + "{" * 5000 + '\\\\"',      # ...also after escaped backslashes and quotes
    '["\\u005b", "' + "]" * 70 + '", ' + "[" * 60 + "]" * 60 + "]",
], ids=["plain", "escapes", "escaped-bracket"])
def test_brackets_inside_strings_do_not_count(text: str) -> None:
    data = ('{"x": ' + text + "}").encode()
    assert decode.parse_json_object(data) == {"x": json.loads(text)}


def test_many_shallow_brackets_pass() -> None:
    rows = [[float(i), float(-i)] for i in range(50_000)]
    assert decode.parse_json_object(json.dumps({"rows": rows}).encode())["rows"] == rows


def depth_of(value: object) -> int:
    """How deep json.loads recurses for ``value`` (explicit stack, no recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


# Strings full of the characters the depth scan must see through: brackets, quotes, escapes.
_tricky_text = st.text(alphabet=st.sampled_from('[]{}"\\/ab\u00e9\u2603\n'), max_size=8)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | _tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_tricky_text, inner, max_size=4),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(value=_json_values, ensure_ascii=st.booleans())
def test_depth_scan_matches_the_parser(value: object, ensure_ascii: bool) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    assert decode._max_depth(text.encode()) == depth_of(value)


@pytest.mark.parametrize("sign", ["", "-"])
def test_huge_integer_is_400(sign: str) -> None:
    with pytest.raises(InputError, match=f"integer with more than {decode.MAX_JSON_INT_DIGITS} digits"):
        decode.parse_json_object(f'{{"x": {sign}{"7" * (decode.MAX_JSON_INT_DIGITS + 1)}}}'.encode())
    limit = int(sign + "7" * decode.MAX_JSON_INT_DIGITS)
    assert decode.parse_json_object(f'{{"x": {limit}}}'.encode()) == {"x": limit}


# -- decode: image format allow-list -----------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_allowed_formats_decode(fmt: str) -> None:
    image = decode.decode_image(encoded(fmt), 1000)
    assert image.format == fmt and image.size == (8, 6)
    assert np.asarray(image.convert("RGB")).shape == (6, 8, 3)


def refused_bodies() -> list[tuple[str, bytes]]:
    return [("EPS", EPS), ("ICO", encoded("ICO", (16, 16))), ("TIFF", encoded("TIFF")),
            ("PDF", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")]


@pytest.mark.parametrize("name, body", refused_bodies(), ids=[n for n, _ in refused_bodies()])
def test_formats_outside_the_allow_list_are_415(name: str, body: bytes) -> None:
    if name != "PDF":  # the fixture is real: Pillow itself would open it
        assert Image.open(io.BytesIO(body)).format == name
    Image.init()  # every Pillow plugin registered, as after any unrestricted Image.open elsewhere
    with pytest.raises(UnsupportedMediaTypeError) as info:
        decode.decode_image(body, 1000)
    assert info.value.http_status == 415
    assert "PNG, JPEG, GIF, BMP or WebP" in info.value.message


def test_allow_list_is_a_documented_constant() -> None:
    assert decode.ALLOWED_IMAGE_FORMATS == ("PNG", "JPEG", "GIF", "BMP", "WEBP")
    assert "ALLOWED_IMAGE_FORMATS" in decode.__all__


# -- the decode memory budget --------------------------------------------------------------
def _noise_png(side: int) -> bytes:
    rng = np.random.default_rng(side)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG",
                                                                                 compress_level=1)
    return buffer.getvalue()


@pytest.mark.timeout(60)
def test_threads_decoding_large_images_never_exceed_the_budget() -> None:
    import concurrent.futures

    data = _noise_png(1500)
    cost = decode.decoded_bytes(decode.open_image(data, 10**9))
    assert cost == 1500 * 1500 * (3 + 8)
    budget = decode.DecodeBudget(int(2.5 * cost), wait=30)

    def work(_: int) -> float:
        image = decode.open_image(data, 10**9)
        with budget.reserve(decode.decoded_bytes(image)):
            decode.load_image(image)
            return float(np.asarray(image, dtype=np.float32).mean())  # a working copy

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        means = list(pool.map(work, range(8)))
    assert len(set(means)) == 1
    assert cost <= budget.peak <= budget.limit  # used, never past the limit
    assert budget.peak <= 2 * cost and budget.in_use == 0  # at most two at once


def test_an_image_bigger_than_the_whole_budget_is_413_before_decoding() -> None:
    from ipcserve.engine.errors import PayloadTooLargeError

    data = _noise_png(1000)
    budget = decode.DecodeBudget(1 << 20)
    with pytest.raises(PayloadTooLargeError, match="decode memory budget"):
        decode.decode_image(data, 10**9, budget)
    assert budget.peak == 0


def test_a_full_budget_answers_503_after_its_wait() -> None:
    from ipcserve.engine.errors import OverloadedError

    budget = decode.DecodeBudget(100, wait=0.05)
    with budget.reserve(80):
        with pytest.raises(OverloadedError, match="retry"):
            with budget.reserve(30):
                pass
        with budget.reserve(20):  # what fits next to the other goes ahead
            assert budget.in_use == 100
    assert budget.in_use == 0


@pytest.mark.timeout(60)
def test_the_server_applies_its_decode_budget() -> None:
    import requests
    from digits_data import held_out_pngs
    from server import Server

    server = Server("--decode-memory-budget", "2000000")
    try:
        big = requests.post(f"{server.url}/predict", data=_noise_png(600), timeout=30,
                            headers={"Content-Type": "image/png"})
        assert big.status_code == 413 and "decode memory budget" in big.json()["error"]
        png, _ = held_out_pngs()[0]
        small = requests.post(f"{server.url}/predict", data=png, timeout=30,
                              headers={"Content-Type": "image/png"})
        assert small.status_code == 200 and "label" in small.json()
    finally:
        assert server.stop() == 0, server.output


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_every_allowed_format_is_size_checked_from_its_header(fmt: str) -> None:
    from ipcserve.engine.errors import PayloadTooLargeError

    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buffer, fmt)
    data = buffer.getvalue()
    # The pixels cut short, the header whole (libwebp checks the whole container when the
    # file is opened, so a WebP is sent whole: it is still not decoded).
    truncated = data if fmt == "WEBP" else data[: len(data) // 2]
    budget = decode.DecodeBudget(1 << 30)
    with pytest.raises(PayloadTooLargeError, match="300x300"):
        decode.decode_image(truncated, 1000, budget)  # 413 from the header, not 400 from pixels
    assert budget.peak == 0  # nothing was reserved: nothing was decoded
    if fmt != "WEBP":
        with pytest.raises(InputError, match="could not be decoded"):
            decode.decode_image(truncated, 10**6)  # within the cap, the cut pixels are found
