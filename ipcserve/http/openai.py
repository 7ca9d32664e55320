"""The OpenAI API under ``/v1``, so that the ``openai`` client (``base_url=http://host:port/v1``)
and tools built on it talk to ipcserve models.

A model's role is its ``task`` attribute: ``"text-generation"`` serves
``POST /v1/chat/completions`` and ``POST /v1/completions``; ``"feature-extraction"`` serves
``POST /v1/embeddings``. ``GET /v1/models`` (:mod:`.native`) lists every model.

The contract with a text-generation model: ``predict(messages=[{"role", "content"}, ...] or
prompt="...", max_tokens=, temperature=, top_p=, stop=, seed=)`` returns a generator of
``{"text": "<delta>"}`` items and one final ``{"text": "", "finish_reason": "stop"|"length",
"usage": {"prompt_tokens": int, "completion_tokens": int}}``. Only the fields the request set
are passed, so the model's own defaults apply. A request for ``n`` > 1 choices passes ``n=``
(up to the model's ``max_choices`` attribute; a model without one makes one choice);
every item then carries its choice's ``"index"`` and each choice ends with its own final
item (its ``usage`` counts that choice's tokens; the prompt is counted once). An embedding model is called with
``texts=[str, ...], with_usage=True`` and returns ``{"vectors": [[float, ...]], "prompt_tokens": int}``.

The request lifecycle (deadline from arrival, admission, cancellation when the client
leaves, metrics) is the serving core's (:func:`.serving.exchange`); request fields are
checked in :mod:`.openai_fields`. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, jsonify, request

from ..engine.channel import Stream
from ..engine.errors import (
    DeadlineError,
    ForbiddenError,
    IPCServeError,
    ModelError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitedError,
    RequestCancelledError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    WorkerUnavailableError,
)
from . import decode, openai_fields
from .openai_fields import ParamError
from .routes import Route, Surface
from .serving import Endpoint, Exchange, Failure, exchange, served

__all__ = ["EMBEDDING", "GENERATION", "OPENAI_ERRORS", "ROUTES", "error_body"]

GENERATION = "text-generation"
EMBEDDING = "feature-extraction"

_ERROR_CODES: tuple[tuple[type[IPCServeError], str], ...] = (
    (UnauthorizedError, "invalid_api_key"), (NotFoundError, "model_not_found"),
    (RateLimitedError, "rate_limit_exceeded"), (ForbiddenError, "permission_denied"),
    (PayloadTooLargeError, "request_too_large"), (UnsupportedMediaTypeError, "unsupported_media_type"),
    (OverloadedError, "overloaded"), (WorkerUnavailableError, "model_unavailable"),
    (DeadlineError, "timeout"), (RequestCancelledError, "cancelled"), (ModelError, "model_error"))


def error_body(failure: Failure) -> dict[str, Any]:
    """OpenAI's error object for a failure (never a traceback)."""
    error = failure.error
    param, code = getattr(error, "param", None), getattr(error, "code", None)
    if isinstance(error, IPCServeError):
        if code is None:
            code = next((c for cls, c in _ERROR_CODES if isinstance(error, cls)), None)
        if isinstance(error, NotFoundError) and param is None:
            param = "model"
    elif failure.status == 413:
        code = "request_too_large"
    else:
        param = code = None  # a Werkzeug error's "code" is its status, not OpenAI's code
    kind = "server_error" if failure.status >= 500 else "invalid_request_error"
    return {"error": {"message": failure.message, "type": kind, "param": param, "code": code}}


_NULLABLE_TEXT = {"type": ["string", "null"]}
#: OpenAI's error shape.
OPENAI_ERRORS = Surface("openai", error_body, {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"],
                             "properties": {"message": {"type": "string"},
                                            "type": {"type": "string"},
                                            "param": _NULLABLE_TEXT, "code": _NULLABLE_TEXT}}}},
    "OpenAIError")


# -- request fields -------------------------------------------------------------------
def _endpoint(body: dict[str, Any], role: str, route: str) -> Endpoint:
    models = served().models
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ParamError("'model' is required: the name of a served model (GET /v1/models "
                         f"lists them: {', '.join(models.endpoints)})", "model")
    endpoint = models.get(name)
    task = getattr(endpoint.ml, "task", None)
    if task != role:
        raise ParamError(f"model {name!r} is a {task or 'plain'} model; {route} needs a "
                         f"{role} model", "model", "model_not_supported")
    return endpoint


def _body() -> dict[str, Any]:
    return decode.parse_json_object(request.get_data(cache=False))


# -- text generation ------------------------------------------------------------------
def _chat() -> Response:
    body = _body()
    endpoint = _endpoint(body, GENERATION, "/v1/chat/completions")
    with exchange(endpoint) as ex:
        return _generate(ex, *openai_fields.chat(body, _max_choices(endpoint),
                                                 _structured(endpoint)), chat=True)


def _completions() -> Response:
    body = _body()
    endpoint = _endpoint(body, GENERATION, "/v1/completions")
    with exchange(endpoint) as ex:
        return _generate(ex, *openai_fields.completion(body, _max_choices(endpoint)),
                         chat=False)


def _structured(endpoint: Endpoint) -> bool:
    """Whether a model constrains its output to a JSON schema (its ``structured_output``
    attribute: ``response_format`` and ``tools``)."""
    return getattr(endpoint.ml, "structured_output", False) is True


def _max_choices(endpoint: Endpoint) -> int:
    """The most ``n`` a model makes: its ``max_choices`` attribute, else 1."""
    most = getattr(endpoint.ml, "max_choices", 1)
    return most if isinstance(most, int) and not isinstance(most, bool) and most > 1 else 1


def _pieces(stream: Stream) -> Iterator[dict[str, Any]]:
    """The model's items, checked against the contract; a model that does not stream may
    answer with the whole list at once."""
    for item in stream:
        for piece in item if isinstance(item, list) and not stream.streaming else [item]:
            if not isinstance(piece, dict) or not isinstance(piece.get("text"), str):
                raise ModelError("the text-generation model must yield {'text': str} items, got "
                                 f"{type(piece).__name__}")
            yield piece


def _usage(finals: dict[int, dict[str, Any]], pieces: int, made: int = 1) -> dict[str, int]:
    """OpenAI's usage from each choice's final item: each prompt once (the choices of prompt
    ``p`` are ``p * made`` ...), every choice's completion tokens."""
    counts = {i: f["usage"] for i, f in finals.items() if isinstance(f.get("usage"), dict)}
    if not counts or len(counts) < len(finals):
        # a model that does not count: what we can tell
        counts = {0: {"prompt_tokens": 0, "completion_tokens": pieces}}
    prompts = {i // made: int(u.get("prompt_tokens", 0)) for i, u in counts.items()}
    prompt = sum(prompts.values())
    completion = sum(int(u.get("completion_tokens", 0)) for u in counts.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _index(piece: dict[str, Any], n: int) -> int:
    index = piece.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise ModelError(f"the text-generation model yielded an item of choice {index!r}; "
                         f"the request asked for {n} choice(s)")
    return index


def _entries(piece: dict[str, Any]) -> list[dict[str, Any]]:
    """The log-probability entries of a piece (``{"id", "token", "logprob", "top"}``)."""
    entries = piece.get("logprobs")
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("token"), str) for e in entries):
        raise ModelError("a text-generation model's 'logprobs' must be a list of {'id', "
                         "'token', 'logprob', 'top'} entries")
    return entries


class _Logprobs:
    """OpenAI's ``logprobs`` objects from the model's entries: the completions shape
    (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) or the chat shape
    (``content``: ``token``, ``logprob``, ``bytes``, ``top_logprobs``)."""

    def __init__(self, chat: bool, token_ids: bool) -> None:
        self.chat = chat
        self.token_ids = token_ids
        self.offsets: dict[int, int] = {}  # each choice's text so far, for text_offset

    def _name(self, token_id: Any, text: str) -> str:
        return f"token_id:{int(token_id)}" if self.token_ids else text

    def of(self, index: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat(e) for e in entries], "refusal": None}
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                     "text_offset": []}
        offset = self.offsets.get(index, 0)
        for e in entries:
            token, logprob = self._name(e.get("id"), e["token"]), e.get("logprob")
            out["tokens"].append(token)
            out["token_logprobs"].append(logprob)
            if logprob is None:  # the prompt's first token: nothing before it predicts it
                out["top_logprobs"].append(None)
            else:
                top = {self._name(i, t): lp for i, t, lp in e.get("top") or []}
                top.setdefault(token, logprob)
                out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(e["token"])
        self.offsets[index] = offset
        return out

    @staticmethod
    def _chat(e: dict[str, Any]) -> dict[str, Any]:
        def one(token: str, logprob: Any) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
        return {**one(e["token"], e.get("logprob")),
                "top_logprobs": [one(t, lp) for _, t, lp in e.get("top") or []]}


class _Reply:
    """OpenAI's response objects for one chat or completion request."""

    def __init__(self, model: str, chat: bool, view: openai_fields.View) -> None:
        self.chat = chat
        self.view = view
        self.logprobs = _Logprobs(chat, view.token_ids) if view.logprobs else None
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
                     "object": "chat.completion" if chat else "text_completion",
                     "created": int(time.time()), "model": model, "system_fingerprint": None}

    def whole(self, texts: list[str], finishes: list[str], entries: list[list[dict[str, Any]]],
              usage: dict[str, int]) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for index in self._kept(entries):
            choice: dict[str, Any] = {"index": len(choices), "finish_reason": finishes[index],
                                      "logprobs": (self.logprobs.of(index, entries[index])
                                                   if self.logprobs else None)}
            if self.chat:
                content, calls = self.tool_calls(texts[index], finishes[index])
                choice["message"] = {"role": "assistant", "content": content, "refusal": None}
                if calls:
                    choice["message"]["tool_calls"] = calls
                    choice["finish_reason"] = "tool_calls"
            else:
                choice["text"] = texts[index]
            choices.append(choice)
        return {**self.head, "choices": choices, "usage": usage}

    def tool_calls(self, text: str, finish: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool_calls) of a chat answer's text (see :attr:`.openai_fields.View.tools`);
        an answer cut short (finish "length") stays text."""
        mode = self.view.tools
        if not mode or finish != "stop":
            return text, []
        if mode == "auto":
            return _auto_calls(text)
        try:
            value = json.loads(text)
        except ValueError:
            raise ModelError("the model's answer to a forced tool call is not the JSON its "
                             "schema asks for") from None
        if mode == "required":
            if not isinstance(value, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("name"), str) for c in value):
                raise ModelError("the model's tool calls are not a list of {'name', "
                                 "'arguments'}")
            return None, [_call(c["name"], json.dumps(c.get("arguments"))) for c in value]
        return None, [_call(mode, text)]

    def _kept(self, entries: list[list[dict[str, Any]]]) -> list[int]:
        """The choices answered: all, or with ``best_of`` the ``n`` of each prompt whose
        tokens are likeliest (the prompt's own tokens count the same for each)."""
        view = self.view
        if view.made == view.n:
            return list(range(len(entries)))
        kept = []
        for p in range(view.prompts):
            made = range(p * view.made, (p + 1) * view.made)
            score = {i: sum(e.get("logprob") or 0.0 for e in entries[i]) for i in made}
            kept += sorted(made, key=lambda i: -score[i])[:view.n]
        return kept

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False,
              usage: Any = ..., choices: bool = True, index: int = 0,
              entries: list[dict[str, Any]] | None = None,
              calls: list[dict[str, Any]] | None = None) -> bytes:
        body: dict[str, Any] = {**self.head, "choices": []}
        if self.chat:
            body["object"] = "chat.completion.chunk"
        if choices:
            choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": (
                self.logprobs.of(index, entries) if self.logprobs and entries else None)}
            if self.chat:
                choice["delta"] = ({"role": "assistant"} if role else {}) | (
                    {} if text is None else {"content": text}) | ({"tool_calls": [
                        {"index": i, **call} for i, call in enumerate(calls)]} if calls else {})
            else:
                choice["text"] = text or ""
            body["choices"] = [choice]
        if usage is not ...:
            body["usage"] = usage
        return sse(body)


_TAG, _END_TAG = "<tool_call>", "</tool_call>"


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _auto_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A tool-calling model's own calls: an answer that starts with ``<tool_call>`` blocks,
    each ``{"name", "arguments"}`` JSON (the format Hermes, Qwen and SmolLM models write);
    anything else is text."""
    rest, calls = text.strip(), []
    while rest.startswith(_TAG) and _END_TAG in rest:
        block, rest = rest[len(_TAG):].split(_END_TAG, 1)
        rest = rest.strip()
        try:
            value = json.loads(block)
        except ValueError:
            return text, []
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return text, []
        arguments = value.get("arguments", {})
        calls.append(_call(value["name"], arguments if isinstance(arguments, str)
                           else json.dumps(arguments)))
    if not calls:
        return text, []
    return rest or None, calls


class _Held:
    """Streamed chat choices whose text may be tool calls: held back until it is known (a
    forced call: to the choice's end; ``auto``: while the text may still start with
    ``<tool_call>``), then sent as ``tool_calls`` or as the text."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.text: dict[int, str] = {}
        self.entries: dict[int, list[dict[str, Any]]] = {}
        self.free: set[int] = set()  # choices known to be text, streamed as they come

    def take(self, index: int, text: str, entries: list[dict[str, Any]]
             ) -> tuple[str, list[dict[str, Any]]] | None:
        """What to stream now of a piece: (text, entries), or None while it is held."""
        if not self.mode or index in self.free:
            return text, entries
        self.text[index] = self.text.get(index, "") + text
        self.entries.setdefault(index, []).extend(entries)
        head = self.text[index].lstrip()
        if self.mode == "auto" and not (_TAG.startswith(head) or head.startswith(_TAG)):
            self.free.add(index)
            return self.text.pop(index), self.entries.pop(index)
        return None

    def end(self, index: int) -> tuple[str, list[dict[str, Any]]] | None:
        """A choice's held text and entries at its end, if any."""
        if index not in self.text:
            return None
        return self.text.pop(index), self.entries.pop(index, [])


def sse(value: Any) -> bytes:
    """One server-sent event carrying ``value`` as JSON."""
    return f"data: {json.dumps(value, separators=(',', ':'))}\n\n".encode()


_DONE = b"data: [DONE]\n\n"


def _generate(ex: Exchange, kwargs: dict[str, Any], wants_stream: bool, include_usage: bool,
              view: openai_fields.View, chat: bool) -> Response:
    reply = _Reply(ex.endpoint.name, chat, view)
    total = view.prompts * view.made  # the model's choices: made per prompt
    ex.admit()
    pieces = _pieces(ex.stream((), kwargs))
    if not wants_stream:
        texts: list[list[str]] = [[] for _ in range(total)]
        entries: list[list[dict[str, Any]]] = [[] for _ in range(total)]
        finals: dict[int, dict[str, Any]] = {}
        count = 0
        for piece in pieces:
            index = _index(piece, total)
            count += 1
            texts[index].append(piece["text"])
            entries[index] += _entries(piece)
            if "finish_reason" in piece:
                finals[index] = piece
        finishes = [str(finals[i]["finish_reason"]) if i in finals else "stop"
                    for i in range(total)]
        counts = _usage(finals, count, view.made)
        ex.charge(counts["total_tokens"])
        return jsonify(reply.whole(["".join(t) for t in texts], finishes, entries, counts))
    # The first piece is awaited here, so an error before any token gets its status.
    first = next(pieces, None)
    usage = "continuous" if kwargs.get("continuous_usage") else "final" if include_usage else ""
    return Response(ex.body(_events(ex, reply, pieces, first, usage, total)),
                    mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Running:
    """The usage so far of a stream whose chunks all carry it (``continuous_usage_stats``):
    each prompt once, the completion tokens of every choice, from each piece's ``usage``."""

    def __init__(self, made: int) -> None:
        self.per_prompt = made
        self.prompts: dict[int, int] = {}
        self.made: dict[int, int] = {}

    def prompt(self, index: int, piece: dict[str, Any]) -> None:
        usage = piece.get("usage")
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if isinstance(prompt, int):
            self.prompts[index // self.per_prompt] = prompt

    def add(self, index: int, piece: dict[str, Any]) -> None:
        self.prompt(index, piece)
        usage = piece.get("usage")
        done = usage.get("completion_tokens") if isinstance(usage, dict) else None
        self.made[index] = int(done) if isinstance(done, int) else self.made.get(index, 0) + 1

    def usage(self) -> dict[str, int]:
        prompt, completion = sum(self.prompts.values()), sum(self.made.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


def _events(ex: Exchange, reply: _Reply, pieces: Iterator[dict[str, Any]],
            first: dict[str, Any] | None, usage: str, n: int) -> Iterator[bytes]:
    """The SSE body: a chunk per piece as the model makes it (with its choice's index and,
    when asked for, its tokens' log-probabilities), a chunk with finish_reason as each choice
    ends, the usage chunk if asked for (``usage`` "final"; "continuous": every chunk carries
    the usage so far, too), then ``[DONE]``; an error mid-stream is an ``error`` event before
    ``[DONE]``. ``n``: the choices of all prompts. Tool calls come whole, in one chunk at
    their choice's end (:class:`_Held`)."""
    running = _Running(reply.view.made) if usage == "continuous" else None
    held = _Held(reply.view.tools if reply.chat else "")

    def usage_field() -> Any:  # OpenAI: null on every chunk but the last
        return running.usage() if running else None if usage else ...
    try:
        if running and first is not None:
            running.prompt(_index(first, n), first)
        if reply.chat:  # OpenAI's first chat chunk of each choice says who speaks
            for index in range(n):
                yield reply.chunk("", role=True, usage=usage_field(), index=index)
        piece, finals, finishes, count = first, {}, {}, 0
        while piece is not None:
            count += 1
            index = _index(piece, n)
            if running:
                running.add(index, piece)
            taken = held.take(index, piece["text"], _entries(piece))
            if taken and (taken[0] or taken[1]):
                yield reply.chunk(taken[0], usage=usage_field(), index=index, entries=taken[1])
            if "finish_reason" in piece:
                finals[index] = piece
                finishes[index] = finish = str(piece["finish_reason"])
                rest = held.end(index)
                if rest is not None:
                    content, calls = reply.tool_calls(rest[0], finish)
                    if calls:
                        finishes[index] = "tool_calls"
                        yield reply.chunk(None, usage=usage_field(), index=index,
                                          entries=rest[1], calls=calls)
                    elif content or rest[1]:
                        yield reply.chunk(content, usage=usage_field(), index=index,
                                          entries=rest[1])
                if n > 1:  # each choice's end as it comes; one choice's at the very end
                    yield reply.chunk(None, finishes[index], usage=usage_field(), index=index)
            piece = next(pieces, None)
        for index in range(n):
            if n == 1 or index not in finals:
                yield reply.chunk(None, finishes.get(index, "stop"), usage=usage_field(),
                                  index=index)
        total = _usage(finals, count, reply.view.made)
        ex.charge(total["total_tokens"])
        if usage:
            yield reply.chunk(None, usage=total, choices=False)
    except IPCServeError as exc:
        yield sse(error_body(ex.failed(exc)))
    yield _DONE


# -- embeddings -----------------------------------------------------------------------
def _embeddings() -> Response:
    body = _body()
    endpoint = _endpoint(body, EMBEDDING, "/v1/embeddings")
    with exchange(endpoint) as ex:
        texts, encoding, dimensions = openai_fields.embedding(body)
        ex.admit()
        value = ex.call((), {"texts": texts, "with_usage": True}).value
        vectors = value.get("vectors") if isinstance(value, dict) else None
        if not isinstance(vectors, list) or len(vectors) != len(texts):
            raise ModelError("the embedding model must return {'vectors': [one per text], "
                             "'prompt_tokens': int}")
        tokens = int(value.get("prompt_tokens", 0))
        ex.charge(tokens)
        data = [{"object": "embedding", "index": i,
                 "embedding": _encode(v, encoding, dimensions)} for i, v in enumerate(vectors)]
        return jsonify({"object": "list", "data": data, "model": endpoint.name,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encode(vector: Any, encoding: str, dimensions: int | None = None) -> Any:
    """One embedding as the request asked: its first ``dimensions`` (re-normalised to
    length 1, for models trained for shortening, e.g. Matryoshka ones), floats or base64."""
    import numpy as np

    array = np.asarray(vector, dtype="<f4")
    if array.ndim != 1:
        raise ModelError(f"an embedding must be a flat list of numbers, got shape {array.shape}")
    if dimensions is not None:
        if dimensions > len(array):
            raise ParamError(f"'dimensions' is {dimensions}; this model's embeddings have "
                             f"{len(array)}", "dimensions")
        array = array[:dimensions]
        norm = float(np.linalg.norm(array))
        if norm > 0:
            array = (array / norm).astype("<f4")
        vector = array.tolist()
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(array.tobytes()).decode("ascii")
    return [float(x) for x in vector]


# -- the tokenizer routes ---------------------------------------------------------------
def _tokenizer_call(ex: Exchange, request: dict[str, Any], answer: str) -> dict[str, Any]:
    """The model's answer to a tokenizer request (one item of a batch request, so it runs
    beside the generation steps instead of joining them)."""
    ex.admit()
    values = ex.call_batch([request]).value
    value = values[0] if isinstance(values, list) and len(values) == 1 else None
    if not isinstance(value, dict) or answer not in value:
        raise ModelError(f"the model must answer a tokenizer request with {{{answer!r}: ...}} "
                         "(TransformersModel does)")
    return value


def _tokenize() -> Response:
    body = _body()
    endpoint = _endpoint(body, GENERATION, "/tokenize")
    with exchange(endpoint) as ex:
        value = _tokenizer_call(ex, {"tokenize": openai_fields.tokenize(body)}, "tokens")
        tokens = [int(t) for t in value["tokens"]]
        return jsonify({"count": len(tokens), "max_model_len": int(value.get("max_model_len", 0)),
                        "tokens": tokens})


def _detokenize() -> Response:
    body = _body()
    endpoint = _endpoint(body, GENERATION, "/detokenize")
    with exchange(endpoint) as ex:
        value = _tokenizer_call(ex, {"detokenize": openai_fields.detokenize(body)}, "prompt")
        return jsonify({"prompt": str(value["prompt"])})


# -- the OpenAPI rows ------------------------------------------------------------------
def _request(role: str, schema_of: Any) -> Any:
    def request_body(state: Any, params: dict[str, str]) -> dict[str, Any]:
        models = state.models.endpoints
        serving = [n for n, e in models.items() if getattr(e.ml, "task", None) == role]
        others = [n for n in models if n not in serving]
        choices = {n: _max_choices(models[n]) for n in serving}
        if schema_of is openai_fields.chat_schema:
            schema = schema_of(serving, others, choices,
                               [n for n in serving if _structured(models[n])])
        elif schema_of is openai_fields.completion_schema:
            schema = schema_of(serving, others, choices)
        else:
            schema = schema_of(serving, others)
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    return request_body


#: One server-sent event: a chunk of the answer as JSON text, or "[DONE]".
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
_USAGE = {"type": "object", "required": ["prompt_tokens", "total_tokens"], "properties": {
    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
    "total_tokens": {"type": "integer"}}}


def _completion_object(chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"type": "object", "required": ["index", "finish_reason"],
                              "properties": {"index": {"type": "integer"},
                                             "finish_reason": {"type": "string"}}}
    if chat:
        choice["required"].append("message")
        call = {"type": "object", "required": ["id", "type", "function"], "properties": {
            "id": {"type": "string"}, "type": {"const": "function"},
            "function": {"type": "object", "required": ["name", "arguments"], "properties": {
                "name": {"type": "string"}, "arguments": {"type": "string"}}}}}
        choice["properties"]["message"] = {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"const": "assistant"},
                           "content": {"type": ["string", "null"]},
                           "tool_calls": {"type": "array", "items": call}}}
    else:
        choice["required"].append("text")
        choice["properties"]["text"] = {"type": "string"}
    return {"description": "the whole answer (JSON), or its chunks as server-sent events "
                           "when 'stream' is true",
            "content": {"application/json": {"schema": {
                "type": "object", "required": ["id", "object", "created", "model", "choices",
                                               "usage"],
                "properties": {"id": {"type": "string"},
                               "object": {"const": "chat.completion" if chat
                                          else "text_completion"},
                               "created": {"type": "integer"}, "model": {"type": "string"},
                               "choices": {"type": "array", "items": choice},
                               "usage": _USAGE}}},
                        "text/event-stream": {"schema": _EVENT}}}


_EMBEDDINGS = {"description": "one embedding per input", "content": {"application/json": {
    "schema": {"type": "object", "required": ["object", "data", "model", "usage"],
               "properties": {"object": {"const": "list"}, "model": {"type": "string"},
                              "usage": _USAGE,
                              "data": {"type": "array", "items": {
                                  "type": "object", "required": ["object", "index", "embedding"],
                                  "properties": {"object": {"const": "embedding"},
                                                 "index": {"type": "integer"},
                                                 "embedding": {"anyOf": [
                                                     {"type": "array",
                                                      "items": {"type": "number"}},
                                                     {"type": "string"}]}}}}}}}}}
_ERRORS = (400, 404, 413, 429, 499, 500, 502, 503, 504)
_TOKENS = {"description": "the prompt's token ids", "content": {"application/json": {"schema": {
    "type": "object", "required": ["count", "max_model_len", "tokens"],
    "properties": {"count": {"type": "integer"}, "max_model_len": {"type": "integer"},
                   "tokens": {"type": "array", "items": {"type": "integer"}}}}}}}
_TEXT = {"description": "the text of the token ids", "content": {"application/json": {"schema": {
    "type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}}}}

ROUTES = [
    Route("/v1/chat/completions", "chat", _chat, OPENAI_ERRORS, ("POST",), tag="openai",
          summary="a chat completion (OpenAI API)", ok=_completion_object(chat=True),
          errors=_ERRORS, request=_request(GENERATION, openai_fields.chat_schema)),
    Route("/v1/completions", "completions", _completions, OPENAI_ERRORS, ("POST",),
          tag="openai", summary="a text completion (OpenAI API)",
          ok=_completion_object(chat=False), errors=_ERRORS,
          request=_request(GENERATION, openai_fields.completion_schema)),
    Route("/v1/embeddings", "embeddings", _embeddings, OPENAI_ERRORS, ("POST",), tag="openai",
          summary="embeddings (OpenAI API)", ok=_EMBEDDINGS, errors=_ERRORS,
          request=_request(EMBEDDING, openai_fields.embedding_schema)),
    Route("/tokenize", "tokenize", _tokenize, OPENAI_ERRORS, ("POST",), tag="openai",
          summary="a prompt's token ids (vLLM's shape)", ok=_TOKENS, errors=_ERRORS,
          request=_request(GENERATION, openai_fields.tokenize_schema)),
    Route("/detokenize", "detokenize", _detokenize, OPENAI_ERRORS, ("POST",), tag="openai",
          summary="the text of token ids (vLLM's shape)", ok=_TEXT, errors=_ERRORS,
          request=_request(GENERATION, openai_fields.detokenize_schema)),
]
