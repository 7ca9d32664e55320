"""The OpenAI API under ``/v1``, so that the ``openai`` client (``base_url=http://host:port/v1``)
and tools built on it talk to ipcserve models.

A model's role is its ``task`` attribute: ``"text-generation"`` serves
``POST /v1/chat/completions`` and ``POST /v1/completions``; ``"feature-extraction"`` serves
``POST /v1/embeddings``. ``GET /v1/models`` (in :mod:`ipcserve.flask_ext`) lists every model.

The contract with a text-generation model: ``predict(messages=[{"role", "content"}, ...] or
prompt="...", max_tokens=, temperature=, top_p=, stop=, seed=)`` returns a generator of
``{"text": "<delta>"}`` items and one final ``{"text": "", "finish_reason": "stop"|"length",
"usage": {"prompt_tokens": int, "completion_tokens": int}}``. Only the fields the request set
are passed, so the model's own defaults apply. An embedding model is called with
``texts=[str, ...], with_usage=True`` and returns ``{"vectors": [[float, ...]], "prompt_tokens": int}``.

Like the native predict route, a call takes an admission (``ml.admit()``) and runs with a
deadline counted from when the request arrived; a streamed response holds the admission until
its body ends, and closing the body (the client left) cancels the generation in the ML process.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. Request fields
are checked in :mod:`ipcserve.openai_fields`.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from . import decode, openai_fields
from ..engine.errors import (
    DeadlineError,
    IPCServeError,
    ModelError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RequestCancelledError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    WorkerUnavailableError,
)
from .extension import DISCONNECTED_KEY, RECEIVED_KEY, _Endpoint, _note_error, _state
from .openai_fields import ParamError

__all__ = ["EMBEDDING", "GENERATION", "blueprint"]

logger = logging.getLogger(__name__)

GENERATION = "text-generation"
EMBEDDING = "feature-extraction"

_ERROR_CODES: tuple[tuple[type[IPCServeError], str], ...] = (
    (UnauthorizedError, "invalid_api_key"), (NotFoundError, "model_not_found"),
    (PayloadTooLargeError, "request_too_large"), (UnsupportedMediaTypeError, "unsupported_media_type"),
    (OverloadedError, "overloaded"), (WorkerUnavailableError, "model_unavailable"),
    (DeadlineError, "timeout"), (RequestCancelledError, "cancelled"), (ModelError, "model_error"))


def blueprint() -> Blueprint:
    """The routes; :class:`ipcserve.IPCServe` nests them in its own blueprint."""
    bp = Blueprint("openai", __name__)
    bp.register_error_handler(IPCServeError, _error_response)
    bp.register_error_handler(HTTPException, _error_response)
    bp.register_error_handler(Exception, _internal_error)
    bp.add_url_rule("/v1/chat/completions", "chat", _chat, methods=["POST"])
    bp.add_url_rule("/v1/completions", "completions", _completions, methods=["POST"])
    bp.add_url_rule("/v1/embeddings", "embeddings", _embeddings, methods=["POST"])
    return bp


# -- errors ---------------------------------------------------------------------------
def error_body(exc: IPCServeError | HTTPException) -> tuple[int, dict[str, Any]]:
    """The status and OpenAI-shaped body for an error (never a traceback)."""
    if isinstance(exc, HTTPException):
        status, message = exc.code or 500, exc.description or ""
        param = code = None
        if status == 413:
            code = "request_too_large"
    else:
        status, message = exc.http_status, exc.message
        param, code = getattr(exc, "param", None), getattr(exc, "code", None)
        if code is None:
            code = next((c for cls, c in _ERROR_CODES if isinstance(exc, cls)), None)
        if isinstance(exc, NotFoundError) and param is None:
            param = "model"
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(exc: IPCServeError | HTTPException) -> Response:
    status, body = error_body(exc)
    if isinstance(exc, OverloadedError) and "ipcserve" in current_app.extensions:
        status = current_app.extensions["ipcserve"].shed_status  # the shed_status setting
    response = jsonify(body)
    response.status_code = status
    if status in (429, 503):
        retry_after = getattr(exc, "retry_after", None) or 1
        response.headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    return response


def _internal_error(exc: Exception) -> Response:
    logger.exception("unhandled error in %s %s", request.method, request.path)
    response = jsonify({"error": {"message": "the server hit an unexpected error; see its log",
                                  "type": "server_error", "param": None, "code": None}})
    response.status_code = 500
    return response


# -- request fields -------------------------------------------------------------------
def _body() -> dict[str, Any]:
    return decode.parse_json_object(request.get_data(cache=False))


def _endpoint(body: dict[str, Any], role: str, route: str) -> _Endpoint:
    name = body.get("model")
    endpoints = _state().ext.endpoints
    if not isinstance(name, str) or not name:
        raise ParamError("'model' is required: the name of a served model (GET /v1/models "
                         f"lists them: {', '.join(endpoints)})", "model")
    endpoint = endpoints.get(name)
    if endpoint is None:
        raise NotFoundError(f"the model {name!r} does not exist; models: "
                            f"{', '.join(endpoints) or 'none'}")
    task = getattr(endpoint.ml, "task", None)
    if task != role:
        raise ParamError(f"model {name!r} is a {task or 'plain'} model; {route} needs a "
                         f"{role} model", "model", "model_not_supported")
    return endpoint


# -- text generation ------------------------------------------------------------------
def _chat() -> Response:
    body = _body()
    endpoint = _endpoint(body, GENERATION, "/v1/chat/completions")
    return _generate(endpoint, *openai_fields.chat(body), chat=True)


def _completions() -> Response:
    body = _body()
    endpoint = _endpoint(body, GENERATION, "/v1/completions")
    return _generate(endpoint, *openai_fields.completion(body), chat=False)


def _pieces(stream: Any) -> Iterator[dict[str, Any]]:
    """The model's items, checked against the contract; a model that does not stream may
    answer with the whole list at once."""
    for item in stream:
        for piece in item if isinstance(item, list) and not stream.streaming else [item]:
            if not isinstance(piece, dict) or not isinstance(piece.get("text"), str):
                raise ModelError("the text-generation model must yield {'text': str} items, got "
                                 f"{type(piece).__name__}")
            yield piece


def _usage(final: dict[str, Any] | None, pieces: int) -> dict[str, int]:
    usage = final.get("usage") if final else None
    if not isinstance(usage, dict):  # a model that does not count: what we can tell
        usage = {"prompt_tokens": 0, "completion_tokens": pieces}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class _Reply:
    """OpenAI's response objects for one chat or completion request."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
                     "object": "chat.completion" if chat else "text_completion",
                     "created": int(time.time()), "model": model, "system_fingerprint": None}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        return {**self.head, "choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False,
              usage: Any = ..., choices: bool = True) -> bytes:
        body: dict[str, Any] = {**self.head, "choices": []}
        if self.chat:
            body["object"] = "chat.completion.chunk"
        if choices:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if self.chat:
                choice["delta"] = ({"role": "assistant"} if role else {}) | (
                    {} if text is None else {"content": text})
            else:
                choice["text"] = text or ""
            body["choices"] = [choice]
        if usage is not ...:
            body["usage"] = usage
        return sse(body)


def sse(value: Any) -> bytes:
    """One server-sent event carrying ``value`` as JSON."""
    return f"data: {json.dumps(value, separators=(',', ':'))}\n\n".encode()


_DONE = b"data: [DONE]\n\n"


def _generate(endpoint: _Endpoint, kwargs: dict[str, Any], wants_stream: bool,
              include_usage: bool, chat: bool) -> Response:
    state = _state()
    reply = _Reply(endpoint.name, chat)
    started = time.perf_counter()
    status, admission, stream, handed_off = 500, None, None, False
    try:
        if state.ext.draining.is_set():
            raise WorkerUnavailableError("the server is shutting down")
        received = request.environ.get(RECEIVED_KEY) or time.monotonic()
        ml, admission = endpoint.admit()
        stream = admission.stream((), kwargs, deadline=received + ml.config.timeout,
                                  cancel_if=request.environ.get(DISCONNECTED_KEY))
        pieces = _pieces(stream)
        if not wants_stream:
            texts, final = [], None
            for piece in pieces:
                texts.append(piece["text"])
                final = piece if "finish_reason" in piece else final
            finish = str(final["finish_reason"]) if final else "stop"
            status = 200
            return jsonify(reply.whole("".join(texts), finish, _usage(final, len(texts))))
        # The first piece is awaited here, so an error before any token gets its status.
        first = next(pieces, None)
        events = _events(reply, pieces, first, include_usage, stream, admission, endpoint,
                         state.metrics, started)
        handed_off, status = True, 200
        return Response(events, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    except (IPCServeError, HTTPException) as exc:
        status = _failed(endpoint, state.metrics, exc)
        raise
    finally:
        if not handed_off:
            _finish(endpoint, state.metrics, stream, admission, status, started)


def _failed(endpoint: _Endpoint, metrics: Any, exc: IPCServeError | HTTPException) -> int:
    _note_error(endpoint, metrics, exc)
    return exc.http_status if isinstance(exc, IPCServeError) else (exc.code or 500)


def _finish(endpoint: _Endpoint, metrics: Any, stream: Any, admission: Any, status: int,
            started: float, stats: Any = None) -> None:
    if stream is not None:
        stream.close()  # before its end: cancels the rest in the ML process
    if admission is not None:
        admission.release()
    elapsed = time.perf_counter() - started
    metrics.observe(endpoint.name, status, elapsed, stats, endpoint.ml.inflight)
    if status == 200:
        endpoint.recent.append(elapsed)


def _events(reply: _Reply, pieces: Iterator[dict[str, Any]], first: dict[str, Any] | None,
            include_usage: bool, stream: Any, admission: Any, endpoint: _Endpoint,
            metrics: Any, started: float) -> Iterator[bytes]:
    """The SSE body: a chunk per piece as the model makes it, a chunk with finish_reason,
    the usage chunk if asked for, then ``[DONE]``; an error mid-stream is an ``error`` event
    before ``[DONE]``. When the client leaves, the server closes this generator: the
    generation is cancelled."""
    status = 200
    usage_field: Any = None if include_usage else ...  # OpenAI: null on every chunk but the last
    try:
        try:
            if reply.chat:  # OpenAI's first chat chunk says who speaks
                yield reply.chunk("", role=True, usage=usage_field)
            piece, final, count = first, None, 0
            while piece is not None:
                count += 1
                if piece["text"]:
                    yield reply.chunk(piece["text"], usage=usage_field)
                if "finish_reason" in piece:
                    final = piece
                piece = next(pieces, None)
            finish = str(final["finish_reason"]) if final else "stop"
            yield reply.chunk(None, finish, usage=usage_field)
            if include_usage:
                yield reply.chunk(None, usage=_usage(final, count), choices=False)
        except IPCServeError as exc:
            status = _failed(endpoint, metrics, exc)
            yield sse(error_body(exc)[1])
        yield _DONE
    except GeneratorExit:
        status = 499  # the client left (nginx's "client closed request")
        raise
    finally:
        _finish(endpoint, metrics, stream, admission, status, started)


# -- embeddings -----------------------------------------------------------------------
def _embeddings() -> Response:
    body = _body()
    endpoint = _endpoint(body, EMBEDDING, "/v1/embeddings")
    texts, encoding = openai_fields.embedding(body)
    state = _state()
    started = time.perf_counter()
    status, result = 500, None
    try:
        if state.ext.draining.is_set():
            raise WorkerUnavailableError("the server is shutting down")
        received = request.environ.get(RECEIVED_KEY) or time.monotonic()
        ml, admission = endpoint.admit()
        with admission:
            result = admission.call((), {"texts": texts, "with_usage": True},
                                    deadline=received + ml.config.timeout,
                                    cancel_if=request.environ.get(DISCONNECTED_KEY))
        value = result.value
        vectors = value.get("vectors") if isinstance(value, dict) else None
        if not isinstance(vectors, list) or len(vectors) != len(texts):
            raise ModelError("the embedding model must return {'vectors': [one per text], "
                             "'prompt_tokens': int}")
        tokens = int(value.get("prompt_tokens", 0))
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, encoding)}
                for i, v in enumerate(vectors)]
        status = 200
        return jsonify({"object": "list", "data": data, "model": endpoint.name,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
    except (IPCServeError, HTTPException) as exc:
        status = _failed(endpoint, state.metrics, exc)
        raise
    finally:
        _finish(endpoint, state.metrics, None, None, status, started, result)


def _encode(vector: Any, encoding: str) -> Any:
    import numpy as np

    array = np.asarray(vector, dtype="<f4")
    if array.ndim != 1:
        raise ModelError(f"an embedding must be a flat list of numbers, got shape {array.shape}")
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(array.tobytes()).decode("ascii")
    return [float(x) for x in vector]
