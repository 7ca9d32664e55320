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
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from . import decode
from .errors import (
    DeadlineError,
    InputError,
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
from .flask_ext import DISCONNECTED_KEY, RECEIVED_KEY, _Endpoint, _note_error, _state

__all__ = ["EMBEDDING", "GENERATION", "blueprint"]

logger = logging.getLogger(__name__)

GENERATION = "text-generation"
EMBEDDING = "feature-extraction"

# Fields a client may send that change nothing here, and fields accepted only at the value
# that means "off" (anything else would silently give a different answer than asked for).
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                      "prompt_cache_key", "safety_identifier"})
_OFF: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "response_format": (None, {"type": "text"}),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "dimensions": (None,),
}
_SAMPLING = ("model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop",
             "seed", "n")
_ROLES = ("system", "developer", "user", "assistant", "tool")
_ERROR_CODES: tuple[tuple[type[IPCServeError], str], ...] = (
    (UnauthorizedError, "invalid_api_key"), (NotFoundError, "model_not_found"),
    (PayloadTooLargeError, "request_too_large"), (UnsupportedMediaTypeError, "unsupported_media_type"),
    (OverloadedError, "overloaded"), (WorkerUnavailableError, "model_unavailable"),
    (DeadlineError, "timeout"), (RequestCancelledError, "cancelled"), (ModelError, "model_error"))


class ParamError(InputError):
    """A request field is invalid; ``param`` names it (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.param, self.code), self.__dict__)


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
def _body(allowed: tuple[str, ...]) -> dict[str, Any]:
    body = decode.parse_json_object(request.get_data(cache=False))
    for name, value in body.items():
        if name in allowed or name in _IGNORED:
            continue
        if name not in _OFF:
            raise ParamError(f"unrecognized request argument {name!r}", name)
        if value not in _OFF[name]:
            raise ParamError(f"{name!r} is not supported by this server; leave it out", name,
                             "unsupported_parameter")
    return body


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


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ParamError(f"{name!r} must be a number from {low:g} to {high:g}, got {value!r}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ParamError(f"{name!r} must be an integer{bound}, got {value!r}", name)
    return value


def _sampling(body: dict[str, Any], max_tokens_field: str) -> dict[str, Any]:
    """The model's keyword arguments for the sampling fields the request set."""
    if body.get("n") not in (None, 1):
        raise ParamError(f"'n' must be 1 (one choice per request), got {body['n']!r}", "n")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ParamError("'stop' must be a string or a list of non-empty strings", "stop")
    kwargs = {"max_tokens": _integer(body, max_tokens_field, 1),
              "temperature": _number(body, "temperature", 0, 2),
              "top_p": _number(body, "top_p", 0, 1), "stop": stop, "seed": _integer(body, "seed")}
    return {k: v for k, v in kwargs.items() if v is not None}


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) from ``stream`` and ``stream_options``."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream not in (None, True, False):
        raise ParamError(f"'stream' must be true or false, got {stream!r}", "stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise ParamError("'stream_options' is only allowed with 'stream': true", "stream_options")
    usage = options.get("include_usage", False) if isinstance(options, dict) else None
    if not isinstance(usage, bool):
        raise ParamError("'stream_options' must be {\"include_usage\": true|false}", "stream_options")
    return True, usage


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ParamError("'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                         "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ParamError(f"{where} must be an object with 'role' one of {', '.join(_ROLES)}",
                             f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones can be served
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ParamError(f"{where}.content: only text parts are supported",
                                 f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ParamError(f"{where}.content must be a string or a list of text parts",
                             f"{where}.content")
        messages.append({"role": message["role"], "content": content})
    return messages


# -- text generation ------------------------------------------------------------------
def _chat() -> Response:
    body = _body(("messages", "max_completion_tokens", *_SAMPLING))
    endpoint = _endpoint(body, GENERATION, "/v1/chat/completions")
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    kwargs = {"messages": _messages(body.get("messages")), **_sampling(body, field)}
    return _generate(endpoint, kwargs, body, chat=True)


def _completions() -> Response:
    body = _body(("prompt", *_SAMPLING))
    endpoint = _endpoint(body, GENERATION, "/v1/completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ParamError("'prompt' must be a string (one prompt per request)", "prompt")
    return _generate(endpoint, {"prompt": prompt, **_sampling(body, "max_tokens")}, body, chat=False)


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


def _generate(endpoint: _Endpoint, kwargs: dict[str, Any], body: dict[str, Any],
              chat: bool) -> Response:
    state = _state()
    wants_stream, include_usage = _streaming(body)
    reply = _Reply(endpoint.name, chat)
    started = time.perf_counter()
    status, admission, stream, handed_off = 500, None, None, False
    try:
        if state.ext.draining.is_set():
            raise WorkerUnavailableError("the server is shutting down")
        received = request.environ.get(RECEIVED_KEY) or time.monotonic()
        admission = endpoint.ml.admit()
        stream = admission.stream((), kwargs, deadline=received + endpoint.ml.config.timeout,
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
        status = exc.http_status if isinstance(exc, IPCServeError) else (exc.code or 500)
        _note_error(endpoint, state.metrics, exc)
        raise
    finally:
        if not handed_off:
            _finish(endpoint, state.metrics, stream, admission, status, started)


def _finish(endpoint: _Endpoint, metrics: Any, stream: Any, admission: Any, status: int,
            started: float) -> None:
    if stream is not None:
        stream.close()  # before its end: cancels the rest in the ML process
    if admission is not None:
        admission.release()
    elapsed = time.perf_counter() - started
    metrics.observe(endpoint.name, status, elapsed, None)
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
            status = exc.http_status
            _note_error(endpoint, metrics, exc)
            yield sse(error_body(exc)[1])
        yield _DONE
    except GeneratorExit:
        status = 499  # the client left (nginx's "client closed request")
        raise
    finally:
        _finish(endpoint, metrics, stream, admission, status, started)


# -- embeddings -----------------------------------------------------------------------
def _embeddings() -> Response:
    body = _body(("model", "input", "encoding_format"))
    endpoint = _endpoint(body, EMBEDDING, "/v1/embeddings")
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ParamError("'input' must be a string or a non-empty list of strings (token "
                         "arrays are not supported)", "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ParamError(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}",
                         "encoding_format")
    state = _state()
    started = time.perf_counter()
    status, result = 500, None
    try:
        if state.ext.draining.is_set():
            raise WorkerUnavailableError("the server is shutting down")
        received = request.environ.get(RECEIVED_KEY) or time.monotonic()
        with endpoint.ml.admit() as admission:
            result = admission.call((), {"texts": texts, "with_usage": True},
                                    deadline=received + endpoint.ml.config.timeout,
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
        status = exc.http_status if isinstance(exc, IPCServeError) else (exc.code or 500)
        _note_error(endpoint, state.metrics, exc)
        raise
    finally:
        elapsed = time.perf_counter() - started
        state.metrics.observe(endpoint.name, status, elapsed, result)
        if status == 200:
            endpoint.recent.append(elapsed)


def _encode(vector: Any, encoding: str) -> Any:
    import numpy as np

    array = np.asarray(vector, dtype="<f4")
    if array.ndim != 1:
        raise ModelError(f"an embedding must be a flat list of numbers, got shape {array.shape}")
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(array.tobytes()).decode("ascii")
    return [float(x) for x in vector]
