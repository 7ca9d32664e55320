"""Prometheus metrics, built with prometheus_client collectors. No Flask import.

Each :class:`Metrics` has its own ``CollectorRegistry`` so several apps (or tests) in one
process never collide. Counters about ML processes (restarts, crashes, hangs killed) are read
from the shared status block at scrape time, so they are right even when another web
process (gunicorn) made the calls.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from ..engine.statusblock import STEP_BUCKETS
from .history import History

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _StatusCollector:
    """Yields per-model gauges and counters from each MLProcess's status at scrape time."""

    def __init__(self, models: Callable[[], dict[str, Any]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        restarts = CounterMetricFamily("ipcserve_restarts", "ML process restarts", labels=["model"])
        crashes = CounterMetricFamily("ipcserve_crashes", "ML process deaths (crashes and watchdog kills)",
                                      labels=["model"])
        hangs = CounterMetricFamily("ipcserve_hangs_killed", "ML processes killed by the watchdog",
                                    labels=["model"])
        depth = GaugeMetricFamily("ipcserve_queue_depth", "Calls in flight in this web process",
                                  labels=["model"])
        ready = GaugeMetricFamily("ipcserve_model_ready", "1 when every ML process is ready",
                                  labels=["model"])
        circuit = GaugeMetricFamily("ipcserve_circuit_open", "1 while the circuit breaker is open",
                                    labels=["model"])
        cancelled = CounterMetricFamily(
            "ipcserve_cancelled", "Requests cancelled because nobody waited for them any more",
            labels=["model", "reason", "stage"])
        saved = CounterMetricFamily(
            "ipcserve_cancel_saved_seconds",
            "Estimated model time saved by cancelling (queued: never computed; running: interrupted)",
            labels=["model"])
        steps = _StepFamilies()
        for name, ml in self._models().items():
            status = ml.status
            steps.add(name, ml, status.get("steps"))
            workers = status.get("workers", [])
            restarts.add_metric([name], sum(w["restarts"] for w in workers))
            crashes.add_metric([name], status.get("crashes", 0))
            hangs.add_metric([name], status.get("hangs_killed", 0))
            depth.add_metric([name], status.get("inflight", 0))
            ready.add_metric([name], 1.0 if status.get("ready") else 0.0)
            circuit.add_metric([name], 1.0 if status.get("circuit_open") else 0.0)
            for key, count in status.get("cancelled", {}).items():
                stage, _, reason = key.partition("_")
                cancelled.add_metric([name, reason, stage], count)
            saved.add_metric([name], status.get("cancel_saved_seconds", 0.0))
        yield from (restarts, crashes, hangs, depth, ready, circuit, cancelled, saved)
        yield from steps.families()


class _StepFamilies:
    """The generation figures of the ML processes' step schedulers (engine/stepping.py),
    for text-generation models and any model that steps its streams."""

    def __init__(self) -> None:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        self.running = GaugeMetricFamily(
            "ipcserve_running_batch_size",
            "Sequences in the generation step running now (the continuous batch), over the "
            "model's ML processes", labels=["model"])
        self.steps = CounterMetricFamily(
            "ipcserve_generation_steps",
            "Generation steps (one model call for every active stream)", labels=["model"])
        self.rows = CounterMetricFamily(
            "ipcserve_generation_rows",
            "Sequences over all generation steps (per step: the average batch size)",
            labels=["model"])
        self.tokens = CounterMetricFamily(
            "ipcserve_generated_tokens", "Tokens generated (its rate: tokens/s)",
            labels=["model"])
        self.first = HistogramMetricFamily(
            "ipcserve_time_to_first_token_seconds",
            "Per stream: from the ML process reading the request to its first token",
            labels=["model"])
        self.between = HistogramMetricFamily(
            "ipcserve_inter_token_latency_seconds",
            "Per stream: time between its successive tokens", labels=["model"])

    def add(self, name: str, ml: Any, steps: Any) -> None:
        if not isinstance(steps, dict) or not (steps.get("steps") or getattr(
                ml, "task", None) == "text-generation"):
            return
        self.running.add_metric([name], steps["rows"])
        self.steps.add_metric([name], steps["steps"])
        self.rows.add_metric([name], steps["rows_total"])
        self.tokens.add_metric([name], steps["tokens"])
        for family, figures in ((self.first, steps["first_item"]),
                                (self.between, steps["between_items"])):
            bounds = [*map(str, STEP_BUCKETS), "+Inf"]
            cumulative = list(itertools.accumulate(figures["buckets"]))
            family.add_metric([name], list(zip(bounds, cumulative)), figures["sum"])

    def families(self) -> Iterator[Any]:
        yield from (self.running, self.steps, self.rows, self.tokens, self.first, self.between)


class Metrics:
    """The request-level metrics of one ipcserve app."""

    def __init__(self, models: Callable[[], dict[str, Any]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("ipcserve_requests", "HTTP prediction requests by model and status",
                                ["model", "status"], registry=self.registry)
        self.latency = Histogram("ipcserve_request_latency_seconds",
                                 "Whole prediction request time in the web process", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("ipcserve_queue_wait_seconds",
                                    "Per request: time it waited in the ML process before its batch started",
                                    ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("ipcserve_inference_seconds", "Per request: compute time of the batch it was in",
                                   ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("ipcserve_batch_size", "Per request: items in the model call that answered it", ["model"],
                                    buckets=_BATCH_BUCKETS, registry=self.registry)
        self.shed = Counter("ipcserve_shed", "Requests refused at once because of overload",
                            ["model"], registry=self.registry)
        self.cache = Counter("ipcserve_cache_requests", "Cached models' requests by cache result "
                             "(hit: answered from the cache; miss: computed)",
                             ["model", "result"], registry=self.registry)
        self.registry.register(_StatusCollector(models))
        # The last 15 minutes of each model, for the status page (GET /v1/history).
        self.history = History()
        # Labelled children resolved once: labels() costs a lock and a dict lookup per call.
        self._children: dict[tuple[str, int], tuple[Any, ...]] = {}

    def _of(self, model: str, status: int) -> tuple[Any, ...]:
        key = (model, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(model, str(status)), self.latency.labels(model),
                        self.queue_wait.labels(model), self.inference.labels(model),
                        self.batch_size.labels(model))
            self._children[key] = children
        return children

    def observe(self, model: str, status: int, seconds: float, stats: Any = None,
                queue_depth: int | None = None) -> None:
        """Record one finished prediction request (also in :attr:`history`).

        Args:
            queue_depth: the model's calls in flight when it finished, for the history.
        """
        requests, latency, queue_wait, inference, batch_size = self._of(model, status)
        requests.inc()
        latency.observe(seconds)
        batch = None
        if stats is not None and stats.batch_size:
            batch = stats.batch_size
            queue_wait.observe(stats.queue_wait)
            inference.observe(stats.inference_time)
            batch_size.observe(batch)
        self.history.record(model, status, seconds, batch, queue_depth)

    def cache_result(self, model: str, hit: bool) -> None:
        """Record one request to a cached model: answered from the cache, or not."""
        self.cache.labels(model, "hit" if hit else "miss").inc()

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
