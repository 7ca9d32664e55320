"""Models for examples/many/models.toml: one small model per customer, loaded on demand, and
a ranker with three versions (no download needed).

    PYTHONPATH=examples/many python app.py --config examples/many/models.toml
    curl -s localhost:8000/v1/models/acme/predict -H 'Content-Type: application/json' \\
         -d '{"text": "late delivery, refund please"}'          # acme loads on demand
    curl -si localhost:8000/v1/models/ranker/predict -H 'Content-Type: application/json' \\
         -d '{"query": "shoes", "items": ["red shoes", "hat", "shoe polish"]}'
    # X-IPCServe-Version in the answer: v1 (90 %) or v2 (10 %); pin one with that header
"""

from __future__ import annotations

import os
import zlib
from typing import Any

from ipcserve import MLProcess


class CustomerModel(MLProcess):
    """A customer's fine-tune, in miniature: labels a support message with the customer's own
    topics. Which customer is the model's name (``[models.NAME]``)."""

    TOPICS = ("billing", "delivery", "account", "other")

    def load(self) -> None:
        # A real fine-tune loads its weights here (seconds, hundreds of MB): why it is lazy.
        self.seed = zlib.crc32(self.name.encode())

    def predict(self, text: str = "") -> Any:
        words = str(text).lower().split()
        topic = ("billing" if {"refund", "invoice", "charge"} & set(words) else
                 "delivery" if {"late", "delivery", "parcel"} & set(words) else
                 self.TOPICS[(self.seed + len(words)) % len(self.TOPICS)])
        return {"customer": self.name, "topic": topic, "pid": os.getpid()}


class RankerV1(MLProcess):
    """Ranks items by the words they share with the query (the stable version)."""

    def score(self, query: str, item: str) -> float:
        q = set(query.lower().split())
        return float(len(q & set(item.lower().split())))

    def predict(self, query: str = "", items: list[str] | None = None) -> Any:
        items = list(items or [])
        ranked = sorted(items, key=lambda item: -self.score(query, item))
        return {"ranked": ranked}


class RankerV2(RankerV1):
    """The candidate: also counts prefixes ("shoe" matches "shoes"); the canary."""

    def score(self, query: str, item: str) -> float:
        exact = super().score(query, item)
        prefixes = sum(1 for q in query.lower().split() for w in item.lower().split()
                       if q != w and (w.startswith(q[:4]) or q.startswith(w[:4])))
        return exact + 0.5 * prefixes


class RankerV3(RankerV2):
    """An experiment that only shadows: its answers are compared, never sent."""

    def predict(self, query: str = "", items: list[str] | None = None) -> Any:
        answer = super().predict(query, items)
        answer["ranked"].reverse()
        return answer
