"""A scikit-learn model saved with joblib, served with no adapter: MLProcess.from_factory.

    python examples/sklearn_model.py          # trains iris.joblib on the first run
    curl -s localhost:8000/predict -H 'Content-Type: application/json' \\
         -d '{"features": [5.1, 3.5, 1.4, 0.2]}'
    # -> {"label": "setosa", "probabilities": {"setosa": 0.97, ...}}

The factory and the class it returns live at module level, so the spawn start method can
pickle them by reference; the model itself is loaded once, inside the ML process.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

MODEL_PATH = Path("iris.joblib")


class IrisModel:
    """What the factory returns: ``predict_batch`` turns batching on."""

    def __init__(self, path: Path) -> None:
        import joblib

        self.classifier, self.labels = joblib.load(path)

    def predict_batch(self, xs: list[Any]) -> list[dict[str, Any]]:
        import numpy as np

        from ipcserve import InputError

        rows = []
        for x in xs:  # a JSON body {"features": [...]} arrives as that dict
            features = x.get("features") if isinstance(x, dict) else x
            try:
                row = np.asarray(features, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError("'features' must be a list of 4 numbers") from None
            if row.shape != (4,):
                raise InputError(f"'features' must be a list of 4 numbers, got shape {row.shape}")
            rows.append(row)
        probabilities = self.classifier.predict_proba(np.stack(rows))
        return [{"label": self.labels[p.argmax()],
                 "probabilities": {name: float(v) for name, v in zip(self.labels, p)}}
                for p in probabilities]


def load_iris() -> IrisModel:
    """The factory: runs once, inside the ML process."""
    return IrisModel(MODEL_PATH)


def train(path: Path) -> None:
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    data = load_iris()
    classifier = LogisticRegression(max_iter=1000).fit(data.data, data.target)
    joblib.dump((classifier, [str(n) for n in data.target_names]), path)


def main() -> None:
    from flask import Flask

    from ipcserve import MLProcess
    from ipcserve.server import serve
    from ipcserve.flask import IPCServe

    if not MODEL_PATH.exists():
        train(MODEL_PATH)
    app = Flask(__name__)
    ipc = IPCServe(app)
    ipc.add_model(MLProcess.from_factory(load_iris, name="iris", timeout=5), kind="json")
    # waitress on 127.0.0.1:8000; starts the models (each in its own ML process) and, on
    # SIGTERM or Ctrl-C, drains requests in flight before stopping them.
    sys.exit(serve(app, host="127.0.0.1", port=8000))


if __name__ == "__main__":  # required: the spawn start method re-imports this file
    logging.basicConfig(level=logging.INFO)
    main()
