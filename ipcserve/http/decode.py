"""Turn HTTP request bodies into model inputs, or a clear InputError. No Flask import.

Never unpickles anything: JSON is parsed with ``json``, images are decoded with pillow,
and the pixel count is checked from the header *before* the pixels are decoded, so a
decompression bomb is refused without being inflated.

Images are opened only in the formats of :data:`ALLOWED_IMAGE_FORMATS`. Pillow knows dozens
more, and some are dangerous on untrusted bytes: EPS runs Ghostscript on attacker-written
PostScript, and the long tail of rarely used plugins is where decoder bugs live.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import threading
from collections.abc import Iterator
from typing import Any

from ..engine.errors import InputError, OverloadedError, PayloadTooLargeError, UnsupportedMediaTypeError

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "MAX_JSON_DEPTH",
    "MAX_JSON_INT_DIGITS",
    "DecodeBudget",
    "decode_image",
    "decoded_bytes",
    "parse_json_object",
    "validate",
]

#: Deepest nesting of arrays and objects accepted in a JSON body; the body's own object is
#: level 1, so ``{"x": [[1]]}`` is 3 deep. ``json.loads`` recurses once per level and raises
#: RecursionError near 1000 levels, and jsonschema, pickling to the ML process and the model
#: recurse too; real inputs (a batch of RGB images as nested lists) need fewer than 10.
MAX_JSON_DEPTH = 64

#: Longest integer literal accepted in a JSON body, in digits: CPython's default cap on
#: int/str conversion (``sys.get_int_max_str_digits()``), which bounds the quadratic cost of
#: converting long digit strings.
MAX_JSON_INT_DIGITS = 4300

#: The image formats :func:`decode_image` opens (Pillow's format names). Any other body,
#: even one Pillow could read, is refused with a 415 before a decoder sees its pixels.
ALLOWED_IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "WEBP")

# Pillow's JPEG plugin hands a multi-picture JPEG (from some cameras) back as "MPO"; it is
# still decoded by the JPEG decoder, and only its first picture is used.
_OPENED_FORMATS = frozenset(ALLOWED_IMAGE_FORMATS) | {"MPO"}

_FORMATS_IN_WORDS = "PNG, JPEG, GIF, BMP or WebP"


def parse_json_object(data: bytes) -> dict[str, Any]:
    """Parse a JSON object body; its fields become the model's keyword arguments.

    Args:
        data: the request body (UTF-8, or UTF-16/32 as ``json.loads`` detects them).

    Returns:
        The parsed object.

    Raises:
        InputError: empty, not text, not valid JSON, not an object, a bad field name,
            ``NaN``/``Infinity``, nested deeper than :data:`MAX_JSON_DEPTH`, or an
            integer longer than :data:`MAX_JSON_INT_DIGITS` digits.
    """
    if not data:
        raise InputError("the request body is empty; send a JSON object such as {\"x\": 1}")
    _check_json_depth(data)
    try:
        body = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
    except UnicodeDecodeError:
        raise InputError("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    except RecursionError:  # pragma: no cover - only if called with the stack nearly full
        raise InputError(_too_deep()) from None
    if not isinstance(body, dict):
        raise InputError(f"the JSON body must be an object whose fields are the model's inputs, "
                         f"got {type(body).__name__}")
    bad = [key for key in body if not key.isidentifier() or key.startswith("_") or key == "self"]
    if bad:
        raise InputError(f"field {bad[0]!r} is not a valid input name (letters, digits and '_', "
                         "not starting with '_', not 'self')")
    return body


def _too_deep() -> str:
    return (f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep; "
            "send flatter inputs")


# Every byte but the five that shape JSON's nesting: brackets, braces and the string quote.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_SCAN_CHUNK = 1 << 20  # bytes per numpy pass: bounds the scan's temporary arrays to ~10 MiB


def _check_json_depth(data: bytes) -> None:
    """Refuse a body nested deeper than MAX_JSON_DEPTH, without parsing or recursing.

    ``json.loads`` recurses once per level, so the depth must be known before it runs. The
    scan is linear and vectorised: a 16 MiB body costs tens of milliseconds, less than
    parsing it, and a deep one is refused before any object is built.
    """
    # Fast path for nearly every body: fewer opening brackets than the limit, in any
    # encoding (in UTF-16/32 each "[" still has one 0x5B byte; other characters only add).
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return
    encoding = json.detect_encoding(data)
    if not encoding.startswith("utf-8"):
        # The scan reads ASCII bytes, so bring UTF-16/32 to UTF-8 first; in UTF-8 the bytes
        # of [ ] { } " \ never occur inside a multi-byte character.
        try:
            data = data.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise InputError(f"the request body is not valid {encoding.upper()} text") from None
    if _max_depth(data) > MAX_JSON_DEPTH:
        raise InputError(_too_deep())


def _max_depth(data: bytes) -> int:
    """The deepest bracket nesting in UTF-8 JSON text, brackets inside strings not counted.

    Exact for valid JSON. For invalid JSON it may differ past the first error, where
    ``json.loads`` stops anyway.
    """
    import numpy as np

    # Escapes are read left to right in pairs: once every escaped backslash (two backslashes)
    # is dropped, a backslash before a quote is an escaped quote, which does not end the
    # string; drop those too. No other escape can form a quote or a bracket.
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = text.translate(None, _NOT_STRUCTURE)
    deepest = level = 0
    in_string = 0  # 1 while the chunk starts inside a string
    for start in range(0, len(structure), _SCAN_CHUNK):
        codes = np.frombuffer(structure, np.uint8, min(_SCAN_CHUNK, len(structure) - start), start)
        quotes = np.cumsum(codes == ord('"'), dtype=np.int32) + in_string
        outside = (quotes & 1) == 0  # an even number of quotes so far: not in a string
        opens = (codes == ord("[")) | (codes == ord("{"))
        closes = (codes == ord("]")) | (codes == ord("}"))
        levels = np.cumsum((opens & outside).astype(np.int32) - (closes & outside)) + level
        deepest = max(deepest, int(levels.max()))
        if deepest > MAX_JSON_DEPTH:
            break
        level, in_string = int(levels[-1]), int(quotes[-1]) & 1
    return deepest


def _bounded_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    limit = MAX_JSON_INT_DIGITS
    if digits <= limit:
        try:
            return int(text)
        except ValueError:  # this process lowered sys.set_int_max_str_digits() below ours
            limit = sys.get_int_max_str_digits()
    raise InputError(f"the JSON body contains an integer with more than {limit} digits; "
                     "send it as a string")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InputError(f"the JSON body contains {text}, which overflows a float")
    return value


def _reject_constant(name: str) -> Any:
    raise InputError(f"the JSON body contains {name}, which is not a number")


def validate(body: dict[str, Any], schema: Any) -> dict[str, Any]:
    """Check ``body`` against a JSON Schema (dict) or a pydantic model class.

    Raises:
        InputError: naming the first offending field.
    """
    if schema is None:
        return body
    if hasattr(schema, "DESCRIPTOR"):  # a protobuf message class
        from .schemas import validate_request

        return validate_request(body, schema)
    if isinstance(schema, dict):
        import jsonschema

        try:
            jsonschema.validate(body, schema)
        except jsonschema.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path) or "(body)"
            raise InputError(f"field {where!r}: {exc.message}") from None
        return body
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - pydantic schema without pydantic installed
        raise TypeError("schema must be a JSON Schema dict or a pydantic model class") from None
    try:
        model = schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise InputError(f"field {where!r}: {first['msg']}") from None
    return dict(model.model_dump())


class DecodeBudget:
    """Bytes of decoded images the web process may hold at once, across threads.

    A 34 KB PNG can decode to hundreds of MB (20 Mpx RGB plus the copies preprocessing makes);
    eight at once would take gigabytes. Each image reserves its estimated cost
    (:func:`decoded_bytes`) before its pixels are decoded and releases it once the model's
    input is built. An image whose cost alone is over the budget is refused (413); one that
    does not fit next to the others waits up to ``wait`` seconds, then gets 503.

    Args:
        limit: the budget in bytes.
        wait: seconds a request may wait for room.
    """

    def __init__(self, limit: int, wait: float = 5.0) -> None:
        self.limit = limit
        self.wait = wait
        self.in_use = 0
        self.peak = 0  # the most ever reserved at once (for tests and operators)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block.

        Raises:
            PayloadTooLargeError: ``nbytes`` is more than the whole budget.
            OverloadedError: no room came within ``wait`` seconds.
        """
        if nbytes > self.limit:
            raise PayloadTooLargeError(
                f"decoding this image takes about {nbytes // (1 << 20)} MiB, more than the "
                f"decode memory budget ({self.limit // (1 << 20)} MiB); send a smaller image")
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_use + nbytes <= self.limit, self.wait):
                raise OverloadedError("too many large images are being decoded at once; "
                                      "retry shortly")
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()


# Bytes per pixel that preprocessing adds to the decoded pixels: a float32 working copy
# (image_to_pixels, numpy conversions) and a converted copy. An estimate, deliberately high.
_WORKING_BYTES_PER_PIXEL = 8


def decoded_bytes(image: Any) -> int:
    """The estimated memory an opened (not yet decoded) image costs once decoded and
    prepared: its pixels in its mode, plus working copies."""
    width, height = image.size
    bands = len(image.getbands()) * (2 if image.mode.startswith("I;16") else 1)
    if image.mode in ("I", "F"):
        bands = 4
    return int(width * height * (bands + _WORKING_BYTES_PER_PIXEL))


def decode_image(data: bytes, max_pixels: int, budget: DecodeBudget | None = None) -> Any:
    """Decode image bytes into a loaded ``PIL.Image``.

    Only the formats of :data:`ALLOWED_IMAGE_FORMATS` are opened.

    Args:
        data: the encoded image, as sent by the client.
        max_pixels: the largest width x height accepted (checked before decoding).

    Returns:
        The loaded ``PIL.Image.Image`` (the first frame of an animation).

    Raises:
        InputError: empty, no pixels, or truncated/corrupt pixel data.
        UnsupportedMediaTypeError: not an image in an allowed format.
        PayloadTooLargeError: more than ``max_pixels`` pixels (checked before decoding).
    """
    image = open_image(data, max_pixels)
    if budget is None:
        load_image(image)
    else:
        with budget.reserve(decoded_bytes(image)):
            load_image(image)
    return image


def open_image(data: bytes, max_pixels: int) -> Any:
    """Identify ``data`` and check its size from the header; no pixel is decoded yet.

    Raises:
        as :func:`decode_image`, except for errors in the pixel data.
    """
    if not data:
        raise InputError("the image is empty")
    image = _open_image(data, max_pixels)
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLargeError(f"the image is {width}x{height} = {width * height} pixels; "
                                   f"the limit is {max_pixels}")
    if width == 0 or height == 0:
        raise InputError("the image has no pixels")
    return image


def load_image(image: Any) -> None:
    """Decode the pixels of an image :func:`open_image` checked (its first frame).

    Raises:
        InputError: truncated or corrupt pixel data.
    """
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt data: pillow raises many types
        raise InputError(f"the image could not be decoded: {type(exc).__name__}: {exc}") from None


def _open_image(data: bytes, max_pixels: int) -> Any:
    """Identify ``data`` among the allowed formats and read its header; no pixels yet."""
    from PIL import Image, UnidentifiedImageError

    # Import the allowed plugins ourselves: Image.open(formats=...) calls Image.init(),
    # which imports every plugin Pillow has, whenever a listed format is not registered yet
    # (WebP is not among the few Pillow preloads). The formats= list alone already keeps
    # other plugins from being tried; this keeps them from even being imported by us.
    from PIL import (  # noqa: F401
        BmpImagePlugin,
        GifImagePlugin,
        JpegImagePlugin,
        PngImagePlugin,
        WebPImagePlugin,
    )

    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own cap (Image.MAX_IMAGE_PIXELS) fired first; the warning arrives as an
        # exception only where warnings are errors (python -W error, our test suite).
        raise PayloadTooLargeError(f"the image has more than {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UnsupportedMediaTypeError(f"the body is not an image in an accepted format "
                                        f"(send {_FORMATS_IN_WORDS})") from None
    if image.format not in _OPENED_FORMATS:  # a plugin that registered itself under our names
        raise UnsupportedMediaTypeError(f"{image.format} images are not accepted "
                                        f"(send {_FORMATS_IN_WORDS})")
    return image
