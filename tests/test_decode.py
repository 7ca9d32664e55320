"""Request bodies to model inputs (ipcserve.decode) and results to JSON (ipcserve.encode).

Function-level tests with real inputs: real image files made by Pillow or written byte by
byte, real JSON text, real threads for the decode memory budget.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from ipcserve import decode, encode
from ipcserve.errors import UnsupportedMediaTypeError

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
    assert encode.__all__ == ["to_jsonable"]
    assert "to_jsonable" not in decode.__all__ and not hasattr(decode, "to_jsonable")


def test_to_jsonable_converts_numpy_and_non_finite() -> None:
    result = {"a": np.arange(3, dtype=np.int64), 1: (np.float32(0.5), math.nan, -math.inf), "ok": [True, None, "s"]}
    assert encode.to_jsonable(result) == {"a": [0, 1, 2], "1": [0.5, None, None], "ok": [True, None, "s"]}


@pytest.mark.parametrize("value, what", [(b"raw", "bytes"), (object(), "object"), ({"k": {1, 2}}, "set")])
def test_to_jsonable_refuses_what_json_cannot_carry(value: object, what: str) -> None:
    with pytest.raises(TypeError, match=what):
        encode.to_jsonable(value)


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
