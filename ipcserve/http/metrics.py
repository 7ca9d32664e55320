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

__all__ = ["Metrics", "SHED_ESTIMATE", "SHED_INFLIGHT", "SHED_QUEUE_DEADLINE"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# Why a request was shed: the ``reason`` label of ipcserve_shed_total. A new way of shedding
# adds its own reason here (and a row in docs/http.md's metrics table).
#: ``max_inflight`` calls were in flight (the serving core's admission).
SHED_INFLIGHT = "inflight"
#: The calls ahead of it would have it answered after its deadline (admission by estimate,
#: :mod:`ipcserve.engine.admission`; ``OverloadedError.reason``).
SHED_ESTIMATE = "estimate"
#: The request waited in the HTTP server's queue past its deadline, and was answered before
#: it reached Flask (:mod:`ipcserve.server.waitress_conf`).
SHED_QUEUE_DEADLINE = "queue_deadline"


class _StatusCollector:
    """Yields per-model gauges and counters from each MLProcess's status at scrape time."""

    def __init__(self, models: Callable[[], dict[str, Any]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        # Admission's estimate (engine/admission.py), without its margin; absent until the
        # model has timed a batch. (Its own loop: the other series are built below.)
        estimated_wait = GaugeMetricFamily(
            "ipcserve_estimated_wait_seconds",
            "Estimated seconds until a request admitted now would be answered", labels=["model"])
        for name, ml in self._models().items():
            wait = ml.status.get("estimated_wait")
            if wait is not None:
                estimated_wait.add_metric([name], wait)
        yield estimated_wait
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
        handovers = CounterMetricFamily(
            "ipcserve_channel_handovers_failed",
            "New channels an ML process took off the queue and could not decode (their callers "
            "sent again on a fresh channel)", labels=["model"])
        supervisor = CounterMetricFamily(
            "ipcserve_supervisor_failures",
            "Supervisor ticks that raised (the model is not ready until one completes)",
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
            handovers.add_metric([name], status.get("handovers_failed", 0))
            supervisor.add_metric([name], status.get("supervisor_failures", 0))
        yield from (restarts, crashes, hangs, depth, ready, circuit, cancelled, saved, handovers,
                    supervisor)

        yield from steps.families()

class _VersionCollector:
    """Yields the model pool's and the versions' series at scrape time: what is loaded,
    loads and unloads by reason, the traffic split, rollbacks and shadow comparisons."""

    def __init__(self, versions: Callable[[], list[dict[str, Any]]],
                 pool: Callable[[], dict[str, Any]]) -> None:
        self._versions = versions
        self._pool = pool

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        both = ["model", "version"]
        loaded = GaugeMetricFamily("ipcserve_model_loaded", "1 while the version's ML "
                                   "processes are loaded (0: not loaded yet, evicted or "
                                   "unloaded; loaded again on demand)", labels=both)
        loads = CounterMetricFamily("ipcserve_model_loads", "Loads by the model pool, by "
                                    "reason (demand: a request needed it)",
                                    labels=[*both, "reason"])
        unloads = CounterMetricFamily("ipcserve_model_unloads", "Versions stopped by the "
                                      "model pool, by reason (evicted: room for another "
                                      "model; idle: idle_unload passed)", labels=[*both, "reason"])
        failures = CounterMetricFamily("ipcserve_model_load_failures", "Loads on demand that "
                                       "failed (retried after a backoff)", labels=both)
        share = GaugeMetricFamily("ipcserve_version_share", "Percent of the model's traffic "
                                  "the version gets (the stable one: what the canaries leave)",
                                  labels=both)
        rollbacks = CounterMetricFamily("ipcserve_rollbacks", "Canaries rolled back, by reason "
                                        "(auto: error rate over the threshold; api)",
                                        labels=[*both, "reason"])
        shadow = CounterMetricFamily("ipcserve_shadow_results", "Copies of requests sent to a "
                                     "shadow version, by result (agree, disagree, error, "
                                     "dropped, skipped)", labels=[*both, "result"])
        for row in self._versions():
            key = [row["model"], row["version"]]
            loaded.add_metric(key, 1.0 if row["loaded"] else 0.0)
            for reason, count in row["loads"].items():
                loads.add_metric([*key, reason], count)
            for reason, count in row["unloads"].items():
                unloads.add_metric([*key, reason], count)
            failures.add_metric(key, row["load_failures"])
            share.add_metric(key, row["share"])
            for reason, count in row["rollbacks"].items():
                rollbacks.add_metric([*key, reason], count)
            for result, count in row["shadow_results"].items():
                shadow.add_metric([*key, result], count)
        pool = self._pool()
        count = GaugeMetricFamily("ipcserve_loaded_models", "Model versions loaded in the "
                                  "model pool (max_loaded_models caps it)")
        count.add_metric([], pool["loaded"])
        memory = GaugeMetricFamily("ipcserve_loaded_memory_bytes", "Resident memory of the "
                                   "loaded versions' ML processes (max_loaded_memory caps it)")
        memory.add_metric([], pool["memory_bytes"])
        yield from (loaded, loads, unloads, failures, share, rollbacks, shadow, count, memory)


class _KeyCollector:
    """Yields each API key's usage at scrape time (by its name in the keys file)."""

    def __init__(self, usage: Callable[[], dict[str, dict[str, int]]]) -> None:
        self._usage = usage

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        requests = CounterMetricFamily("ipcserve_key_requests", "Requests each API key made "
                                       "within its quota", labels=["key"])
        limited = CounterMetricFamily("ipcserve_key_limited", "Requests refused 429 because "
                                      "the key was over its quota", labels=["key"])
        tokens = CounterMetricFamily("ipcserve_key_tokens", "Prompt and generated tokens of "
                                     "each key's answers (OpenAI routes)", labels=["key"])
        for name, counts in self._usage().items():
            requests.add_metric([name], counts["requests"])
            limited.add_metric([name], counts["limited"])
            tokens.add_metric([name], counts["tokens"])
        yield from (requests, limited, tokens)


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
    """The request-level metrics of one ipcserve app.

    Args:
        models: ``{name: MLProcess}`` of the models' stable versions, read at scrape time.
        versions: one row per version (``model``, ``version``, ``loaded``, ``loads``,
            ``unloads``, ``load_failures``, ``share``, ``rollbacks``, ``shadow_results``),
            read at scrape time.
        pool: the model pool's counts (``loaded``, ``memory_bytes``), read at scrape time.
    """

    def __init__(self, models: Callable[[], dict[str, Any]],
                 versions: Callable[[], list[dict[str, Any]]] | None = None,
                 pool: Callable[[], dict[str, Any]] | None = None) -> None:
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
        self.shed = Counter("ipcserve_shed", "Requests refused at once because of overload, by "
                            "reason (inflight: max_inflight calls in flight; estimate: it would "
                            "be answered after its deadline; queue_deadline: waited in the "
                            "server's queue past the deadline)",
                            ["model", "reason"], registry=self.registry)
        self.cache = Counter("ipcserve_cache_requests", "Cached models' requests by cache result "
                             "(hit: answered from the cache; miss: computed)",
                             ["model", "result"], registry=self.registry)
        self.cache_errors = Counter("ipcserve_cache_errors", "Response cache backend errors by "
                                    "operation (get, set, clear); a failed get is neither a hit "
                                    "nor a miss: the model answers",
                                    ["model", "op"], registry=self.registry)
        self.version_requests = Counter(
            "ipcserve_version_requests", "Requests of models with several versions, by the "
            "version that answered and status", ["model", "version", "status"],
            registry=self.registry)
        self.version_latency = Histogram(
            "ipcserve_version_request_latency_seconds", "Whole request time of models with "
            "several versions, by the version that answered", ["model", "version"],
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StatusCollector(models))
        if versions is not None and pool is not None:
            self.registry.register(_VersionCollector(versions, pool))
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

    def track_keys(self, keys: Any) -> None:
        """Export the usage of each API key of ``keys`` (:class:`.keys.Keys`)."""
        self.registry.register(_KeyCollector(keys.usage))

    def observe_version(self, model: str, version: str, status: int, seconds: float) -> None:
        """Record one finished request of a model with several versions, by version (also
        in :attr:`history`, as ``model@version``)."""
        self.version_requests.labels(model, version, str(status)).inc()
        self.version_latency.labels(model, version).observe(seconds)
        self.history.record(f"{model}@{version}", status, seconds)

    def shed_request(self, model: str, reason: str, seconds: float | None = None,
                     status: int = 503) -> None:
        """Record one request refused because of overload.

        Args:
            model: the model it was for; ``""`` when its URL names none.
            reason: why (:data:`SHED_INFLIGHT`, :data:`SHED_QUEUE_DEADLINE`, ...).
            seconds: for a request refused before it reached the serving core (which counts
                the others once they finish): its time in the server. It is then also
                counted as a request of ``model`` with ``status``, in the latency and the
                history, like a request the core shed.
            status: the status it was answered with (with ``seconds`` only).
        """
        self.shed.labels(model, reason).inc()
        if seconds is not None and model:
            requests, latency, *_ = self._of(model, status)
            requests.inc()
            latency.observe(seconds)
            self.history.record(model, status, seconds)

    def cache_result(self, model: str, hit: bool) -> None:
        """Record one request to a cached model: answered from the cache, or not."""
        self.cache.labels(model, "hit" if hit else "miss").inc()

    def cache_error(self, model: str, op: str) -> None:
        """Record one failed operation (``get``, ``set``, ``clear``) of a model's cache backend."""
        self.cache_errors.labels(model, op).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
