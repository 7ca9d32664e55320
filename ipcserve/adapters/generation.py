"""Causal-LM text generation requests and their items, for TransformersModel (adapters.hf).

What a request takes (:func:`read_request`, :class:`Sampling`), how a token is picked
(:func:`pick`) and how tokens become text (:class:`IncrementalDecoder`, :class:`StopBuffer`).
The token loop itself, one step per token for a batch of streams, is :mod:`.decoding`. The
items of a stream::

    {"text": " the"}                     # one per generated token; "" while text is held back
    ...
    {"text": "", "finish_reason": "stop" | "length",
     "usage": {"prompt_tokens": 12, "completion_tokens": 5}}     # exactly once, last

Text is held back while it could still be the start of a ``stop`` sequence (then released,
or cut before the stop), and while the token so far ends inside a character (a byte-level
tokenizer splits "é" or an emoji over several tokens); the deltas joined are the completion.

With ``n`` > 1 choices, every item also carries the choice's ``"index"`` and each choice
ends with its own final item.

Everything heavy (torch, jinja2) is imported inside functions: this module is imported by ``hf.py``
in the web process too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..engine.errors import InputError

__all__ = ["MAX_CHOICES", "MAX_LOGPROBS", "MAX_PROMPTS", "MIN_TEMPERATURE", "IncrementalDecoder",
           "Prompt", "Sampling", "StopBuffer", "pick", "prepare", "prompt_ids", "read_request"]

logger = logging.getLogger(__name__)

FIELDS = ("messages", "prompt", "prompts", "max_tokens", "temperature", "top_p", "stop", "seed",
          "n", "ignore_eos", "continuous_usage", "logprobs", "echo", "json_schema", "tools")
# As the OpenAI routes accept (openai_fields); the chat template may still refuse a role.
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4
#: Most choices (``n``) one request may ask for: each takes a row of the running batch.
MAX_CHOICES = 16
#: Most prompts one request may carry (``prompts``); each makes ``n`` choices.
MAX_PROMPTS = 32
#: Most alternatives per token that ``logprobs`` may ask for.
MAX_LOGPROBS = 20
# Prompt tokens decoded with the first new token, so that it gets the space it would have in
# the whole text ("the cat" + "sat" -> " sat"), as vLLM's detokenizer does.
_PROMPT_CONTEXT = 5
# Below it, dividing logits by the temperature overflows float32: sample greedily instead.
MIN_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens, checked by :func:`read_request`.

    Attributes:
        max_tokens: most tokens to generate (the context may end it sooner).
        temperature: 0 picks the likeliest token (greedy); higher flattens the distribution.
        top_p: sample from the smallest set of tokens whose probability reaches it.
        stop: generation ends before any of these texts, which are not returned.
        seed: the same seed, prompt and settings give the same tokens; None: random.
            Choice ``i`` of ``n`` samples with ``seed + i``.
        n: how many completions (choices) to generate from the one prompt.
        ignore_eos: generate ``max_tokens`` tokens, past the model's end-of-sequence token
            (load generators ask for it, to control the length they measure).
        continuous_usage: every item carries the choice's ``usage`` so far, not only the
            last (OpenAI-compatible servers' ``continuous_usage_stats``).
        logprobs: None, or every token's log-probability under the model (the raw
            distribution, before temperature and top-p) with this many likeliest
            alternatives (0 to MAX_LOGPROBS).
        echo: the first item of each choice is the prompt (its text, and with ``logprobs``
            every prompt token's log-probability, the first one None).
        json_schema: None, or a JSON schema (as JSON text) every answer follows: decoding is
            constrained to it (:mod:`.grammar`) and ends when the answer is complete.
        tools: OpenAI's tool definitions, handed to the chat template (which tells the model
            about them).
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    continuous_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    json_schema: str | None = None
    tools: tuple[Any, ...] = ()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(fields: Mapping[str, Any], name: str, default: float) -> float:
    value = fields.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"'{name}' must be a number, got {value!r}")
    return float(value)


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("tool_calls"):  # an assistant's turn of tool calls
        return ""
    # OpenAI's content parts: [{"type": "text", "text": "..."}, ...]; text only here.
    if isinstance(content, list) and all(
            isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise InputError(f"the 'content' of messages[{i}] must be a string (or a list of "
                     f"{{'type': 'text', 'text': ...}} parts), got {type(content).__name__}")


def _tool_calls(value: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, for the chat template: arguments as an object
    (what templates expect), parsed from OpenAI's JSON text."""
    if not isinstance(value, (list, tuple)):
        raise InputError(f"the 'tool_calls' of messages[{i}] must be a list")
    calls = []
    for j, call in enumerate(value):
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise InputError(f"messages[{i}].tool_calls[{j}] must be {{'type': 'function', "
                             "'function': {'name', 'arguments'}}")
        arguments = function.get("arguments")  # type: ignore[union-attr]
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise InputError(f"the arguments of messages[{i}].tool_calls[{j}] are not "
                                 "JSON") from None
        entry = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        calls.append(entry)
    return calls


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError("'messages' must be a non-empty list of {'role', 'content'} objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise InputError(f"messages[{i}] must be an object with 'role' and 'content', got "
                             f"{type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"the 'role' of messages[{i}] must be one of {', '.join(ROLES)}, "
                             f"got {role!r}")
        entry: dict[str, Any] = {"role": str(role), "content": _content(message, i)}
        if role == "assistant" and message.get("tool_calls"):
            entry["tool_calls"] = _tool_calls(message["tool_calls"], i)
        for name in ("tool_call_id", "name"):
            if role == "tool" and isinstance(message.get(name), str):
                entry[name] = message[name]
        messages.append(entry)
    return messages


#: A prompt as the model takes it: text, chat messages, or token ids.
Prompt = str | list[dict[str, Any]] | list[int]


def _prompt(value: Any, where: str) -> str | list[int]:
    """A text prompt or a non-empty list of token ids (checked against the vocabulary later)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(_is_int(t) and t >= 0 for t in value):
        return list(value)
    raise InputError(f"{where} must be a string or a non-empty list of token ids "
                     f"(integers >= 0), got {type(value).__name__}")


def read_request(fields: Mapping[str, Any], max_tokens_limit: int
                 ) -> tuple[list[Prompt], Sampling]:
    """The prompts (one, unless ``prompts`` lists several: each a string or token ids; or chat
    messages) and the sampling settings of a request.

    ``max_tokens`` above ``max_tokens_limit`` is lowered to it (clients such as OpenAI SDK
    tools often ask for far more than they need); the default is 64. ``max_tokens`` 0 is
    allowed with ``echo`` (the prompt's log-probabilities alone, as evaluation harnesses ask).

    Raises:
        InputError: naming the field: not exactly one of ``prompt``/``prompts``/``messages``,
            an unknown field, a value of the wrong type or out of range.
    """
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(map(repr, unknown))}; a generation "
                         f"request takes {', '.join(FIELDS)}")
    if sum(name in fields for name in ("prompt", "prompts", "messages")) != 1:
        raise InputError("send exactly one of 'prompt' (a string or token ids), 'prompts' (a "
                         "list of them) or 'messages' (a list of {'role', 'content'})")
    prompts: list[Prompt]
    if "prompt" in fields:
        prompts = [_prompt(fields["prompt"], "'prompt'")]
    elif "prompts" in fields:
        value = fields["prompts"]
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_PROMPTS:
            raise InputError(f"'prompts' must be a list of 1 to {MAX_PROMPTS} prompts")
        prompts = [_prompt(p, f"prompts[{i}]") for i, p in enumerate(value)]
    else:
        prompts = [_messages(fields["messages"])]
    flags = {}
    for name in ("ignore_eos", "continuous_usage", "echo"):
        value = fields.get(name, False)
        if not isinstance(value, bool):
            raise InputError(f"'{name}' must be true or false, got {value!r}")
        flags[name] = value
    if flags["echo"] and "messages" in fields:
        raise InputError("'echo' is for 'prompt': the chat template writes the prompt of "
                         "'messages'")
    max_tokens = fields.get("max_tokens")
    if max_tokens is None:
        max_tokens = 64
    elif not _is_int(max_tokens) or max_tokens < (0 if flags["echo"] else 1):
        raise InputError(f"'max_tokens' must be an integer >= 1 (0 only with 'echo'), got "
                         f"{max_tokens!r}")
    temperature = _number(fields, "temperature", 1.0)
    if temperature < 0:
        raise InputError(f"'temperature' must be >= 0 (0: greedy), got {temperature!r}")
    top_p = _number(fields, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise InputError(f"'top_p' must be > 0 and <= 1, got {top_p!r}")
    stop = fields.get("stop")
    stops = (stop,) if isinstance(stop, str) else () if stop is None else stop
    if (not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise InputError(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} "
                         f"of them, got {stop!r}")
    seed = fields.get("seed")
    if seed is not None and not _is_int(seed):
        raise InputError(f"'seed' must be an integer, got {seed!r}")
    n = fields.get("n")
    if n is None:
        n = 1
    elif not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise InputError(f"'n' must be an integer from 1 to {MAX_CHOICES}, got {n!r}")
    logprobs = fields.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise InputError(f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS} (how many "
                         f"alternatives per token), got {logprobs!r}")
    schema = fields.get("json_schema")
    if schema is not None and not isinstance(schema, Mapping):
        raise InputError(f"'json_schema' must be a JSON schema (an object), got "
                         f"{type(schema).__name__}")
    tools = fields.get("tools") or ()
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
        raise InputError("'tools' must be a list of tool definitions (objects)")
    if tools and "messages" not in fields:
        raise InputError("'tools' is for 'messages': the chat template tells the model")
    return prompts, Sampling(min(max_tokens, max_tokens_limit), temperature, top_p,
                             tuple(stops), seed, n, logprobs=logprobs,
                             json_schema=None if schema is None else json.dumps(schema),
                             tools=tuple(tools), **flags)


def prompt_ids(tokenizer: Any, prompt: Prompt, opened: bool = True,
               tools: Sequence[Any] = ()) -> list[int]:
    """The token ids of a prompt: a string as is (with the tokenizer's BOS, if it adds one),
    messages through the chat template with the assistant's turn opened (``opened``), token
    ids as they are (checked against the vocabulary).

    Raises:
        InputError: ``messages`` the template rejects or cannot render, or no template; a
            token id outside the vocabulary.
    """
    ids = [t for t in prompt if isinstance(t, int)] if isinstance(prompt, list) else []
    if ids and len(ids) == len(prompt):
        size = len(tokenizer)
        bad = next((t for t in ids if not 0 <= t < size), None)
        if bad is not None:
            raise InputError(f"token id {bad} of the prompt is outside this model's "
                             f"vocabulary (0 to {size - 1})")
        return ids
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids:
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is None:
                raise InputError("'prompt' is empty and this model has no BOS token to "
                                 "start from; send some text")
            ids = [int(bos)]
        return ids
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("this model's tokenizer has no chat template, so it cannot take "
                         "'messages'; send 'prompt' (a string) instead")
    import jinja2

    try:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=opened, tokenize=False,
                                             tools=list(tools) or None)
    except jinja2.TemplateError as exc:  # e.g. "roles must alternate user/assistant"
        raise InputError(f"the chat template rejected 'messages': {exc}") from None
    # The template writes the special tokens (BOS included) itself.
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])


def prepare(tokenizer: Any, fields: Mapping[str, Any], context: int, max_tokens_limit: int
            ) -> tuple[list[tuple[list[int], str]], Sampling]:
    """A request's prompts, each as (token ids, its text for ``echo``), and its sampling
    settings, checked.

    Raises:
        InputError: see :func:`read_request`; also a prompt that leaves no room in the
            ``context``, or ``messages`` for a model without a chat template.
    """
    prompts, sampling = read_request(fields, max_tokens_limit)
    prepared = []
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt, tools=sampling.tools)
        field = ("messages" if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)
                 else "prompt" if len(prompts) == 1 else f"prompts[{i}]")
        if len(ids) + (sampling.max_tokens > 0) > context:
            raise InputError(f"the '{field}' is {len(ids)} tokens; this model's context is "
                             f"{context} tokens, which leaves no room to generate")
        text = (prompt if isinstance(prompt, str)
                else str(tokenizer.decode(ids)) if sampling.echo else "")
        prepared.append((ids, text))
    return prepared, sampling


class IncrementalDecoder:
    """Turn token ids into text one token at a time.

    Decodes a short window ending at the new token and returns what it adds to the window's
    text without it, so spaces between words and characters spread over several tokens come
    out as in the whole decoded text; while the window ends inside a character (U+FFFD), the
    text waits for the next token. The window moves on after each piece: O(1) per token.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix = 0  # the window: ids[prefix:read] decoded already, ids[read:] not yet
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _pending(self) -> tuple[str, str]:
        return self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])

    def add(self, token_id: int) -> str:
        """The new text that ``token_id`` completes ("" if none yet)."""
        self.ids.append(token_id)
        before, text = self._pending()
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """The text still waiting at the end (e.g. a character left incomplete)."""
        before, text = self._pending()
        self.prefix = self.read = len(self.ids)
        return text[len(before):] if len(text) > len(before) else ""


class StopBuffer:
    """Hold back text that may be the start of a stop sequence; cut at the first stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text that is safe to send, and whether a stop sequence was reached (then
        the text is everything before it and the rest is dropped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        # Earlier text never ends with a stop's start (it would have been held), so the
        # longest held suffix is all a stop could still begin with.
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """The held text, at the end: no stop sequence can complete any more."""
        out, self.pending = self.pending, ""
        return out


def pick(logits: Any, sampling: Sampling, generator: Any) -> int:
    """The next token from the last position's logits: greedy, or temperature + top-p."""
    import torch

    if sampling.temperature < MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = torch.sort(probs, descending=True)
    # Keep the likeliest tokens until their mass reaches top_p (the first always stays).
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
    return int(order[choice])
