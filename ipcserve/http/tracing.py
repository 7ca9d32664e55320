"""OpenTelemetry tracing (``tracing = true``; ``pip install 'ipcserve[otel]'``).

With tracing on, every HTTP request is a server span (a W3C ``traceparent`` header makes it a
child of the caller's trace; named ``METHOD route`` with the HTTP semantic conventions'
attributes), and a model request adds, as children of it:

- ``ipcserve.admission``: taking a place among the model's calls in flight (a shed request
  ends here, with the error);
- ``ipcserve.queue``: the wait in the ML process before its model call started;
- ``ipcserve.model``: the model call, with ``ipcserve.batch_size`` and a link to the request
  span of every other traced request that shared the call (a batch of 8: 8 request spans,
  each linked to the 7 others);
- ``ipcserve.stream``: a streamed answer, from its first item to its end (with an event when
  the client leaves and the rest is cancelled).

The request's ``traceparent`` travels with it through the pipe; the ML process answers with
when its model call started and the traceparents of its batch-mates, and the web process
records the queue and model spans with those times (the ML process needs no tracing SDK and
pays nothing: without a trace, nothing is collected). Spans go to the tracer provider the app
set up, or else to one ipcserve sets up that exports them with OTLP over HTTP, configured by
the standard ``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``...).

The server span is made here with the API's W3C propagator rather than by
opentelemetry-instrumentation-flask: each of its releases pins one exact release of the
semantic conventions, which holds the SDK one release behind the newest (1.45.1 against
1.45.2 when this was written) in every environment that installs both, Ray Serve's
included; ``ipcserve[otel]`` needs only the API, the SDK and the OTLP exporter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from ..engine.errors import ConfigError

__all__ = ["Tracing"]

logger = logging.getLogger(__name__)


def _wall_ns(monotonic: float) -> int:
    """A ``time.monotonic()`` instant as epoch nanoseconds (what spans take)."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class Tracing:
    """The spans of one app's requests (see the module docstring).

    Raises:
        ConfigError: the OpenTelemetry packages are not installed.
    """

    def __init__(self, app: Any) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider  # noqa: F401
        except ImportError:
            raise ConfigError("IPCSERVE_TRACING needs OpenTelemetry: pip install "
                              "'ipcserve[otel]'") from None
        self.trace = trace
        _provide(trace)
        self.tracer = trace.get_tracer("ipcserve")

    def begin(self) -> None:
        """``before_request``: the request's server span, current until :meth:`end`."""
        from flask import g, request
        from opentelemetry import context, propagate

        rule = request.url_rule
        route = rule.rule if rule is not None else request.path
        span = self.tracer.start_span(
            f"{request.method} {route}", context=propagate.extract(request.headers),
            kind=self.trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.path,
                        "http.route": route, "url.scheme": request.scheme})
        g.ipcserve_span = span
        g.ipcserve_span_token = context.attach(self.trace.set_span_in_context(span))

    def status(self, response: Any) -> Any:
        """``after_request``: the answer's status on the server span."""
        from flask import g
        from opentelemetry.trace import Status, StatusCode

        span = g.get("ipcserve_span")
        if span is not None:
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
        return response

    def end(self, error: BaseException | None = None) -> None:
        """``teardown_request``: end the server span (a streamed answer's own span goes on
        until its end)."""
        from flask import g
        from opentelemetry import context

        span = g.pop("ipcserve_span", None)
        token = g.pop("ipcserve_span_token", None)
        if span is None:
            return
        if error is not None:
            span.record_exception(error)
        span.end()
        if token is not None:
            context.detach(token)

    def traceparent(self) -> str | None:
        """The current span as a W3C traceparent (for the ML process), or None."""
        context = self.trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Any]:
        """A live child span of the current one (its errors recorded)."""
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def call(self, model: str, stats: Any, parent: Any) -> None:
        """The queue and model spans of a model call that answered (``stats``: its
        :class:`~ipcserve.engine.channel.CallResult`), children of ``parent`` (a context)."""
        if not stats.started:
            return
        from opentelemetry.trace import Link

        started = _wall_ns(stats.started)
        queued = started - int(stats.queue_wait * 1e9)
        queue = self.tracer.start_span("ipcserve.queue", context=parent, start_time=queued,
                                       attributes={"ipcserve.model": model})
        queue.end(end_time=started)
        links = [Link(context) for context in map(_context_of, stats.links) if context]
        span = self.tracer.start_span(
            "ipcserve.model", context=parent, start_time=started, links=links,
            attributes={"ipcserve.model": model, "ipcserve.batch_size": stats.batch_size})
        span.end(end_time=started + int(stats.inference_time * 1e9))

    def failed(self, error: BaseException, status: int) -> None:
        """The request ends with ``error``: on its span, a ``cancelled`` event (the client
        left or its deadline passed: 499/504) or the exception."""
        span = self.trace.get_current_span()
        if status in (499, 504):
            span.add_event("cancelled", {"reason": type(error).__name__,
                                         "message": str(error)[:200]})
        else:
            span.record_exception(error)

    def context(self) -> Any:
        """The current context (the request span's), to parent spans recorded later."""
        from opentelemetry import context

        return context.get_current()

    def stream(self, model: str, parent: Any, begun: int, status: int) -> None:
        """The span of a streamed answer, from ``begun`` (epoch ns) to now, child of
        ``parent``: cancelled (the client left, 499) or failed (5xx) noted."""
        from opentelemetry.trace import Status, StatusCode

        span = self.tracer.start_span("ipcserve.stream", context=parent, start_time=begun,
                                      attributes={"ipcserve.model": model,
                                                  "http.response.status_code": status})
        if status == 499:
            span.add_event("cancelled", {"reason": "the client left"})
        elif status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


def _context_of(traceparent: str) -> Any:
    """The span context a traceparent names, or None."""
    from opentelemetry.trace import SpanContext, TraceFlags

    parts = traceparent.split("-")
    if len(parts) != 4:
        return None
    try:
        context = SpanContext(int(parts[1], 16), int(parts[2], 16), is_remote=True,
                              trace_flags=TraceFlags(int(parts[3], 16)))
    except ValueError:
        return None
    return context if context.is_valid else None


def _provide(trace: Any) -> None:
    """Set up a tracer provider exporting by OTLP, unless the app has one already."""
    from opentelemetry.sdk.trace import TracerProvider

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return  # the app's own (or opentelemetry-instrument's)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    named = os.environ.get("OTEL_SERVICE_NAME")  # the standard variable wins
    provider = TracerProvider(resource=Resource.create({} if named else {
        "service.name": "ipcserve"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    logger.info("tracing: spans are exported by OTLP (OTEL_EXPORTER_OTLP_ENDPOINT)")
