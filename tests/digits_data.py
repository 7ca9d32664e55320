"""Test helper: the digits held-out set rendered as real PNG drawings.

Uses the same split as ``scripts/train_digits.py``. Each 8x8 digit (0..16,
ink high) is drawn as dark ink on white paper, upscaled to 64x64 and given a
white border, then encoded as PNG with Pillow.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

_SCALE = 8  # 8x8 -> 64x64
_BORDER = 16  # white border in pixels around the upscaled digit


@functools.lru_cache(maxsize=1)
def _held_out() -> tuple[object, object]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    _, X_test, _, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    return X_test, y_test


def _render_png(features: object) -> bytes:
    import numpy as np
    from PIL import Image, ImageOps

    grid = np.asarray(features, dtype=np.float64).reshape(8, 8)
    gray = np.clip(np.round(255.0 - grid * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    image = Image.fromarray(gray).resize(
        (8 * _SCALE, 8 * _SCALE), Image.Resampling.NEAREST
    )
    image = ImageOps.expand(image, border=_BORDER, fill=255)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def held_out_pngs() -> list[tuple[bytes, int]]:
    """Return the held-out digits as ``(png_bytes, label)`` pairs.

    Returns:
        450 pairs: a PNG (96x96, dark ink on white) and its true digit.
    """
    X_test, y_test = _held_out()
    return [(_render_png(x), int(label)) for x, label in zip(X_test, y_test)]


def accuracy_in_process() -> float:
    """Classify the PNG held-out set in process via ``image_to_pixels``.

    Returns:
        The fraction of PNGs whose predicted label matches the true digit.
    """
    from PIL import Image

    from ipcserve.adapters.digits import DigitsModel, image_to_pixels

    samples = held_out_pngs()
    pixels = []
    for png, _ in samples:
        with Image.open(io.BytesIO(png)) as image:
            pixels.append(image_to_pixels(image))
    results = DigitsModel().predict_batch(pixels)
    correct = sum(r["label"] == label for r, (_, label) in zip(results, samples))
    return correct / len(samples)


def well_classified_png(url: str, directory: Path, api_key: str | None = None) -> tuple[Path, int]:
    """A held-out digit the server at ``url`` classifies right (it is ~96% accurate),
    written to a PNG file in ``directory``."""
    import requests

    headers = {"Content-Type": "image/png"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for png, label in held_out_pngs()[:20]:
        r = requests.post(f"{url}/predict", data=png, headers=headers, timeout=30)
        if r.json()["label"] == label:
            path = directory / f"digit-{label}.png"
            path.write_bytes(png)
            return path, label
    raise AssertionError("the model got none of the first 20 held-out digits right")
