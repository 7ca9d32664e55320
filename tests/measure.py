"""Measuring a server or a model from outside: Prometheus samples, bursts of concurrent
requests, step counters that settle. Shared by the test files (one copy of each helper)."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import threading
import time
from typing import Any
from urllib.parse import urlsplit

#: A step of the stepping fixture models (tests/models.py Stepper and friends), in seconds.
STEP = 0.02

Answer = tuple[int, float, dict[str, str], bytes]


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels are exactly ``labels`` in a Prometheus
    text exposition (read with prometheus_client's own parser), or None when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return None


def metrics(url: str) -> str:
    """The server's ``/metrics`` text (``url``: the server's base URL)."""
    import requests

    return str(requests.get(f"{url}/metrics", timeout=10).text)


def burst(url: str, clients: int, seconds: float, path: str = "/predict") -> list[Answer]:
    """``clients`` concurrent ``POST path {"seconds": ...}``, sent together (connections made
    first, then a barrier): ``(status, elapsed, headers, body)`` per client."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    barrier = threading.Barrier(clients, timeout=30)
    results: list[Answer] = []
    errors: list[BaseException] = []

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.connect()
            barrier.wait()
            started = time.monotonic()
            conn.request("POST", path, body=json.dumps({"seconds": seconds}),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
            results.append((response.status, time.monotonic() - started,
                            {k.lower(): v for k, v in response.getheaders()}, body))
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(results) == clients
    return results


def step_counter() -> Any:
    """A shared integer the stepping models count their steps in (travels to spawned ML
    processes)."""
    return multiprocessing.get_context("spawn").Value("i", 0)


def settled(counter: Any, step: float = STEP) -> int:
    """The step count once it stops changing for a few steps (bounded)."""
    last, stable_since = counter.value, time.monotonic()
    deadline = time.monotonic() + 10
    tick = threading.Event()
    while time.monotonic() - stable_since < 6 * step:
        assert time.monotonic() < deadline, "the model never stopped stepping"
        tick.wait(step / 2)
        if counter.value != last:
            last, stable_since = counter.value, time.monotonic()
    return int(last)
