"""The default model of ``python app.py``: the built-in digits classifier as an MLProcess.

Images are decoded and reduced to 64 features in the web process
(:func:`~ipcserve.adapters.builtin.image_to_pixels`); only those 64 floats cross the pipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..mlprocess import MLProcess
from .builtin import DigitsModel, image_to_pixels

__all__ = ["DigitsClassifier", "image_to_pixels"]


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

    def __init__(self, path: str | Path | None = None, num_threads: int = 1, **settings: Any) -> None:
        settings.setdefault("name", "digits")
        super().__init__(**settings)
        self.path = path
        self.num_threads = num_threads
        self.model: DigitsModel | None = None

    def load(self) -> None:
        self.model = DigitsModel(self.path, num_threads=self.num_threads)

    def warmup(self) -> None:
        import numpy as np

        self.predict_batch([np.zeros(64, dtype=np.float32)])

    def predict_batch(self, xs: list[Any]) -> list[Any]:
        import numpy as np

        assert self.model is not None
        features = []
        for x in xs:
            if isinstance(x, dict):
                if set(x) != {"pixels"}:
                    raise InputError("send {\"pixels\": [64 numbers]} (an 8x8 digit, 0..16, ink high)")
                x = x["pixels"]
            try:
                array = np.asarray(x, dtype=np.float32)
            except (TypeError, ValueError):
                raise InputError("field 'pixels' must be a list of 64 numbers") from None
            if array.shape != (64,) or not np.isfinite(array).all():
                raise InputError(f"field 'pixels' must be 64 finite numbers, got shape {array.shape}")
            features.append(array)
        return self.model.predict_batch(features)
