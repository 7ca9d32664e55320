"""The last minutes of each model's traffic, kept in the web process for the status page.

A fixed-size ring of time buckets per model (default: 180 buckets of 5 s = 15 minutes); no
database, no thread, nothing that grows with traffic. Each bucket holds, for the requests
that *finished* in it: counts by outcome, a bounded latency sample (for p50/p95/p99), the
batch sizes of the model calls that answered them, and the largest number of calls in
flight seen when one finished (the queue depth).

Recording is O(1) under one lock and allocates nothing once a bucket's sample is full; the
percentiles are computed only when :meth:`History.snapshot` is asked for (``GET
/v1/history``). With several web processes (gunicorn) each has its own history: it shows the
requests that process answered. No Flask import.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["History", "OUTCOMES", "outcome_of"]

#: The outcome columns of every bucket, in chart order.
OUTCOMES = ("200", "4xx", "503", "504", "cancelled", "5xx")


def outcome_of(status: int) -> str:
    """The outcome column of an HTTP status (499 is ipcserve's "client went away")."""
    if status == 499:
        return "cancelled"
    if 200 <= status < 400:
        return "200"
    if status in (503, 504):
        return str(status)
    if status == 429:  # shed with shed_status=429: the same outcome as a 503 shed
        return "503"
    return "4xx" if 400 <= status < 500 else "5xx"


class _Bucket:
    """One time slice of one model; reused in place when the ring wraps around."""

    __slots__ = ("slot", "counts", "sample", "seen", "batch_sum", "batch_n", "batch_max",
                 "depth")

    def __init__(self, sample_size: int) -> None:
        self.slot = -1  # which absolute bucket number (time // width) this holds
        self.counts = [0] * len(OUTCOMES)
        self.sample: list[float] = []
        self.seen = 0  # latencies offered to the sample (reservoir sampling)
        self.batch_sum = 0
        self.batch_n = 0
        self.batch_max = 0
        self.depth = 0

    def reset(self, slot: int) -> None:
        self.slot = slot
        for i in range(len(self.counts)):
            self.counts[i] = 0
        self.sample.clear()
        self.seen = self.batch_sum = self.batch_n = self.batch_max = self.depth = 0


class History:
    """Per-model rings of request buckets.

    Args:
        bucket_seconds: width of one bucket.
        span_seconds: how far back the history reaches (rounded up to whole buckets).
        sample_size: latencies kept per bucket for the percentiles (a uniform reservoir
            sample of the bucket's requests once more arrive).
        clock: wall-clock time source (``time.time``); tests pass their own.
    """

    def __init__(self, bucket_seconds: float = 5.0, span_seconds: float = 900.0,
                 sample_size: int = 128, clock: Callable[[], float] = time.time) -> None:
        if bucket_seconds <= 0:
            raise ValueError(f"bucket_seconds must be > 0, got {bucket_seconds}")
        if span_seconds < bucket_seconds:
            raise ValueError(f"span_seconds must be >= bucket_seconds ({bucket_seconds}), "
                             f"got {span_seconds}")
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        self.bucket_seconds = float(bucket_seconds)
        self.size = math.ceil(span_seconds / bucket_seconds)
        self.sample_size = sample_size
        self._clock = clock
        self._lock = threading.Lock()
        self._rings: dict[str, list[_Bucket]] = {}
        self._random = random.Random(0)

    def _ring(self, model: str) -> list[_Bucket]:
        ring = self._rings.get(model)
        if ring is None:
            ring = [_Bucket(self.sample_size) for _ in range(self.size)]
            self._rings[model] = ring
        return ring

    def record(self, model: str, status: int, seconds: float, batch_size: int | None = None,
               queue_depth: int | None = None) -> None:
        """Count one finished request of ``model``.

        Args:
            status: the HTTP status it was answered with.
            seconds: its whole time in the web process.
            batch_size: items in the model call that answered it, if it reached the model.
            queue_depth: calls in flight for this model when it finished.
        """
        column = OUTCOMES.index(outcome_of(status))
        slot = int(self._clock() // self.bucket_seconds)
        with self._lock:
            bucket = self._ring(model)[slot % self.size]
            if bucket.slot != slot:
                bucket.reset(slot)
            bucket.counts[column] += 1
            bucket.seen += 1
            if len(bucket.sample) < self.sample_size:
                bucket.sample.append(seconds)
            else:
                j = self._random.randrange(bucket.seen)
                if j < self.sample_size:
                    bucket.sample[j] = seconds
            if batch_size:
                bucket.batch_sum += batch_size
                bucket.batch_n += 1
                bucket.batch_max = max(bucket.batch_max, batch_size)
            if queue_depth is not None:
                bucket.depth = max(bucket.depth, queue_depth)

    def snapshot(self, models: list[str] | None = None) -> dict[str, Any]:
        """The history as JSON-ready columns, oldest bucket first.

        Args:
            models: the models to include (default: every model seen); a listed model
                with no traffic yet gets all-zero series.

        Returns:
            ``{"bucket_seconds", "span_seconds", "now", "models": {name: {"t": [...],
            "requests": {outcome: [...]}, "rate": [...], "p50_ms": [...], "p95_ms": [...],
            "p99_ms": [...], "batch_mean": [...], "batch_max": [...],
            "queue_depth": [...]}}}``; ``t`` is each bucket's start (Unix seconds), ``rate``
            requests per second, and a percentile or batch value is null in a bucket
            without one.
        """
        now = self._clock()
        last = int(now // self.bucket_seconds)
        slots = range(last - self.size + 1, last + 1)
        result: dict[str, Any] = {}
        with self._lock:
            names = list(self._rings) if models is None else models
            copied = {name: [self._copy(b, s) for s in slots
                             for b in [self._ring(name)[s % self.size]]] for name in names}
        for name, buckets in copied.items():
            series: dict[str, Any] = {
                "t": [round(s * self.bucket_seconds, 3) for s in slots],
                "requests": {o: [b[0][i] for b in buckets] for i, o in enumerate(OUTCOMES)},
                "rate": [round(sum(b[0]) / self.bucket_seconds, 3) for b in buckets]}
            for q in (50, 95, 99):
                series[f"p{q}_ms"] = [_percentile(b[1], q) for b in buckets]
            series["batch_mean"] = [round(b[2] / b[3], 2) if b[3] else None for b in buckets]
            series["batch_max"] = [b[4] or None for b in buckets]
            series["queue_depth"] = [b[5] for b in buckets]
            result[name] = series
        return {"bucket_seconds": self.bucket_seconds,
                "span_seconds": self.bucket_seconds * self.size, "now": now, "models": result}

    @staticmethod
    def _copy(bucket: _Bucket, slot: int) -> tuple[list[int], list[float], int, int, int, int]:
        if bucket.slot != slot:  # never written, or left over from a lap ago
            return [0] * len(OUTCOMES), [], 0, 0, 0, 0
        return (list(bucket.counts), sorted(bucket.sample), bucket.batch_sum, bucket.batch_n,
                bucket.batch_max, bucket.depth)


def _percentile(ordered: list[float], q: int) -> float | None:
    """Nearest-rank percentile of sorted seconds, in milliseconds (None when empty)."""
    if not ordered:
        return None
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return round(ordered[rank] * 1000, 3)
