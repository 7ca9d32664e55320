"""Constrained decoding: answers that always parse against a JSON schema.

A request's ``json_schema`` (from OpenAI's ``response_format`` or a forced tool call) is
compiled by llguidance into a grammar over the model's own tokens; before each token is
picked, the tokens that cannot continue a valid answer get a logit of -inf, so sampling and
greedy decoding alike only make valid JSON. The answer ends when the grammar is complete (the
closing brace of the top object), or at ``max_tokens`` (``finish_reason: "length"``: cut
short, the JSON is unfinished).

Why llguidance (``benchmarks/grammar.py`` measures the three maintained libraries that have
wheels here; docs/openai.md quotes the numbers): its token masks take microseconds per token
without precompiling the schema, it compiles the JSON Schema keywords that matter for
structured output (``enum``, ``const``, ``pattern``, ``minLength``/``maxLength``,
``minItems``/``maxItems``, ``anyOf``/``oneOf``, ``$ref``, ``additionalProperties``), and it is
one abi3 wheel without dependencies on every Python ipcserve supports.

Everything here runs in the ML process; llguidance is imported on first use.
"""

from __future__ import annotations

import json
from typing import Any

from ..engine.errors import InputError, ModelError

__all__ = ["Grammars", "Matcher", "available"]

# Compact JSON: a model cannot pad the answer with whitespace until max_tokens runs out.
_JSON_OPTIONS: Any = {"whitespace_flexible": False}


def available() -> bool:
    """Whether llguidance is installed (``pip install ipcserve[transformers]``)."""
    import importlib.util

    return importlib.util.find_spec("llguidance") is not None


class Matcher:
    """One choice's place in its grammar: masks the logits, follows the chosen tokens."""

    __slots__ = ("matcher", "bitmask")

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import llguidance.torch

        self.matcher = matcher
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def masked(self, logits: Any) -> Any:
        """A copy of ``logits`` (one row) where the tokens the grammar forbids are -inf."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        row = logits.float().clone()
        llguidance.torch.apply_token_bitmask_inplace(row, self.bitmask.to(row.device))
        return row

    def advance(self, token: int) -> bool:
        """Follow ``token``; whether the grammar is now complete (nothing may follow).

        Raises:
            ModelError: the token breaks the grammar (a mask was not applied).
        """
        if not self.matcher.consume_token(int(token)):
            raise ModelError(f"token {token} breaks the answer's grammar: "
                             f"{self.matcher.get_error()}")
        return bool(self.matcher.is_stopped())


class Grammars:
    """JSON schemas compiled for one model's tokenizer; made in the ML process.

    Args:
        tokenizer: the model's transformers tokenizer.
        vocab_size: the model's logits per token (may exceed the tokenizer's: padded
            embeddings).
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, len(tokenizer))
        self._ll: Any = None

    def _ll_tokenizer(self) -> Any:
        if self._ll is None:
            import llguidance.hf

            self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
        return self._ll

    def compile(self, schema_json: str) -> str:
        """The grammar of a JSON schema (as JSON text).

        Raises:
            InputError: llguidance is not installed, or the schema is invalid or uses
                keywords it cannot enforce (named in the message).
        """
        if not available():
            raise InputError("structured output needs llguidance in the ML process's Python "
                             "(pip install 'ipcserve[transformers]')")
        import llguidance

        schema = json.loads(schema_json)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise InputError(f"the JSON schema cannot be enforced: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self._ll_tokenizer())
        if error:
            raise InputError(f"the JSON schema cannot be enforced: {error}")
        return str(grammar)

    def matcher(self, grammar: str) -> Matcher:
        """A new matcher at the start of ``grammar`` (from :meth:`compile`)."""
        import llguidance

        matcher = llguidance.LLMatcher(self._ll_tokenizer(), grammar)
        if matcher.is_error():
            raise InputError(f"the JSON schema cannot be enforced: {matcher.get_error()}")
        return Matcher(matcher, self.vocab_size)
