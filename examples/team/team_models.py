"""Two small models for examples/team/models.toml (no download needed).

    PYTHONPATH=examples/team python app.py --config examples/team/models.toml
    curl -s localhost:8000/v1/models/lexicon/predict -H 'Content-Type: application/json' \\
         -d '{"text": "a great, lovely day"}'
    # edit WORDS below, then: curl -s -X POST localhost:8000/v1/models/lexicon/reload
"""

from __future__ import annotations

from typing import Any

from ipcserve import MLProcess

# A toy sentiment lexicon: change it and reload to see the new version answer.
WORDS = {"great": 1.0, "lovely": 1.0, "good": 0.5, "bad": -0.5, "awful": -1.0, "sad": -1.0}


class Lexicon(MLProcess):
    """Scores a text by the words it contains; batches concurrent calls."""

    def load(self) -> None:
        self.words = dict(WORDS)

    def predict_batch(self, xs: list[dict[str, Any]]) -> list[Any]:
        return [self._score(x.get("text", "")) for x in xs]

    def predict(self, text: str = "") -> Any:  # pragma: no cover - predict_batch is used
        return self._score(text)

    def _score(self, text: str) -> dict[str, Any]:
        tokens = [t.strip(".,!?;:").lower() for t in str(text).split()]
        score = sum(self.words.get(t, 0.0) for t in tokens)
        return {"label": "positive" if score > 0 else "negative" if score < 0 else "neutral",
                "score": score}


def word_count() -> Any:
    """A factory: the object it returns is served (``model.predict(x)``)."""

    class Counter:
        def predict(self, text: str = "") -> int:  # the JSON body's fields are keywords
            return len(str(text).split())

    return Counter()
