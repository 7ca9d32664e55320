"""OpenAI request bodies -> the model's keyword arguments, or a ParamError naming the field.

Pure functions over the parsed JSON body (no Flask); :mod:`ipcserve.openai_api` serves them.
A field that would change the answer but is not implemented (``logit_bias``, ``tools``,
``best_of``...) is refused rather than ignored, and so is a field this server does not know,
as OpenAI does.
"""

from __future__ import annotations

import math
from typing import Any

from ..engine.errors import InputError

__all__ = ["MAX_CHOICES", "ParamError", "chat", "completion", "detokenize", "embedding",
           "tokenize"]

#: Most choices (``n``) a request may ask for: each is a sequence of the model's running batch.
MAX_CHOICES = 16

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
             "seed", "n", "ignore_eos")
_ROLES = ("system", "developer", "user", "assistant", "tool")


class ParamError(InputError):
    """A request field is invalid; ``param`` names it (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.param, self.code), self.__dict__)


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: ``false`` is not ``0`` and ``1`` is not ``true`` (Python says they are)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _check_names(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for name, value in body.items():
        if name in allowed or name in _IGNORED:
            continue
        if name not in _OFF:
            raise ParamError(f"unrecognized request argument {name!r}", name)
        if not any(_equal(value, off) for off in _OFF[name]):
            raise ParamError(f"{name!r} is not supported by this server; leave it out", name,
                             "unsupported_parameter")


def _field(body: dict[str, Any], name: str, kind: Any, low: float = -math.inf,
           high: float = math.inf) -> Any:
    """``body[name]`` if it is None or a ``kind`` (int or float) within [low, high]."""
    value = body.get(name)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one kind of number: 16.0 is the integer 16
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                              or not low <= value <= high):
        bounds = (f" from {low:g} to {high:g}" if high < math.inf
                  else f" >= {low:g}" if low > -math.inf else "")
        what = "an integer" if kind is int else "a number"
        raise ParamError(f"{name!r} must be {what}{bounds}, got {value!r}", name)
    return value


def _sampling(body: dict[str, Any], max_tokens_field: str, max_choices: int) -> dict[str, Any]:
    """The model's keyword arguments for the sampling fields the request set."""
    n = _field(body, "n", int, 1, max(1, min(max_choices, MAX_CHOICES)))
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ParamError("'stop' must be a string or a list of non-empty strings", "stop")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise ParamError(f"'ignore_eos' must be true or false, got {ignore_eos!r}", "ignore_eos")
    kwargs = {"max_tokens": _field(body, max_tokens_field, int, 1),
              "temperature": _field(body, "temperature", (int, float), 0, 2),
              "top_p": _field(body, "top_p", (int, float), 0, 1), "stop": stop,
              "seed": _field(body, "seed", int),
              # Only when asked for: a model that makes one choice need not know the field.
              "n": n if n is not None and n > 1 else None,
              "ignore_eos": True if ignore_eos else None}
    return {k: v for k, v in kwargs.items() if v is not None}


def _streaming(body: dict[str, Any], kwargs: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) from ``stream`` and ``stream_options``; with
    ``continuous_usage_stats`` (and ``include_usage``, as vLLM reads it) every chunk
    carries the usage so far: ``kwargs`` asks the model for it (``continuous_usage``)."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ParamError(f"'stream' must be true or false, got {stream!r}", "stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise ParamError("'stream_options' is only allowed with 'stream': true", "stream_options")
    shape = ("'stream_options' must be {\"include_usage\": true|false, "
             "\"continuous_usage_stats\": true|false}")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise ParamError(shape, "stream_options")
    usage, continuous = (options.get(name, False)
                         for name in ("include_usage", "continuous_usage_stats"))
    if not isinstance(usage, bool) or not isinstance(continuous, bool):
        raise ParamError(shape, "stream_options")
    if usage and continuous:
        kwargs["continuous_usage"] = True
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


def chat(body: dict[str, Any], max_choices: int = 1) -> tuple[dict[str, Any], bool, bool]:
    """A chat completion request: (the model's kwargs, stream, include_usage).

    ``max_choices``: the most ``n`` the model makes (its ``max_choices`` attribute; a
    model without one makes one choice per request).

    Raises:
        ParamError: a field is invalid, unknown or unsupported.
    """
    _check_names(body, ("messages", "max_completion_tokens", *_SAMPLING))
    _field(body, "max_tokens", int, 1)  # checked even when the newer name wins
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    kwargs = {"messages": _messages(body.get("messages")), **_sampling(body, field, max_choices)}
    return (kwargs, *_streaming(body, kwargs))


def completion(body: dict[str, Any], max_choices: int = 1
               ) -> tuple[dict[str, Any], bool, bool]:
    """A (legacy) completion request: (the model's kwargs, stream, include_usage);
    ``max_choices`` as for :func:`chat`.

    Raises:
        ParamError: a field is invalid, unknown or unsupported.
    """
    _check_names(body, ("prompt", *_SAMPLING))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ParamError("'prompt' must be a string (one prompt per request)", "prompt")
    kwargs = {"prompt": prompt, **_sampling(body, "max_tokens", max_choices)}
    return (kwargs, *_streaming(body, kwargs))


def embedding(body: dict[str, Any]) -> tuple[list[str], str]:
    """An embeddings request: (the texts, "float" or "base64").

    Raises:
        ParamError: a field is invalid, unknown or unsupported.
    """
    _check_names(body, ("model", "input", "encoding_format"))
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ParamError("'input' must be a string or a non-empty list of strings (token "
                         "arrays are not supported)", "input")
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ("float", "base64"):
        raise ParamError(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}",
                         "encoding_format")
    return texts, encoding


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ParamError(f"{name!r} must be true or false, got {value!r}", name)
    return value


def tokenize(body: dict[str, Any]) -> dict[str, Any]:
    """A ``/tokenize`` request (vLLM's shape): ``prompt`` (with ``add_special_tokens``,
    default true) or ``messages`` (through the chat template, ``add_generation_prompt``
    default true) -> the model's ``{"tokenize": {...}}`` request.

    Raises:
        ParamError: a field is invalid or unknown, or neither/both of prompt and messages.
    """
    _check_names(body, ("model", "prompt", "messages", "add_special_tokens",
                        "add_generation_prompt"))
    if ("prompt" in body) == ("messages" in body):
        raise ParamError("send exactly one of 'prompt' (a string) or 'messages'", "prompt")
    if "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise ParamError("'prompt' must be a string", "prompt")
        return {"prompt": body["prompt"],
                "add_special_tokens": _flag(body, "add_special_tokens", True)}
    if "add_special_tokens" in body:
        raise ParamError("'add_special_tokens' is for 'prompt'; the chat template writes the "
                         "special tokens of 'messages'", "add_special_tokens")
    return {"messages": _messages(body["messages"]),
            "add_generation_prompt": _flag(body, "add_generation_prompt", True)}


def detokenize(body: dict[str, Any]) -> list[int]:
    """A ``/detokenize`` request: ``tokens``, a list of token ids.

    Raises:
        ParamError: ``tokens`` is missing or not a list of integers >= 0.
    """
    _check_names(body, ("model", "tokens"))
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise ParamError("'tokens' must be a list of token ids (integers >= 0)", "tokens")
    return tokens


# -- the same fields as JSON Schema, for the OpenAPI document ----------------------------
def _model_schema(serving: list[str], others: list[str]) -> dict[str, Any]:
    """The ``model`` field: one of the models that serve the route; where none does, any
    name but the models that cannot (a name that is no model here is a 404)."""
    if serving:
        return {"type": "string", "enum": serving}
    schema: dict[str, Any] = {"type": "string", "minLength": 1,
                              "description": "no model of this server serves this route"}
    if others:
        schema["not"] = {"enum": others}
    return schema


_NUMBER = ["number", "null"]
_STOP = {"anyOf": [{"type": "string"},
                   {"type": "array", "items": {"type": "string", "minLength": 1}},
                   {"type": "null"}]}
_SAMPLING_SCHEMA: dict[str, Any] = {
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": _NUMBER, "minimum": 0, "maximum": 2},
    "top_p": {"type": _NUMBER, "minimum": 0, "maximum": 1},
    "stop": _STOP, "seed": {"type": ["integer", "null"]},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_CHOICES},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"], "additionalProperties": False,
                       "properties": {"include_usage": {"type": "boolean"},
                                      "continuous_usage_stats": {"type": "boolean"}}},
    "ignore_eos": {"type": ["boolean", "null"]},
}


def _fields_schema(required: list[str], fields: dict[str, Any],
                   choices: dict[str, int] | None = None) -> dict[str, Any]:
    properties = {**fields, **{name: {} for name in _IGNORED},
                  **{name: {"enum": list(values)} for name, values in _OFF.items()}}
    schema: dict[str, Any] = {"type": "object", "required": required, "properties": properties,
                              "additionalProperties": False}
    # Models that make fewer choices than the most: n is bounded per model.
    fewer = {name: max(1, most) for name, most in (choices or {}).items() if most < MAX_CHOICES}
    if fewer:
        schema["allOf"] = [{"if": {"required": ["model"], "properties": {"model": {"const": name}}},
                            "then": {"properties": {"n": {"type": ["integer", "null"],
                                                          "maximum": most}}}}
                           for name, most in fewer.items()]
    if "stream_options" in fields:  # only with "stream": true, as OpenAI says
        schema["if"] = {"required": ["stream_options"],
                        "properties": {"stream_options": {"type": "object"}}}
        schema["then"] = {"required": ["stream"], "properties": {"stream": {"const": True}}}
    return schema


_TEXT_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"const": "text"}, "text": {"type": "string"}}}


def chat_schema(serving: list[str], others: list[str],
                choices: dict[str, int] | None = None) -> dict[str, Any]:
    """The JSON Schema of a chat completion request that :func:`chat` accepts;
    ``choices``: the most ``n`` of each serving model (default 1)."""
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": list(_ROLES)},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}}
    return _fields_schema(["model", "messages"], {
        "model": _model_schema(serving, others),
        "messages": {"type": "array", "minItems": 1, "items": message},
        "max_completion_tokens": _SAMPLING_SCHEMA["max_tokens"], **_SAMPLING_SCHEMA},
        _choices(serving, choices))


def completion_schema(serving: list[str], others: list[str],
                      choices: dict[str, int] | None = None) -> dict[str, Any]:
    """The JSON Schema of a completion request that :func:`completion` accepts;
    ``choices`` as for :func:`chat_schema`."""
    prompt = {"anyOf": [{"type": "string"},
                        {"type": "array", "items": {"type": "string"}, "minItems": 1,
                         "maxItems": 1}]}
    return _fields_schema(["model", "prompt"], {
        "model": _model_schema(serving, others), "prompt": prompt, **_SAMPLING_SCHEMA},
        _choices(serving, choices))


def _choices(serving: list[str], choices: dict[str, int] | None) -> dict[str, int]:
    return {name: (choices or {}).get(name, 1) for name in serving}


def embedding_schema(serving: list[str], others: list[str]) -> dict[str, Any]:
    """The JSON Schema of an embeddings request that :func:`embedding` accepts."""
    texts = {"anyOf": [{"type": "string"},
                       {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
    schema = _fields_schema(["model", "input"], {
        "model": _model_schema(serving, others), "input": texts,
        "encoding_format": {"enum": ["float", "base64", None]}})
    return schema


def tokenize_schema(serving: list[str], others: list[str]) -> dict[str, Any]:
    """The JSON Schema of a ``/tokenize`` request that :func:`tokenize` accepts."""
    model = _model_schema(serving, others)
    message = chat_schema(serving, others)["properties"]["messages"]
    flag = {"type": ["boolean", "null"]}
    return {"oneOf": [
        {"type": "object", "required": ["model", "prompt"], "additionalProperties": False,
         "properties": {"model": model, "prompt": {"type": "string"},
                        "add_special_tokens": flag}},
        {"type": "object", "required": ["model", "messages"], "additionalProperties": False,
         "properties": {"model": model, "messages": message, "add_generation_prompt": flag}}]}


def detokenize_schema(serving: list[str], others: list[str]) -> dict[str, Any]:
    """The JSON Schema of a ``/detokenize`` request that :func:`detokenize` accepts (ids
    beyond the model's vocabulary are a 400 from the model)."""
    return {"type": "object", "required": ["model", "tokens"], "additionalProperties": False,
            "properties": {"model": _model_schema(serving, others),
                           "tokens": {"type": "array",
                                      "items": {"type": "integer", "minimum": 0}}}}
