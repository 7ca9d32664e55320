"""Turn HTTP request bodies into model inputs, or a clear InputError. No Flask import.

Never unpickles anything: JSON is parsed with ``json``, images are decoded with pillow,
and the pixel count is checked from the header *before* the pixels are decoded, so a
decompression bomb is refused without being inflated.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

from .errors import InputError, PayloadTooLargeError, UnsupportedMediaTypeError

__all__ = ["decode_image", "parse_json_object", "validate"]


def parse_json_object(data: bytes) -> dict[str, Any]:
    """Parse a JSON object body; its fields become the model's keyword arguments."""
    if not data:
        raise InputError("the request body is empty; send a JSON object such as {\"x\": 1}")
    try:
        body = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise InputError("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    if not isinstance(body, dict):
        raise InputError(f"the JSON body must be an object whose fields are the model's inputs, "
                         f"got {type(body).__name__}")
    bad = [key for key in body if not key.isidentifier() or key.startswith("_") or key == "self"]
    if bad:
        raise InputError(f"field {bad[0]!r} is not a valid input name (letters, digits and '_', "
                         "not starting with '_', not 'self')")
    return body


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


def decode_image(data: bytes, max_pixels: int) -> Any:
    """Decode image bytes into a loaded ``PIL.Image``.

    Raises:
        InputError: empty or not an image pillow can read.
        PayloadTooLargeError: more than ``max_pixels`` pixels (checked before decoding).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("the image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise PayloadTooLargeError(f"the image has more than {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UnsupportedMediaTypeError("the body is not an image pillow can read "
                                        "(send PNG, JPEG, GIF, BMP or WebP)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLargeError(f"the image is {width}x{height} = {width * height} pixels; "
                                   f"the limit is {max_pixels}")
    if width == 0 or height == 0:
        raise InputError("the image has no pixels")
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt data: pillow raises many types
        raise InputError(f"the image could not be decoded: {type(exc).__name__}: {exc}") from None
    return image

