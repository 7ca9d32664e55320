"""Which grammar library constrains decoding: ``python benchmarks/grammar.py``.

Compares the maintained libraries that have wheels here (llguidance, xgrammar,
outlines-core; ``pip install llguidance xgrammar outlines-core``) on a real tokenizer,
SmolLM2-135M-Instruct's (49,152 tokens; ``python benchmarks/smollm2.py`` makes the model
directory; ``--tokenizer DIR`` takes another):

- **schema coverage**: which of a set of JSON schemas (the keywords structured-output and
  tool schemas use: enums, const, string lengths and patterns, formats, array bounds,
  integer ranges, anyOf/oneOf, $ref/$defs, nested objects, additionalProperties) each one
  compiles, and whether it then refuses an answer that breaks the schema (a library that
  compiles a keyword it does not enforce makes answers that do not validate);
- **compile time** of each schema (a fresh compiler each time: what one request with a new
  schema pays);
- **time per token**: the time to compute the next-token mask and advance by one token
  (the first token apart: a library that compiles lazily pays there), walking the tokens of
  a valid compact JSON answer (every library at the same positions, the same tokens).

Writes a Markdown table to stdout and ``benchmarks/results/grammar.md``. The machine is noisy:
compare the libraries within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / ".models" / "smollm2-135m-instruct"

OBJECT = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "tags", "unit"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                         "unit": {"enum": ["celsius", "fahrenheit"]}}}
# Answers that break their schema: a library that lets one through compiled the schema
# without enforcing it (the answer would not validate).
INVALID = {"uniqueItems": [1, 1], "maxLength": {"s": "abcdef"},
           "object, enum, bounds": {"name": "x", "age": 36, "tags": [], "unit": "kelvin"},
           "pattern": {"id": "abc-1234"}}

# (name, schema, a valid instance): the instance is the path the per-token timing walks.
SCHEMAS: list[tuple[str, dict[str, Any], Any]] = [
    ("object, enum, bounds", OBJECT, {"name": "Ada Lovelace", "age": 36,
                                      "tags": ["math", "poetry"], "unit": "celsius"}),
    ("pattern", {"type": "object", "required": ["id"], "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}}, {"id": "ABC-1234"}),
    ("format date-time", {"type": "object", "required": ["at"], "properties": {
        "at": {"type": "string", "format": "date-time"}}}, {"at": "2026-12-04T10:00:00Z"}),
    ("anyOf", {"type": "object", "required": ["v"], "properties": {
        "v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}]}}},
     {"v": "abc"}),
    ("oneOf", {"type": "object", "required": ["v"], "properties": {
        "v": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}}}, {"v": True}),
    ("$ref/$defs, nested", {"type": "object", "required": ["home", "work"],
                            "$defs": {"addr": {"type": "object", "required": ["city"],
                                               "properties": {"city": {"type": "string"}}}},
                            "properties": {"home": {"$ref": "#/$defs/addr"},
                                           "work": {"$ref": "#/$defs/addr"}}},
     {"home": {"city": "Paris"}, "work": {"city": "Lyon"}}),
    ("const, minItems", {"type": "object", "required": ["kind", "xs"], "properties": {
        "kind": {"const": "point"}, "xs": {"type": "array", "items": {"type": "number"},
                                           "minItems": 2, "maxItems": 3}}},
     {"kind": "point", "xs": [1.5, -2]}),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
     [1, 2, 3]),
    ("maxLength", {"type": "object", "required": ["s"], "properties": {
        "s": {"type": "string", "maxLength": 3}}}, {"s": "abc"}),
    ("tool calls (OpenAI required)", {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "required": ["name", "arguments"], "properties": {
            "name": {"const": "get_weather"}, "arguments": OBJECT}}]}},
     [{"name": "get_weather", "arguments": {"name": "Paris", "age": 3, "tags": [],
                                            "unit": "celsius"}}]),
]


def _byte_level_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(0x100 + extra)
            extra += 1
    return table


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.lt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        error = self.ll.LLMatcher.validate_grammar(grammar, self.tok)
        if error:
            raise ValueError(error)
        return grammar

    def walk(self, grammar: Any, tokens: list[int]) -> list[float]:
        matcher = self.ll.LLMatcher(self.tok, grammar)
        mask = self.lt.allocate_token_bitmask(1, self.vocab)

        def step(token: int) -> bool:
            self.lt.fill_next_token_bitmask(matcher, mask, 0)
            return bool(matcher.consume_token(token))
        return _timed(step, tokens)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                            separators=(",", ":"))

    def walk(self, compiled: Any, tokens: list[int]) -> list[float]:
        matcher = self.xgr.GrammarMatcher(compiled)
        mask = self.xgr.allocate_token_bitmask(1, self.info.vocab_size)

        def step(token: int) -> bool:
            matcher.fill_next_token_bitmask(mask)
            return bool(matcher.accept_token(token))
        return _timed(step, tokens)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        from outlines_core import Vocabulary

        # GPT-2 style byte-level tokens: map each token back to its bytes.
        decoder = {c: b for b, c in _byte_level_alphabet().items()}
        tokens: dict[bytes, list[int]] = {}
        eos = tokenizer.eos_token_id
        for token, i in tokenizer.get_vocab().items():
            if i == eos:
                continue
            raw = bytes(decoder[c] for c in token) if all(c in decoder for c in token) \
                else token.encode()
            tokens.setdefault(raw, []).append(i)
        self.vocabulary = Vocabulary(eos, tokens)

    def compile(self, schema: dict[str, Any]) -> Any:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=""),
                     self.vocabulary)

    def walk(self, index: Any, tokens: list[int]) -> list[float]:
        from outlines_core import Guide

        guide = Guide(index)

        def step(token: int) -> bool:
            if token not in guide.get_tokens():
                return False
            guide.advance(token)
            return True
        return _timed(step, tokens)


def _timed(step: Any, tokens: list[int]) -> list[float]:
    """Each token's time through ``step`` (compute the mask, then advance by the token;
    False: the grammar refused it, a ValueError)."""
    times = []
    for token in tokens:
        start = time.perf_counter()
        ok = step(token)
        times.append(time.perf_counter() - start)
        if not ok:
            raise ValueError(f"refused token {token}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(DEFAULT), help="a model directory")
    parser.add_argument("--repeats", type=int, default=3, help="compiles per schema")
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = max(AutoConfig.from_pretrained(args.tokenizer).vocab_size, len(tokenizer))
    libraries = []
    for kind in (Llguidance, Xgrammar, OutlinesCore):
        try:
            libraries.append(kind(tokenizer, vocab))
        except ImportError as exc:
            print(f"{kind.name}: not installed ({exc})")
    rows = []
    for name, schema, instance in SCHEMAS:
        tokens = tokenizer(json.dumps(instance, separators=(",", ":")),
                           add_special_tokens=False)["input_ids"]
        for lib in libraries:
            compile_times: list[float] = []
            try:
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    compiled = lib.compile(schema)
                    compile_times.append(time.perf_counter() - start)
                walked = lib.walk(compiled, tokens)
                ok = "yes"
                if name in INVALID:
                    bad = tokenizer(json.dumps(INVALID[name], separators=(",", ":")),
                                    add_special_tokens=False)["input_ids"]
                    try:
                        lib.walk(compiled, bad)
                        ok = "yes, but lets an invalid answer through"
                    except ValueError:
                        pass
                rows.append((name, lib.name, ok, statistics.median(compile_times) * 1e3,
                             walked[0] * 1e6, statistics.median(walked[1:]) * 1e6))
            except Exception as exc:  # a library that cannot: that is the finding
                rows.append((name, lib.name, f"no: {str(exc).splitlines()[0][:60]}", None,
                             None, None))
    lines = [f"Tokenizer: {Path(args.tokenizer).name} ({vocab} tokens); "
             f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
             "", "| schema | library | compiles | compile (ms, median) | first token (µs) | "
             "mask + advance per token after (µs, median) |", "|---|---|---|---|---|---|"]

    def cell(value: float | None, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f}"
    for name, lib, ok, compile_ms, first_us, token_us in rows:
        lines.append(f"| {name} | {lib} | {ok} | {cell(compile_ms, 1)} | {cell(first_us, 0)} "
                     f"| {cell(token_us, 0)} |")
    text = "\n".join(lines)
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "grammar.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
