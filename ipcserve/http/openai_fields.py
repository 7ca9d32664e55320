"""OpenAI request bodies -> the model's keyword arguments, or a ParamError naming the field.

Pure functions over the parsed JSON body (no Flask); :mod:`ipcserve.openai_api` serves them.
A field that would change the answer but is not implemented (``logit_bias``, ``tools``,
``best_of``...) is refused rather than ignored, and so is a field this server does not know,
as OpenAI does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..engine.errors import InputError

__all__ = ["MAX_CHOICES", "MAX_LOGPROBS", "MAX_PROMPTS", "ParamError", "View", "chat",
           "completion", "detokenize", "embedding", "tokenize"]

#: Most choices (``n``) a request may ask for: each is a sequence of the model's running batch.
MAX_CHOICES = 16
#: Most prompts one completion request may carry (a list of prompts).
MAX_PROMPTS = 32
#: Most alternatives per token ``logprobs`` / ``top_logprobs`` may ask for.
MAX_LOGPROBS = 20

# Fields a client may send that change nothing here, and fields accepted only at the value
# that means "off" (anything else would silently give a different answer than asked for).
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                      "prompt_cache_key", "safety_identifier"})
_OFF: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "functions": (None, []),
    "function_call": (None, "none"), "suffix": (None, ""),
}
# Accepted only where they mean something: a chat has no echo or best_of, a completion no
# top_logprobs (its logprobs is the count).
_CHAT_OFF = {"echo": (None, False), "best_of": (None, 1), "return_tokens_as_token_ids": (None, False)}
# For a model that cannot constrain its output (no ``structured_output`` attribute).
_STRUCTURED_OFF = {"response_format": (None, {"type": "text"}), "tools": (None, []),
                   "tool_choice": (None, "none")}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAME_PATTERN = "^[A-Za-z0-9_-]{1,64}$"
_COMPLETION_OFF = {"top_logprobs": (None, 0)}
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


@dataclass(frozen=True)
class View:
    """What the web side makes of a generation request's items.

    Attributes:
        n: choices returned per prompt.
        made: choices the model makes per prompt (``best_of``: the ``n`` likeliest are kept).
        prompts: how many prompts (choice ``i`` of prompt ``p`` is the model's ``p * made + i``).
        logprobs: the answer carries each choice's ``logprobs`` object.
        token_ids: tokens are written ``"token_id:N"`` (vLLM's
            ``return_tokens_as_token_ids``), so that a client can map them back exactly.
        tools: how the answer's text becomes ``tool_calls``: "" (it does not), "auto" (a
            leading ``<tool_call>{"name", "arguments"}</tool_call>`` block, as tool-calling
            models write them), "required" (the text is a JSON list of calls) or the name of
            the one function the text is the arguments of.
    """

    n: int = 1
    made: int = 1
    prompts: int = 1
    logprobs: bool = False
    token_ids: bool = False
    tools: str = ""


def _check_names(body: dict[str, Any], allowed: tuple[str, ...],
                 off: dict[str, tuple[Any, ...]] | None = None) -> None:
    offs = {**_OFF, **(off or {})}
    for name, value in body.items():
        if name in allowed or name in _IGNORED:
            continue
        if name not in offs:
            raise ParamError(f"unrecognized request argument {name!r}", name)
        if not any(_equal(value, off) for off in offs[name]):
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


def _sampling(body: dict[str, Any], max_tokens_field: str, max_choices: int,
              least_tokens: int = 1) -> dict[str, Any]:
    """The model's keyword arguments for the sampling fields the request set."""
    n = _field(body, "n", int, 1, max(1, min(max_choices, MAX_CHOICES)))
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ParamError("'stop' must be a string or a list of non-empty strings", "stop")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise ParamError(f"'ignore_eos' must be true or false, got {ignore_eos!r}", "ignore_eos")
    kwargs = {"max_tokens": _field(body, max_tokens_field, int, least_tokens),
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


def _tool_call(value: Any, where: str) -> dict[str, Any]:
    """One of an assistant message's ``tool_calls``, as OpenAI sends it back."""
    function = value.get("function") if isinstance(value, dict) else None
    if (not isinstance(function, dict) or value.get("type", "function") != "function"
            or not isinstance(value.get("id", ""), (str, type(None)))
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments", ""), str)):
        raise ParamError(f"{where} must be {{\"type\": \"function\", \"id\", \"function\": "
                         "{\"name\", \"arguments\": JSON text}}", where)
    call = {"type": "function", "function": {"name": function["name"],
                                             "arguments": function.get("arguments", "")}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ParamError("'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                         "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ParamError(f"{where} must be an object with 'role' one of {', '.join(_ROLES)}",
                             f"{where}.role")
        calls = message.get("tool_calls")
        if calls is not None and (message["role"] != "assistant" or not isinstance(calls, list)):
            raise ParamError(f"{where}.tool_calls: a list, in an assistant's message",
                             f"{where}.tool_calls")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones can be served
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ParamError(f"{where}.content: only text parts are supported",
                                 f"{where}.content")
            content = "".join(p["text"] for p in content)
        if content is None and calls:  # an assistant's turn of tool calls
            content = ""
        if not isinstance(content, str):
            raise ParamError(f"{where}.content must be a string or a list of text parts",
                             f"{where}.content")
        entry: dict[str, Any] = {"role": message["role"], "content": content}
        if calls:
            entry["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]")
                                   for j, c in enumerate(calls)]
        for name in ("tool_call_id", "name"):
            if message["role"] == "tool" and isinstance(message.get(name), str):
                entry[name] = message[name]
        messages.append(entry)
    return messages


def _response_format(value: Any) -> dict[str, Any] | None:
    """The JSON schema every answer must follow, or None (plain text)."""
    shape = ("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
             "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"}}")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object") and set(value) == {"type"}:
        return None if kind == "text" else {"type": "object"}
    spec = value.get("json_schema") if isinstance(value, dict) else None
    if kind != "json_schema" or set(value) != {"type", "json_schema"} or not isinstance(
            spec, dict) or set(spec) - {"name", "description", "schema", "strict"}:
        raise ParamError(shape, "response_format")
    if not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
        raise ParamError("'response_format.json_schema.name' must be 1 to 64 letters, digits, "
                         "'_' or '-'", "response_format")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict) or not isinstance(spec.get("strict", False), (bool, type(None))):
        raise ParamError("'response_format.json_schema.schema' must be a JSON schema (an "
                         "object) and 'strict' true or false", "response_format")
    return schema


def _tools(value: Any) -> list[dict[str, Any]]:
    """OpenAI's function tools, checked: names unique, parameters a JSON schema."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ParamError("'tools' must be a list of {\"type\": \"function\", \"function\": "
                         "{\"name\", \"description\", \"parameters\"}}", "tools")
    tools, names = [], set()
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(function, dict) or set(tool) != {"type", "function"}
                or tool["type"] != "function"
                or set(function) - {"name", "description", "parameters", "strict"}):
            raise ParamError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                             "{\"name\", \"description\", \"parameters\", \"strict\"}}", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or name in names:
            raise ParamError(f"tools[{i}]: the function's 'name' must be 1 to 64 letters, "
                             "digits, '_' or '-', and unique", "tools")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or not isinstance(function.get("description", ""), str):
            raise ParamError(f"tools[{i}]: 'parameters' must be a JSON schema (an object) and "
                             "'description' a string", "tools")
        tools.append({"type": "function", "function": {
            "name": name, "description": function.get("description", ""),
            "parameters": parameters}})
    return tools


def _tool_mode(body: dict[str, Any], tools: list[dict[str, Any]]) -> str:
    """``tool_choice`` as :attr:`View.tools` says it ("" for none)."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else ""
    if choice == "none":
        return ""
    if not tools:
        raise ParamError("'tool_choice' needs 'tools'", "tool_choice")
    if choice in ("auto", "required"):
        return str(choice)
    named = isinstance(choice, dict) and choice.get("type") == "function"
    function = choice.get("function") if named else None
    name = function.get("name") if isinstance(function, dict) else None
    if name not in {t["function"]["name"] for t in tools}:
        raise ParamError("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                         "{\"type\": \"function\", \"function\": {\"name\": <one of the tools>}}",
                         "tool_choice")
    return str(name)


def calls_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a forced answer of tool calls: a list of ``{"name", "arguments"}``
    (one item when ``parallel`` is false)."""
    call = {"anyOf": [{"type": "object", "required": ["name", "arguments"],
                       "additionalProperties": False,
                       "properties": {"name": {"const": t["function"]["name"]},
                                      "arguments": t["function"]["parameters"]}}
                      for t in tools]}
    schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _structured(body: dict[str, Any], kwargs: dict[str, Any], structured: bool) -> str:
    """``response_format``, ``tools`` and ``tool_choice`` into the model's ``json_schema``
    and ``tools``; the :attr:`View.tools` mode."""
    if not structured:
        for name, values in _STRUCTURED_OFF.items():
            if not any(_equal(body.get(name), v) for v in values):
                raise ParamError(f"{name!r} needs a model that constrains its output "
                                 "(a TransformersModel with llguidance installed); this one "
                                 "does not", name, "unsupported_parameter")
        return ""
    schema = _response_format(body.get("response_format"))
    tools = _tools(body.get("tools"))
    mode = _tool_mode(body, tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ParamError(f"'parallel_tool_calls' must be true or false, got {parallel!r}",
                         "parallel_tool_calls")
    if mode in ("", "auto"):
        pass
    elif schema is not None:
        raise ParamError("'response_format' cannot be combined with a forced tool call (its "
                         "answer is the call's arguments)", "response_format")
    elif mode == "required":
        schema = calls_schema(tools, parallel is not False)
    else:
        schema = next(t["function"]["parameters"] for t in tools
                      if t["function"]["name"] == mode)
    if schema is not None:
        kwargs["json_schema"] = schema
    if mode:
        kwargs["tools"] = tools
    return mode


def _logprobs(body: dict[str, Any], name: str, kwargs: dict[str, Any]) -> bool:
    """``kwargs["logprobs"]`` from the count field ``name`` (0 to MAX_LOGPROBS: the chosen
    token's log-probability and that many likeliest alternatives); whether it was asked for."""
    count = _field(body, name, int, 0, MAX_LOGPROBS)
    if count is not None:
        kwargs["logprobs"] = count
    return count is not None


def chat(body: dict[str, Any], max_choices: int = 1, structured: bool = False
         ) -> tuple[dict[str, Any], bool, bool, View]:
    """A chat completion request: (the model's kwargs, stream, include_usage, view).

    ``max_choices``: the most ``n`` the model makes (its ``max_choices`` attribute; a
    model without one makes one choice per request). ``structured``: the model constrains
    its output to a JSON schema (``response_format``, ``tools``).

    Raises:
        ParamError: a field is invalid, unknown or unsupported.
    """
    _check_names(body, ("messages", "max_completion_tokens", "logprobs", "top_logprobs",
                        "response_format", "tools", "tool_choice", *_SAMPLING), _CHAT_OFF)
    _field(body, "max_tokens", int, 1)  # checked even when the newer name wins
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    kwargs = {"messages": _messages(body.get("messages")), **_sampling(body, field, max_choices)}
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ParamError(f"'logprobs' must be true or false, got {wanted!r}", "logprobs")
    if body.get("top_logprobs") is not None and not wanted:
        raise ParamError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if wanted:
        kwargs["logprobs"] = 0
        _logprobs(body, "top_logprobs", kwargs)
    mode = _structured(body, kwargs, structured)
    n = int(kwargs.get("n", 1))
    stream, usage = _streaming(body, kwargs)
    return kwargs, stream, usage, View(n, n, 1, bool(wanted), tools=mode)


def _prompt(value: Any) -> str | list[int] | None:
    """One prompt: a string or a non-empty list of token ids; None if ``value`` is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return value
    return None


def _prompts(value: Any) -> list[str | list[int]]:
    """``prompt`` as OpenAI takes it: a string, token ids, or a list of either."""
    one = _prompt(value)
    if one is not None:
        return [one]
    prompts = [_prompt(p) for p in value] if isinstance(value, list) else [None]
    if not prompts or len(prompts) > MAX_PROMPTS or any(p is None for p in prompts):
        raise ParamError("'prompt' must be a string, a list of token ids (integers >= 0), or a "
                         f"list of 1 to {MAX_PROMPTS} of those", "prompt")
    return [p for p in prompts if p is not None]


def completion(body: dict[str, Any], max_choices: int = 1
               ) -> tuple[dict[str, Any], bool, bool, View]:
    """A (legacy) completion request: (the model's kwargs, stream, include_usage, view);
    ``max_choices`` as for :func:`chat`.

    ``best_of`` makes that many choices per prompt and returns the ``n`` whose tokens are
    likeliest (summed log-probability), as OpenAI does; it asks the model for log-probabilities
    to rank them.

    Raises:
        ParamError: a field is invalid, unknown or unsupported.
    """
    _check_names(body, ("prompt", "echo", "logprobs", "best_of", "return_tokens_as_token_ids",
                        *_SAMPLING), _COMPLETION_OFF)
    prompts = _prompts(body.get("prompt"))
    echo = _flag(body, "echo", False)
    token_ids = _flag(body, "return_tokens_as_token_ids", False)
    kwargs: dict[str, Any] = ({"prompt": prompts[0]} if len(prompts) == 1
                              else {"prompts": prompts})
    kwargs.update(_sampling(body, "max_tokens", max_choices, 0 if echo else 1))
    if kwargs.get("max_tokens") == 0 and not echo:
        raise ParamError("'max_tokens' 0 is only allowed with 'echo': true", "max_tokens")
    if echo:
        kwargs["echo"] = True
    wanted = _logprobs(body, "logprobs", kwargs)
    n = int(kwargs.get("n", 1))
    best_of = _field(body, "best_of", int, 1, max(1, min(max_choices, MAX_CHOICES)))
    made = n if best_of is None else best_of
    if made < n:
        raise ParamError(f"'best_of' ({best_of}) must be at least 'n' ({n})", "best_of")
    stream, usage = _streaming(body, kwargs)
    if stream and best_of is not None and best_of > 1:
        raise ParamError("'best_of' cannot be streamed (the best are known only at the end)",
                         "best_of")
    if made > n:
        kwargs["n"] = made
        kwargs.setdefault("logprobs", 0)  # to rank them
    return kwargs, stream, usage, View(n, made, len(prompts), wanted, token_ids)


def embedding(body: dict[str, Any]) -> tuple[list[str] | list[list[int]], str, int | None]:
    """An embeddings request: (the texts or token-id lists, "float" or "base64",
    ``dimensions`` or None).

    Raises:
        ParamError: a field is invalid, unknown or unsupported.
    """
    _check_names(body, ("model", "input", "encoding_format", "dimensions"))
    inputs = body.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(
            isinstance(t, int) and not isinstance(t, bool) for t in inputs)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not (
            all(isinstance(t, str) for t in inputs) or all(
            isinstance(t, list) and t and _prompt(t) is not None for t in inputs)):
        raise ParamError("'input' must be a string, a list of strings, a list of token ids "
                         "(integers >= 0) or a list of those", "input")
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ("float", "base64"):
        raise ParamError(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}",
                         "encoding_format")
    return inputs, encoding, _field(body, "dimensions", int, 1)


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
                   choices: dict[str, int] | None = None,
                   off: dict[str, tuple[Any, ...]] | None = None) -> dict[str, Any]:
    properties = {**fields, **{name: {} for name in _IGNORED},
                  **{name: {"enum": list(values)} for name, values in {**_OFF, **(off or {})}.items()}}
    schema: dict[str, Any] = {"type": "object", "required": required, "properties": properties,
                              "additionalProperties": False}
    rules: list[dict[str, Any]] = []
    # Models that make fewer choices than the most: n (and best_of) are bounded per model.
    fewer = {name: max(1, most) for name, most in (choices or {}).items() if most < MAX_CHOICES}
    for name, most in fewer.items():
        bounded = {"type": ["integer", "null"], "maximum": most}
        rules.append({"if": {"required": ["model"], "properties": {"model": {"const": name}}},
                      "then": {"properties": {"n": bounded, **(
                          {"best_of": bounded} if "best_of" in fields else {})}}})
    if "best_of" in fields:  # at least n, and never streamed
        for n in range(2, MAX_CHOICES + 1):
            rules.append({"if": {"required": ["n"], "properties": {"n": {"const": n}}},
                          "then": {"properties": {"best_of": {
                              "anyOf": [{"type": "null"}, {"minimum": n}]}}}})
        rules.append({"if": {"required": ["stream"], "properties": {"stream": {"const": True}}},
                      "then": {"properties": {"best_of": {"enum": [None, 1]}}}})
    if "echo" in fields:  # max_tokens 0: the prompt's log-probabilities alone
        rules.append({"if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
                      "then": {"required": ["echo"], "properties": {"echo": {"const": True}}}})
    if "top_logprobs" in fields:
        rules.append({"if": {"required": ["top_logprobs"],
                             "properties": {"top_logprobs": {"type": "integer"}}},
                      "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}})
    if "stream_options" in fields:  # only with "stream": true, as OpenAI says
        rules.append({"if": {"required": ["stream_options"],
                             "properties": {"stream_options": {"type": "object"}}},
                      "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}})
    if rules:
        schema["allOf"] = rules
    return schema


_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_COUNT = {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_LOGPROBS}
_TEXT_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"const": "text"}, "text": {"type": "string"}}}


def chat_schema(serving: list[str], others: list[str],
                choices: dict[str, int] | None = None,
                structured: list[str] | None = None) -> dict[str, Any]:
    """The JSON Schema of a chat completion request that :func:`chat` accepts;
    ``choices``: the most ``n`` of each serving model (default 1); ``structured``: the
    serving models that constrain their output (``response_format``, ``tools``)."""
    name = {"type": "string", "pattern": _NAME_PATTERN}
    call = {"type": "object", "required": ["function"], "properties": {
        "id": {"type": ["string", "null"]}, "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "arguments": {"type": "string"}}}}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": list(_ROLES)},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART},
                              {"type": "null"}]},
        "tool_calls": {"type": ["array", "null"], "items": call},
        "tool_call_id": {}, "name": {}},
        # no content: an assistant's turn of tool calls; tool calls: only an assistant's
        "allOf": [{"if": {"properties": {"content": {"type": "null"}}},
                   "then": {"required": ["tool_calls"], "properties": {
                       "role": {"const": "assistant"},
                       "tool_calls": {"type": "array", "minItems": 1}}}},
                  {"if": {"required": ["tool_calls"],
                          "properties": {"tool_calls": {"type": "array"}}},
                   "then": {"properties": {"role": {"const": "assistant"}}}}]}
    response_format = {"anyOf": [
        {"type": "null"},
        {"type": "object", "required": ["type"], "additionalProperties": False,
         "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False,
         "properties": {"type": {"const": "json_schema"}, "json_schema": {
             "type": "object", "required": ["name"], "additionalProperties": False,
             "properties": {"name": name, "description": {"type": "string"},
                            "schema": {"type": "object"},
                            "strict": {"type": ["boolean", "null"]}}}}}]}
    tool = {"type": "object", "required": ["type", "function"], "additionalProperties": False,
            "properties": {"type": {"const": "function"}, "function": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {"name": name, "description": {"type": "string"},
                               "parameters": {"type": "object"},
                               "strict": {"type": ["boolean", "null"]}}}}}
    tool_choice = {"anyOf": [
        {"enum": [None, "none", "auto", "required"]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"const": "function"}, "function": {
                "type": "object", "required": ["name"], "properties": {"name": name}}}}]}
    schema = _fields_schema(["model", "messages"], {
        "model": _model_schema(serving, others),
        "messages": {"type": "array", "minItems": 1, "items": message},
        "max_completion_tokens": _SAMPLING_SCHEMA["max_tokens"], **_SAMPLING_SCHEMA,
        "logprobs": {"type": ["boolean", "null"]}, "top_logprobs": _COUNT,
        "response_format": response_format, "tools": {"type": ["array", "null"], "items": tool},
        "tool_choice": tool_choice}, _choices(serving, choices), _CHAT_OFF)
    rules = schema.setdefault("allOf", [])
    # tool_choice other than none needs tools; a model that does not constrain its output
    # takes none of them.
    rules.append({"if": {"required": ["tool_choice"], "properties": {
                      "tool_choice": {"not": {"enum": [None, "none"]}}}},
                  "then": {"required": ["tools"], "properties": {
                      "tools": {"type": "array", "minItems": 1}}}})
    for plain in (n for n in serving if n not in (structured or [])):
        rules.append({"if": {"required": ["model"], "properties": {"model": {"const": plain}}},
                      "then": {"properties": {name: {"enum": list(values)}
                                              for name, values in _STRUCTURED_OFF.items()}}})
    return schema


def completion_schema(serving: list[str], others: list[str],
                      choices: dict[str, int] | None = None) -> dict[str, Any]:
    """The JSON Schema of a completion request that :func:`completion` accepts;
    ``choices`` as for :func:`chat_schema`."""
    prompt = {"anyOf": [{"type": "string"}, _IDS,
                        {"type": "array", "items": {"anyOf": [{"type": "string"}, _IDS]},
                         "minItems": 1, "maxItems": MAX_PROMPTS}]}
    flag = {"type": ["boolean", "null"]}
    return _fields_schema(["model", "prompt"], {
        "model": _model_schema(serving, others), "prompt": prompt, **_SAMPLING_SCHEMA,
        "max_tokens": {"type": ["integer", "null"], "minimum": 0}, "echo": flag,
        "logprobs": _COUNT, "return_tokens_as_token_ids": flag,
        "best_of": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_CHOICES}},
        _choices(serving, choices), _COMPLETION_OFF)


def _choices(serving: list[str], choices: dict[str, int] | None) -> dict[str, int]:
    return {name: (choices or {}).get(name, 1) for name in serving}


def embedding_schema(serving: list[str], others: list[str]) -> dict[str, Any]:
    """The JSON Schema of an embeddings request that :func:`embedding` accepts."""
    texts = {"anyOf": [{"type": "string"},
                       {"type": "array", "items": {"type": "string"}, "minItems": 1}, _IDS,
                       {"type": "array", "items": _IDS, "minItems": 1}]}
    schema = _fields_schema(["model", "input"], {
        "model": _model_schema(serving, others), "input": texts,
        "encoding_format": {"enum": ["float", "base64", None]},
        "dimensions": {"type": ["integer", "null"], "minimum": 1}})
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
