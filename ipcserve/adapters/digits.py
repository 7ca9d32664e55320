"""The built-in model of ``python app.py``: an 8x8 handwritten-digit classifier.

Three pieces, one place:

* :func:`image_to_pixels` runs in the web process: a picture of a digit becomes the
  model's 64 features, so only 64 floats cross the pipe;
* :class:`DigitsModel` is the ONNX Runtime session (usable in-process, e.g. in tests); it
  validates the features;
* :class:`DigitsClassifier` is the MLProcess that serves it and batches concurrent calls.

The model file ``digits.onnx`` lives next to this module and is produced by
``scripts/train_digits.py``. It takes ``pixels`` (float32 ``[N, 64]``, a row-major 8x8
image in scikit-learn's digits scale 0..16 with ink high) and returns ``probabilities``
(float32 ``[N, 10]``).

Importing this module is light: numpy, Pillow and onnxruntime are imported inside the
functions that need them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.errors import InputError
from ..engine.mlprocess import MLProcess

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy
    from PIL import Image

__all__ = ["DIGITS_ONNX_PATH", "DigitsClassifier", "DigitsModel", "image_to_pixels"]

logger = logging.getLogger(__name__)

DIGITS_ONNX_PATH: Path = Path(__file__).resolve().parent / "digits.onnx"

_SIDE = 8  # output image side, as in sklearn's digits data set
_MAX_VALUE = 16.0  # data set pixel scale: 0..16
_MIN_CONTRAST = 32.0  # below this grey-level range an image counts as blank
_INK_THRESHOLD = 0.2  # fraction of the contrast range that counts as ink


def image_to_pixels(image: Image.Image) -> numpy.ndarray:
    """Turn a picture of one digit into the model's 64 input features.

    Accepts dark ink on a light background (pen on paper) or light ink on a
    dark background. The image is converted to greyscale, inverted if its
    border is bright, contrast-stretched and cropped to the ink's bounding box.
    As in ``sklearn.datasets.load_digits``, the ink's longer side then fills
    the frame (aspect ratio kept; narrow digits are placed on a square canvas
    centred on their horizontal centre of mass), and the result is reduced to
    8x8 with an area filter and scaled to 0..16 (ink high).

    Args:
        image: A ``PIL.Image.Image`` of any mode and size.

    Returns:
        A float32 array of shape ``(64,)`` with values in 0..16. An image with
        no visible ink (uniform or nearly so) gives all zeros.
    """
    import numpy as np
    from PIL import Image as PILImage

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Flatten transparency onto white so transparent areas read as paper.
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PILImage.alpha_composite(background, rgba)
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    zeros = np.zeros(_SIDE * _SIDE, dtype=np.float32)
    if gray.size == 0:
        return zeros

    border = np.concatenate([gray[0, :], gray[-1, :], gray[:, 0], gray[:, -1]])
    if float(border.mean()) > 127.5:
        gray = 255.0 - gray  # dark ink on light paper: make ink bright
    low, high = float(gray.min()), float(gray.max())
    if high - low < _MIN_CONTRAST:
        return zeros
    ink = (gray - low) / (high - low)  # 0 = background, 1 = strongest ink

    rows = np.flatnonzero((ink > _INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > _INK_THRESHOLD).any(axis=0))
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    # Like the data set: the ink's height fills the frame, aspect ratio is
    # kept, and the digit is centred horizontally on its centre of mass.
    height, width = ink.shape
    side = max(height, width)
    column_mass = ink.sum(axis=0)
    centre_of_mass = float((column_mass * np.arange(width)).sum() / column_mass.sum()) + 0.5
    left = int(round(side / 2.0 - centre_of_mass))
    left = min(max(left, 0), side - width)
    top = (side - height) // 2
    square = np.zeros((side, side), dtype=np.float32)
    square[top : top + height, left : left + width] = ink

    small = PILImage.fromarray(square).resize((_SIDE, _SIDE), PILImage.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float32).reshape(-1) * _MAX_VALUE
    clipped: numpy.ndarray = np.clip(pixels, 0.0, _MAX_VALUE).astype(np.float32)
    return clipped


class DigitsModel:
    """ONNX Runtime session around the shipped digit classifier.

    Args:
        path: Path of the ONNX file; defaults to :data:`DIGITS_ONNX_PATH`.
        num_threads: Intra-op threads for onnxruntime.
    """

    def __init__(self, path: str | Path | None = None, num_threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path) if path is not None else DIGITS_ONNX_PATH
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_name = self._session.get_inputs()[0].name
        self._output_name = self._session.get_outputs()[0].name
        logger.info("loaded digits model from %s (threads=%d)", self.path, num_threads)

    def predict_batch(self, pixels: list[numpy.ndarray]) -> list[dict[str, Any]]:
        """Classify a batch of 8x8 digit feature vectors in one run.

        Args:
            pixels: Arrays of shape ``(64,)`` in 0..16 scale, e.g. from
                :func:`image_to_pixels`.

        Returns:
            One ``{"label": int, "probabilities": [10 floats]}`` per input, in
            order; probabilities are rounded to 6 decimals.

        Raises:
            ValueError: If an item is not a numeric array of shape ``(64,)``
                or holds a non-finite value.
        """
        import numpy as np

        if len(pixels) == 0:
            return []
        rows = []
        for index, item in enumerate(pixels):
            try:
                array = np.asarray(item, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"pixels[{index}] is not a numeric array: {exc}") from exc
            if array.shape != (_SIDE * _SIDE,):
                raise ValueError(
                    f"pixels[{index}] must have shape (64,), got {tuple(array.shape)}"
                )
            if not np.isfinite(array).all():
                raise ValueError(f"pixels[{index}] contains NaN or infinite values")
            rows.append(array)
        batch = np.stack(rows)
        (probabilities,) = self._session.run([self._output_name], {self._input_name: batch})
        return [
            {
                "label": int(np.argmax(row)),
                "probabilities": [round(float(p), 6) for p in row],
            }
            for row in probabilities
        ]


class DigitsClassifier(MLProcess):
    """Handwritten digit (0-9) classifier served with onnxruntime; batches concurrent calls.

    Input: the 64 pixel features (0..16, ink high) of one 8x8 digit, as an array, a list,
    or ``{"pixels": [...]}`` (the JSON body ``{"pixels": [...]}``).
    Output: ``{"label": int, "probabilities": [10 floats]}``.

    Args:
        path: an ONNX file with the same interface; defaults to the shipped ``digits.onnx``.
        num_threads: onnxruntime intra-op threads in the ML process.
        **settings: MLProcess settings (``name`` defaults to "digits").
    """

    #: V2 metadata: an ONNX Runtime model (its tensor signature is read from ``path``).
    tensor_platform = "onnxruntime_onnx"
    #: Image uploads become the 64 features in the web process (``kind="image"``).
    image_preprocess = staticmethod(image_to_pixels)

    def __init__(self, path: str | Path | None = None, num_threads: int = 1, **settings: Any) -> None:
        settings.setdefault("name", "digits")
        super().__init__(**settings)
        self.path = Path(path) if path is not None else DIGITS_ONNX_PATH
        self.num_threads = num_threads
        self.model: DigitsModel | None = None

    def load(self) -> None:
        self.model = DigitsModel(self.path, num_threads=self.num_threads)

    def warmup(self) -> None:
        import numpy as np

        self.predict_batch([np.zeros(64, dtype=np.float32)])

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        assert self.model is not None
        features = []
        for x in xs:
            if isinstance(x, dict):
                if set(x) != {"pixels"}:
                    raise InputError("send {\"pixels\": [64 numbers]} (an 8x8 digit, 0..16, ink high)")
                x = x["pixels"]
            features.append(x)
        try:
            return self.model.predict_batch(features)
        except ValueError as exc:  # DigitsModel validates the features
            raise InputError(f"field 'pixels' must be 64 finite numbers: {exc}") from None
