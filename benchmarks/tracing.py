"""What tracing costs per request: ``python benchmarks/tracing.py``.

Serves Doubler (tests/models.py: a trivial model, so that the HTTP path is all there is) with
ipcserve's waitress in this process, three ways in turn: tracing off; tracing on, spans
dropped by an exporter that does nothing (the cost of making them); tracing on, spans kept in
memory. For each: ``--requests`` sequential requests (c=1, p50 and p95 latency) and the same
number from 8 threads (requests per second), after a warm-up. One run compares the three;
the machine is noisy, so read the ratios. Writes a Markdown table to stdout and
``benchmarks/results/tracing.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def _serve(tracing: bool) -> tuple[Any, Any, str]:
    from flask import Flask
    from models import Doubler

    from ipcserve.http.extension import IPCServe
    from ipcserve.server.waitress_conf import create_server

    app = Flask(f"bench-{tracing}")
    app.config["IPCSERVE_TRACING"] = tracing
    ipc = IPCServe(app)
    ipc.add_model(Doubler(name="doubler", max_inflight=64))
    ipc.start()
    server = create_server(app, port=0)
    threading.Thread(target=server.run, daemon=True).start()
    return ipc, server, f"http://127.0.0.1:{server.effective_port}/v1/models/doubler/predict"


def _measure(url: str, count: int) -> tuple[float, float, float]:
    import requests

    session = requests.Session()
    for _ in range(200):  # warm-up
        session.post(url, json={"x": 2}, timeout=30)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        session.post(url, json={"x": 2}, timeout=30).raise_for_status()
        times.append(time.perf_counter() - start)
    sessions = threading.local()

    def one(_: int) -> None:
        if not hasattr(sessions, "s"):
            sessions.s = requests.Session()
        sessions.s.post(url, json={"x": 2}, timeout=30).raise_for_status()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))
    rate = count / (time.perf_counter() - start)
    times.sort()
    return statistics.median(times) * 1e3, times[int(0.95 * len(times))] * 1e3, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    trace.set_tracer_provider(provider)
    dropping = SimpleSpanProcessor(Drop())
    rows = []
    for label, tracing, processor in (("off", False, None), ("on, spans dropped", True, dropping),
                                      ("on, spans kept in memory", True,
                                       SimpleSpanProcessor(InMemorySpanExporter()))):
        if processor is not None:
            provider._active_span_processor._span_processors = (processor,)  # one at a time
        ipc, server, url = _serve(tracing)
        try:
            rows.append((label, *_measure(url, args.requests)))
        finally:
            server.close()
            ipc.shutdown()
    base = rows[0]
    lines = [f"{platform.processor() or platform.machine()}, Python "
             f"{platform.python_version()}, {args.requests} requests each", "",
             "| tracing | c=1 p50 (ms) | c=1 p95 (ms) | c=8 requests/s | c=8 vs off |",
             "|---|---|---|---|---|"]
    for label, p50, p95, rate in rows:
        lines.append(f"| {label} | {p50:.2f} | {p95:.2f} | {rate:.0f} | {rate / base[3]:.2f}x |")
    text = "\n".join(lines)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "tracing.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
