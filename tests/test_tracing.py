"""OpenTelemetry tracing through a real server (waitress on a real port, real ML processes):
the SDK's in-memory exporter receives the spans.

One request is one trace, continuing the caller's ``traceparent``: the server span, then
admission, queue wait and model call as its children, with the ML process's times; 8
requests that share a model call link to each other's request spans; a stream has its span.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

pytest.importorskip("opentelemetry.sdk.trace", reason="needs ipcserve[otel]")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def exporter() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the app's own provider: ipcserve uses it
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.fixture()
def events() -> tuple[Any, Any]:
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    return spawn.Event(), spawn.Event()


@pytest.fixture()  # per test: conftest checks that each test leaves no process behind
def url(exporter: Any, events: tuple[Any, Any]) -> Iterator[str]:
    from flask import Flask
    from models import BatchDoubler, FakeChat

    from ipcserve.http.extension import IPCServe
    from ipcserve.server.waitress_conf import create_server

    app = Flask("traced")
    app.config["IPCSERVE_TRACING"] = True
    ipc = IPCServe(app)
    # Batches of up to 8, each waiting up to 2 s to fill: 8 concurrent requests share a call.
    ipc.add_model(BatchDoubler(*events, name="batcher", max_batch_size=8,
                               max_batch_wait=2.0, timeout=30))
    ipc.add_model(FakeChat(name="chat"))
    ipc.add_model(BatchDoubler(*events, name="short", timeout=0.5))  # "block" passes it
    ipc.start()
    server = create_server(app, port=0)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    address = f"http://127.0.0.1:{server.effective_port}"
    _APPS[address] = ipc
    try:
        yield address
    finally:
        server.close()
        server.task_dispatcher.shutdown()
        ipc.shutdown()
        thread.join(10)


_APPS: dict[str, Any] = {}


def _app_of(url: str) -> Any:
    return _APPS[url]


def _of(spans: list[Any], trace_id: int) -> dict[str, Any]:
    return {s.name: s for s in spans if s.context.trace_id == trace_id}


def test_one_request_is_one_trace_parented_across_the_pipe(url: str, exporter: Any) -> None:
    exporter.clear()
    trace_id, parent = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    answer = requests.post(f"{url}/v1/models/batcher/predict", json={"x": 4}, timeout=30,
                           headers={"traceparent": f"00-{trace_id:032x}-{parent:016x}-01"})
    assert answer.status_code == 200, answer.text
    spans = _of(exporter.get_finished_spans(), trace_id)
    server = spans["POST /v1/models/<name>/predict"]
    assert server.parent.span_id == parent  # the caller's span
    assert server.attributes["http.response.status_code"] == 200
    for name in ("ipcserve.admission", "ipcserve.queue", "ipcserve.model"):
        assert spans[name].parent.span_id == server.context.span_id, name
    queue, model = spans["ipcserve.queue"], spans["ipcserve.model"]
    # The ML process's times: the wait, then the call, in order, inside the request.
    assert server.start_time <= queue.start_time <= queue.end_time == model.start_time
    assert model.start_time < model.end_time <= server.end_time
    assert model.attributes["ipcserve.batch_size"] == 1 and not model.links


def test_a_batch_of_8_links_its_8_request_spans(url: str, exporter: Any,
                                                events: tuple[Any, Any]) -> None:
    from conftest import wait_until

    entered, release = events
    answers: list[int] = []

    def one(x: Any) -> None:
        answers.append(requests.post(f"{url}/v1/models/batcher/predict", json={"x": x},
                                     timeout=30).status_code)

    # A first call holds the ML process while 8 requests arrive: they then share one call.
    blocker = threading.Thread(target=one, args=("block",))
    blocker.start()
    assert entered.wait(10)
    exporter.clear()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    ipc = _app_of(url)
    wait_until(lambda: ipc.models.get("batcher").ml.inflight == 9, what="8 requests in flight")
    release.set()
    for t in [blocker, *threads]:
        t.join(30)
    assert answers == [200] * 9
    spans = exporter.get_finished_spans()
    servers = {s.context.span_id: s for s in spans if s.name.startswith("POST ")}
    models = [s for s in spans if s.name == "ipcserve.model" and s.parent.span_id in servers
              and s.attributes["ipcserve.batch_size"] == 8]
    assert len(models) == 8, [s.attributes for s in spans if s.name == "ipcserve.model"]
    batch = {model.parent.span_id for model in models}
    assert len(batch) == 8  # 8 request spans...
    for model in models:  # ...each linked to the 7 others
        assert {link.context.span_id for link in model.links} == batch - {model.parent.span_id}


def test_a_stream_has_its_span(url: str, exporter: Any) -> None:
    exporter.clear()
    answer = requests.post(f"{url}/v1/chat/completions", timeout=30, stream=True, json={
        "model": "chat", "stream": True, "messages": [{"role": "user", "content": "a b c"}]})
    assert answer.status_code == 200 and b"[DONE]" in b"".join(answer.iter_content(None))
    answer.close()
    # The stream's span ends when the server has sent its end (bounded wait).
    deadline = time.monotonic() + 10
    while not any(s.name == "ipcserve.stream" for s in exporter.get_finished_spans()) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    spans = exporter.get_finished_spans()
    [stream] = [s for s in spans if s.name == "ipcserve.stream"]
    [server] = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert stream.parent.span_id == server.context.span_id
    assert stream.attributes["http.response.status_code"] == 200
    assert stream.end_time >= server.end_time  # the answer streams after the view returned


def test_a_request_past_its_deadline_has_a_cancelled_event(url: str, exporter: Any,
                                                           events: tuple[Any, Any]) -> None:
    entered, release = events
    exporter.clear()
    try:
        answer = requests.post(f"{url}/v1/models/short/predict", json={"x": "block"},
                               timeout=30)
        assert answer.status_code == 504, answer.text
    finally:
        release.set()
    [server] = [s for s in exporter.get_finished_spans() if s.name.startswith("POST ")]
    [event] = [e for e in server.events if e.name == "cancelled"]
    assert event.attributes["reason"] == "ResultDeadlineError"
    assert server.attributes["http.response.status_code"] == 504

